"""Run a destination (and, for the demo, a source) end to end, with live progress."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time

from migrator.config import DestConfig, GuestOptions
from migrator.dest.session import DestinationSession, Outcome, Progress
from migrator.errors import MigratorError, SourceUnreachable
from migrator.security import ENV_SECRET
from migrator.report import build_summary
from migrator.stats import Summary


class ProgressLine:
    """One updating line on a terminal; a line per second otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self._last = 0.0

    def __call__(self, p: Progress) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not self.tty and now - self._last < 1.0:
            return
        self._last = now
        pct = 100.0 * p.present / max(p.npages, 1)
        line = (f"{p.phase:9s} {p.elapsed_s:6.1f}s  {pct:5.1f}% present  demand {p.demand}  prefetch {p.prefetch}  "
                f"zero {p.zero}  guest {p.ops_per_s:,.0f} ops/s")  # fmt: skip
        sys.stderr.write(("\r" + line + "\033[K") if self.tty else line + "\n")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")


def run_destination(cfg: DestConfig, stop: threading.Event, plot: str | None = None) -> Summary:
    summary, _out = run_destination_outcome(cfg, stop, plot)
    return summary


def run_destination_outcome(
    cfg: DestConfig, stop: threading.Event, plot: str | None = None, *, keep_guest: bool = False
) -> tuple[Summary, Outcome]:
    """Migrate here; with keep_guest the guest keeps running afterwards (out.guest)."""
    session = DestinationSession(cfg)
    show = ProgressLine(cfg.progress)
    try:
        out = session.migrate(show)
        if cfg.run_for is None or cfg.run_for > 0:
            session.run_after(out, cfg.run_for, stop, show)
        show.done()
        session.finish(out, keep_running=keep_guest)
        summary = build_summary(out)
        if plot:
            from migrator.plot import write_timeline

            summary.extra["timeline_png"] = write_timeline(out, plot)
        return summary, out
    finally:
        session.close(keep_release=keep_guest)


class DemoSource:
    """`migrator source` as its own process on a free loopback port."""

    def __init__(self, guest: GuestOptions, extra: list[str] | None = None, secret: str | None = None) -> None:
        self.secret = secret or os.environ.get(ENV_SECRET) or secrets.token_urlsafe(24)
        self._tmp = tempfile.TemporaryDirectory(prefix="migrator-demo-")
        ready = os.path.join(self._tmp.name, "ready.json")
        cmd = [sys.executable, "-m", "migrator", "source", "--listen", "127.0.0.1:0", "--ready-file", ready,
               "--ram", str(guest.ram), "--vcpus", str(guest.vcpus), "--workload", guest.workload,
               "--write-ratio", str(guest.write_ratio), "--zero-pct", str(guest.zero_pct),
               "--text-pct", str(guest.text_pct), "--seed", str(guest.seed), "--rate", str(guest.rate)] + (extra or [])  # fmt: skip
        env = dict(os.environ, **{ENV_SECRET: self.secret})
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env)
        try:
            deadline = time.monotonic() + 180
            while not os.path.exists(ready):
                if self.proc.poll() is not None:
                    raise MigratorError("the source exited before it was ready", exit=self.proc.returncode)
                if time.monotonic() > deadline:
                    raise SourceUnreachable("the source did not become ready")
                time.sleep(0.05)
            with open(ready) as f:
                self.info = json.load(f)
        except BaseException:
            self.close()
            raise
        self.address: str = self.info["address"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._tmp.cleanup()


def run_demo(guest: GuestOptions, cfg: DestConfig, warmup: float, stop: threading.Event, plot: str | None = None) -> Summary:
    """Start `migrator source` as its own process on a free port, then migrate here."""
    src = DemoSource(guest)
    try:
        if cfg.progress:
            sys.stderr.write(f"demo: source ready at {src.address}, guest running for {warmup:g}s before migration\n")
        time.sleep(warmup)
        dcfg = DestConfig(**{**cfg.__dict__, "source": src.address, "secret": src.secret})
        summary = run_destination(dcfg, stop, plot)
        src.proc.wait(timeout=30)
        return summary
    finally:
        src.close()

