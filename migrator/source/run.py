"""`migrator source`: start a guest, serve it, release it once the destination confirms."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from dataclasses import asdict
from typing import Any, Callable

from migrator.config import SourceConfig
from migrator.errors import GuestDied
from migrator.guest import GuestProcess, GuestSpec
from migrator.security import load_secret
from migrator.source.ownership import Phase
from migrator.source.servicer import serve_control
from migrator.source.session import SourceSession, free_port_block

log = logging.getLogger("migrator.source")
SWITCH_INTERVAL_S = float(os.environ.get("MIGRATOR_SWITCH_INTERVAL", "0.0002"))
LINGER_S = 10.0  # after Complete: answer a repeated Complete (lost reply) until acknowledged
GUEST_DIED_LINGER_S = 3.0  # after the guest died mid-migration: tell the destination, then exit


def run_source(cfg: SourceConfig, stop: threading.Event, say=print, rollback: threading.Event | None = None) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    g = cfg.guest
    guest = GuestProcess(
        GuestSpec(ram=g.ram, vcpus=g.vcpus, workload=g.workload, write_ratio=g.write_ratio,
                  zero_pct=g.zero_pct, text_pct=g.text_pct, seed=g.seed, rate=g.rate)
    )  # fmt: skip
    say(f"source: guest pid {guest.hello.pid} running ({g.ram >> 20} MiB, {g.vcpus} vCPUs, {g.workload})")
    return serve_guest(guest, cfg, stop, say, rollback)


def serve_guest(  # type: ignore[no-untyped-def]
    guest: GuestProcess, cfg: SourceConfig, stop: threading.Event, say=print, rollback: threading.Event | None = None,
    session_class: type[SourceSession] = SourceSession,
) -> dict[str, Any]:
    """Serve a running guest to a destination; release it once that one confirms.

    Until then the guest's memory stays here, whatever happens to the
    destination (see ``ownership.py`` for who may resume it when).  ``rollback``
    set (SIGUSR1 from the CLI) asks for a roll-back; it is refused while a
    destination may be running the guest (``migrator rollback --force`` does it
    anyway).  A Ctrl-C (``stop`` set with ``stop.interactive``) while a
    destination runs the guest is refused once, with a warning; a second one,
    or an operator's SIGTERM, stops at once (and that guest is lost: said so).

    Used by `migrator source` for a guest it started, by `migrator dest
    --listen` for the guest it just received (the next hop), and by `migrator
    serve` for an image (``session_class``: ``snapshot/serve.py``).
    """
    # The bulk stream's thread would hold the GIL for up to the default 5 ms
    # switch interval while a demand request waits: switch often.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:
        session = session_class(guest, switchover_timeout=cfg.switchover_timeout, lanes=cfg.lanes)
    except BaseException:
        guest.kill()
        raise
    try:
        secret, generated = load_secret(cfg.secret_file, create=True)
        server, port = _listen(session, cfg, secret)
    except BaseException:
        session.close()
        guest.kill()
        raise
    host = cfg.listen.rsplit(":", 1)[0]
    info = {"address": f"{host}:{port}", "guest_pid": guest.hello.pid, "pid": os.getpid(), "ram": guest.hello.size}
    if cfg.ready_file:
        tmp = cfg.ready_file + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds the secret
        with os.fdopen(fd, "w") as f:
            json.dump({**info, "secret": secret}, f)
        os.replace(tmp, cfg.ready_file)
    if generated and cfg.secret_file:
        say(f"source: wrote a new migration secret to {cfg.secret_file}; give the destination --secret-file")
    elif generated:
        say(f"source: migration secret {secret} (give it to the destination as MIGRATOR_SECRET)")
    say(f"source: waiting for a destination on {info['address']}")
    loop = _Loop(session, guest, say, str(info["address"]))
    try:
        loop.run(stop, rollback)
        if session.completed.is_set():
            say("source: the destination confirmed every page; releasing the guest")
            if cfg.keep_guest:
                say(f"source: --keep-guest: guest pid {guest.hello.pid} stays paused until this process stops")
                stop.wait()
            else:
                guest.quit()
            # its reply may have been lost: answer a repeated Complete until it is acknowledged
            session.acked.wait(LINGER_S)
        elif session.own.phase is not Phase.RUNNING:
            say(f"source: stopped in phase {session.phase}: the guest's memory on this side is dropped")
    finally:
        server.stop(grace=1).wait(2)
        stats = asdict(session.stats)
        session.close()
        guest.quit()
    epoch = f"{session.epoch:016x}" if session.epoch else ""
    return {"phase": session.phase, "migration_id": epoch, **stats, **info}


def _listen(session: SourceSession, cfg: SourceConfig, secret: str | None) -> tuple[Any, int]:
    """The control server on the --listen port P, the urgent and lane workers on
    P+1, P+2, ... (with port 0: a free block)."""
    host, _, port_s = cfg.listen.rpartition(":")
    bind_host = host.strip("[]") or "0.0.0.0"
    nports = 2 + session.lanes
    tries = 1 if int(port_s) else 10
    for attempt in range(tries):
        base = int(port_s) or free_port_block("127.0.0.1" if bind_host in ("0.0.0.0", "::") else bind_host, nports)
        try:
            session.start_workers(host, base, secret, cfg.tls)
            return serve_control(session, f"{host}:{base}", secret=secret, tls=cfg.tls)
        except OSError as exc:
            for w in session.workers:
                w.close(timeout=2)
            session.workers = []
            if attempt == tries - 1:
                raise OSError(f"cannot listen on {host}:{base}..{base + nports - 1} ({exc})") from None
    raise AssertionError("unreachable")


class _Loop:
    """The source's main loop: ticks the session, says what happened, takes the user's signals."""

    def __init__(self, session: SourceSession, guest: GuestProcess, say: Callable[[str], None], address: str) -> None:
        self.s, self.guest, self.say, self.address = session, guest, say, address
        self._stop_warned = 0.0

    def run(self, stop: threading.Event, rollback: threading.Event | None) -> None:
        s = self.s
        while not s.completed.is_set():
            if stop.is_set() and not self._stop_refused(stop):
                return
            s.completed.wait(0.2)
            if not self.guest.alive():
                if s.guest_died():
                    time.sleep(GUEST_DIED_LINGER_S)  # a destination that asks now learns why
                raise GuestDied("the source guest died", exit=self.guest.proc.returncode)
            s.tick()
            while not s.events.empty():
                self._tell(s.events.get())
            if rollback is not None and rollback.is_set():
                rollback.clear()
                self.say(f"source: {s.rollback(force=False)}")

    def _stop_refused(self, stop: threading.Event) -> bool:
        """Refuse the first Ctrl-C while a destination runs the guest; True if refused."""
        if not self.s.own.destination_may_run:
            return False
        if not getattr(stop, "interactive", False) or (self._stop_warned and time.monotonic() - self._stop_warned < 30):
            self.say("source: stopping while a destination runs the guest with pages only this side has: "
                     "that guest will fail")  # fmt: skip
            return False
        self._stop_warned = time.monotonic()
        stop.clear()
        self.say("source: not stopping: a destination runs this guest and its missing pages are only here; "
                 "stopping now loses the guest. Press Ctrl-C again within 30 s to stop anyway.")  # fmt: skip
        return True

    def _tell(self, event: str) -> None:
        if event == "lost-paused":
            self.say(f"source: the destination went away before taking the guest; it stays paused here and runs "
                     f"here again within {self.s.own.switchover_timeout_s:g} s of the pause unless the destination "
                     f"comes back")  # fmt: skip
        elif event == "lost-switched":
            self.say(f"source: the destination went away after taking the guest: it may still be running it, with "
                     f"the pages it has; the rest are only here, so this side keeps them and waits (the destination "
                     f"reconnects by itself). If the destination's host is gone for good, take the guest back with: "
                     f"migrator rollback --source {self.address} --force "
                     f"(two live guests if the destination's still runs)")  # fmt: skip
        else:
            self.say(f"source: {event}")
