"""The destination dies after the switch-over: the source keeps its paused copy,
says so and how to take it back, refuses a plain roll-back (SIGUSR1: the
destination might still run the guest), and resumes it only when forced
(`migrator rollback --force`); then the same guest migrates again, and its new
destination verifies every page."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from tests.conftest import require_userfaultfd
from tests.helpers import procs


def _guest_running(dest: procs.Cmd) -> bool:
    return any(procs.thread_count(g) > 1 for g in procs.guest_children(dest.pid))


def test_destination_dies_then_forced_rollback_then_migrate_again(tmp_path: Path) -> None:
    require_userfaultfd()
    with procs.running_source(tmp_path, "256MiB", "--json") as (src, info):
        src_guest = int(info["guest_pid"])
        with procs.command(
            [*procs.MIGRATOR, "dest", "--source", info["address"], "--run-for", "5", "--quiet", "--batch-pages", "64"],
            tmp_path, "dest1",
        ) as dest:  # fmt: skip
            procs.wait_for(lambda: _guest_running(dest), 60, what="the destination guest to run")
            dest.kill_group()  # the destination host dies after the switch-over
        procs.wait_for(lambda: "went away after taking the guest" in src.stderr(), 10, what="the source to report it")
        assert f"migrator rollback --source {info['address']} --force" in src.stderr()
        time.sleep(1.0)
        # it never resumes on its own: still here, guest alive, nothing rolled back
        assert src.proc.poll() is None and procs.alive(src_guest)
        assert "rolled back" not in src.stderr()
        src.signal(signal.SIGUSR1)  # a plain roll-back: refused, the destination may still run it
        procs.wait_for(lambda: "roll-back refused" in src.stderr(), 10, what="the refusal")
        forced = procs.run([*procs.MIGRATOR, "rollback", "--source", info["address"], "--force"], timeout=30)
        assert forced.returncode == 0 and "rolled back by force" in forced.stdout, forced
        procs.wait_for(lambda: "rolled back by force" in src.stderr(), 10, what="the roll-back")
        time.sleep(1.0)  # the guest runs (and writes) here again
        with procs.command(
            [*procs.MIGRATOR, "dest", "--source", info["address"], "--run-for", "0.5", "--json", "--quiet"],
            tmp_path, "dest2",
        ) as dest2:  # fmt: skip
            assert dest2.wait(120) == 0, dest2.stderr()
            s = json.loads(dest2.stdout())
        assert src.wait(30) == 0, src.stderr()
        result = json.loads(src.stdout()[src.stdout().index("{") :])
    assert s["ok"] and s["verified_pages"] == s["pages"] and s["verify_errors"] == [] and s["guest_errors"] == []
    assert result["phase"] == "completed"
    assert "Traceback" not in src.stderr()
