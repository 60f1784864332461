"""No thread, file descriptor or memory leaks from one migration to the next.

The destination pipeline runs in this test process (so its threads and fds are
this process's), against real sources; after a first round (gRPC starts some
threads of its own once), every further round must end with the same threads
and fds.  `-m soak` runs the long version, bounded by MIGRATOR_SOAK_SECONDS
(default 120), and reports every round.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from migrator.config import DestConfig, GuestOptions
from migrator.runner import DemoSource, run_destination_outcome
from tests.conftest import require_userfaultfd


def _fds() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass  # the listing's own fd
    return sorted(out)


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _round(ram: int = 32 << 20) -> dict:
    src = DemoSource(GuestOptions(ram=ram, write_ratio=0.5))
    try:
        time.sleep(0.3)
        cfg = DestConfig(source=src.address, secret=src.secret, run_for=0.3, progress=False, verify=True)
        summary, _out = run_destination_outcome(cfg, threading.Event())
        assert summary.ok and summary.verified_pages == summary.pages, summary
        assert src.proc.wait(30) == 0
    finally:
        src.close()
    time.sleep(0.2)  # let gRPC's finished calls wind down
    return {"threads": sorted(t.name for t in threading.enumerate()), "fds": _fds(), "rss_kib": _rss_kib()}


def _stable(a: dict, b: dict) -> None:
    assert len(b["threads"]) <= len(a["threads"]), (a["threads"], b["threads"])
    assert len(b["fds"]) <= len(a["fds"]), sorted(set(b["fds"]) - set(a["fds"]))


def test_no_thread_or_fd_leak_across_migrations() -> None:
    require_userfaultfd()
    first = _round()
    for _ in range(2):
        _stable(first, _round())


@pytest.mark.soak
def test_soak_repeated_migrations_under_load() -> None:
    require_userfaultfd()
    budget = float(os.environ.get("MIGRATOR_SOAK_SECONDS", "120"))
    t_end = time.monotonic() + budget
    base = _round(64 << 20)
    rounds = [base]
    while time.monotonic() < t_end:
        r = _round(64 << 20)
        rounds.append(r)
        print(f"[soak] round {len(rounds)}: threads {len(r['threads'])}, fds {len(r['fds'])}, rss {r['rss_kib'] / 1024:.1f} MiB")
        _stable(base, r)
    # memory: after the first rounds, RSS must not keep growing
    if len(rounds) >= 4:
        growth = rounds[-1]["rss_kib"] - rounds[2]["rss_kib"]
        assert growth < 32 * 1024, f"RSS grew by {growth / 1024:.1f} MiB over {len(rounds) - 3} rounds"
