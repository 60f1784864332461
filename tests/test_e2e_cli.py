"""End to end: the README's commands, run as a user runs them, in subprocesses."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from helpers import procs
from migrator.probe import probe

pytestmark = pytest.mark.timeout(120)

PAGES_64MIB = 16384


def needs_userfaultfd() -> None:
    result = probe()
    if not result.ok:
        pytest.skip(result.message)


def check_summary(s: dict[str, Any], pages: int) -> None:
    """What every successful summary must say (definitions: DESIGN.md, README)."""
    assert s["ok"] is True, s
    assert s["pages"] == pages
    assert s["pages_demand"] + s["pages_prefetch"] + s["pages_zero"] == pages
    assert s["verified_pages"] == pages
    assert s["verify_errors"] == []
    assert s["guest_errors"] == []
    assert s["downtime_ms"] > 0
    assert s["total_ms"] >= s["downtime_ms"]
    assert s["error"] == ""


def wait_listening(src: procs.Cmd, timeout: float = 60.0) -> None:
    """A source without --ready-file says on stderr when it waits for a destination."""

    def ready() -> bool:
        if src.proc.poll() is not None:
            raise AssertionError(f"source exited with {src.proc.returncode}:\n{src.stderr()}")
        return "waiting for a destination" in src.stderr()

    procs.wait_for(ready, timeout, interval=0.05, what="the source to listen")


def test_demo_json(tmp_path: Path) -> None:
    needs_userfaultfd()
    args = [*procs.MIGRATOR, "demo", "--ram", "64MiB", "--run-for", "1", "--json", "--quiet"]
    with procs.command(args, tmp_path, "demo") as demo:
        rc = demo.wait(timeout=60)
        assert rc == 0, demo.stderr()
        check_summary(json.loads(demo.stdout()), PAGES_64MIB)
        assert "Traceback" not in demo.stderr()
        assert demo.leftovers() == []


def test_demo_leaves_no_temporary_files(tmp_path: Path) -> None:
    needs_userfaultfd()
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    args = [*procs.MIGRATOR, "demo", "--ram", "32MiB", "--warmup", "0.2", "--run-for", "0.2", "--no-verify", "--quiet"]
    with procs.command(args, tmp_path, "demo", env={"TMPDIR": str(tmpdir)}) as demo:
        assert demo.wait(timeout=60) == 0, demo.stderr()
    left = sorted(str(p.relative_to(tmpdir)) for p in tmpdir.rglob("*"))
    assert left == [], f"left behind in TMPDIR: {left}"


def test_two_terminals(tmp_path: Path) -> None:
    """``migrator source`` in one terminal, ``migrator dest`` in another; the source leaves by itself."""
    needs_userfaultfd()
    port = procs.free_port()
    src_args = [*procs.MIGRATOR, "source", "--listen", f"127.0.0.1:{port}", "--ram", "64MiB", "--workload", "random"]
    dest_args = [*procs.MIGRATOR, "dest", "--source", f"127.0.0.1:{port}", "--run-for", "1", "--json", "--quiet"]
    with procs.command(src_args, tmp_path, "source") as src:
        wait_listening(src)
        with procs.command(dest_args, tmp_path, "dest") as dest:
            rc = dest.wait(timeout=60)
            assert rc == 0, dest.stderr()
            check_summary(json.loads(dest.stdout()), PAGES_64MIB)
            assert dest.leftovers() == []
        # the source was released by the destination's completion and exits on its own
        assert src.wait(timeout=15) == 0, src.stderr()
        assert "completed" in src.stdout(), src.stdout()
        assert src.leftovers() == []


def _dest_until_sigint(tmp_path: Path, to_group: bool) -> procs.Cmd:
    """Run an open-ended ``migrator dest`` and stop it with SIGINT once migrated (>= 1.5 s)."""
    with procs.running_source(tmp_path, "64MiB") as (src, info):
        args = [*procs.MIGRATOR, "dest", "--source", str(info["address"]), "--quiet"]
        with procs.command(args, tmp_path, "dest") as dest:
            t0 = time.monotonic()
            # completion releases the source, which then exits by itself
            assert src.wait(timeout=60) == 0, src.stderr()
            time.sleep(max(0.0, 1.5 - (time.monotonic() - t0)))
            assert dest.proc.poll() is None, f"dest exited early ({dest.proc.returncode}):\n{dest.stderr()}"
            if to_group:
                os.killpg(dest.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
            else:
                dest.signal(signal.SIGINT)
            dest.wait(timeout=30)
            return dest


def test_dest_stopped_with_sigint(tmp_path: Path) -> None:
    needs_userfaultfd()
    dest = _dest_until_sigint(tmp_path, to_group=False)
    assert dest.proc.returncode == 0, dest.stderr()
    out = dest.stdout()
    assert out.startswith("migrated        64 MiB guest, 16384 pages"), out
    assert f"memory verified: {PAGES_64MIB} of {PAGES_64MIB} pages" in out, out
    assert "FAILED" not in out
    assert "Traceback" not in dest.stderr()


def test_dest_stopped_with_ctrl_c_in_a_terminal(tmp_path: Path) -> None:
    needs_userfaultfd()
    dest = _dest_until_sigint(tmp_path, to_group=True)
    assert dest.proc.returncode == 0, dest.stderr()
    assert f"memory verified: {PAGES_64MIB} of {PAGES_64MIB} pages" in dest.stdout()


def test_check() -> None:
    res = procs.run([*procs.MIGRATOR, "check"], timeout=30)
    if res.returncode == 3:
        pytest.skip(res.stdout.strip())
    assert res.returncode == 0, res
    assert res.stdout.startswith("userfaultfd ok"), res.stdout


def test_dest_check_flag() -> None:
    """The container healthcheck form: ``migrator dest --check``."""
    res = procs.run([*procs.MIGRATOR, "dest", "--check"], timeout=30)
    assert res.returncode in (0, 3), res
    assert res.stdout.startswith("userfaultfd ok") == (res.returncode == 0), res.stdout


@pytest.mark.parametrize("args", [[], ["source"], ["dest"], ["demo"], ["check"]], ids=lambda a: " ".join(a) or "main")
def test_help(args: list[str]) -> None:
    res = procs.run([*procs.MIGRATOR, *args, "--help"], timeout=30)
    assert res.returncode == 0, res
    assert res.stdout.startswith("Usage: "), res.stdout
    assert res.stderr == ""


def test_python_dash_m_is_the_same_cli() -> None:
    import sys

    res = procs.run([sys.executable, "-m", "migrator", "--help"], timeout=30)
    assert res.returncode == 0, res
    for cmd in ("source", "dest", "demo", "check"):
        assert cmd in res.stdout
