"""The guest-memory events under stress (issue 11, from a review that tried to break them).

Each test runs a real ``migrator source --keep-guest`` and a destination in its
own process (``helpers/events_dest.py``) whose guest discards / maps over /
moves its RAM *while the bulk lanes stream* (prefetch delay 0, or short), then
checks every page of the destination guest against the source guest through
/proc/PID/mem, independently of migrator's counters:

* a page the guest discarded or mapped over (after which it never wrote it:
  write ratio 0) must read as zeros;
* every other page must equal the source's page (at its new address if moved).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from guest_sim.pages import table_pages
from helpers import procmem, procs
from helpers.guest_events import Run, run_dest
from migrator.probe import probe

PS = 4096

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module", autouse=True)
def _userfaultfd() -> None:
    result = probe()
    if not result.ok:
        pytest.skip(result.message)


def check_all(r: Run, zeroed: set[int], moved: dict[int, int]) -> list[str]:
    """Every page: zeros where the guest gave it up, else the source's page (at its new address)."""
    bad: list[str] = []
    whole = procmem.read_mem(r.pid, r.addr, r.npages * PS) if not moved else None
    for p in range(table_pages(r.npages, PS), r.npages):
        if p in moved:
            got = r.dst_page(p, moved[p])
        elif whole is not None:
            got = whole[p * PS : (p + 1) * PS]
        else:
            try:
                got = r.dst_page(p)
            except (OSError, AssertionError):
                got = b"<unreadable>"
        want = bytes(PS) if p in zeroed else r.src_page(p)
        if got != want:
            kind = "zeros expected, found data" if p in zeroed else ("zero" if got == bytes(PS) else "different")
            bad.append(f"page {p}: {kind}")
    return bad


def random_discards(n: int, npages: int, seed: int, max_count: int = 64) -> tuple[list[dict[str, Any]], set[int]]:
    rnd = random.Random(seed)
    acts: list[dict[str, Any]] = []
    zeroed: set[int] = set()
    for _ in range(n):
        count = rnd.randint(1, max_count)
        first = rnd.randrange(table_pages(npages, PS), npages - count)
        acts.append({"cmd": "discard", "first": first, "count": count})
        zeroed.update(range(first, first + count))
    return acts, zeroed


@pytest.mark.parametrize("fault_threads,seed,rate", [(1, 1, "20"), (2, 4, "0")])
def test_random_discards_while_the_lanes_stream(tmp_path: Path, fault_threads: int, seed: int, rate: str) -> None:
    """Discards racing the bulk lanes (no prefetch delay): no old copy may ever land
    on a discarded page, and every other page must be the source's."""
    ram, npages = "1GiB", (1 << 30) // PS
    acts, zeroed = random_discards(400, npages, seed=seed)
    extra = ["--rate", rate] if rate != "0" else []  # "0": the guest's vCPUs at full speed
    with procs.running_source(tmp_path, ram, "--keep-guest", *extra) as (_src, info):
        r = run_dest(info, acts, {"prefetch_delay": 0.0, "fault_threads": fault_threads, "when": "thread"})
        try:
            assert all(x.get("ok") for x in r.replies), [x for x in r.replies if not x.get("ok")][:3]
            s = r.summary
            print("actions during the migration:", r.res["actions_done_before_end"], "of", len(acts), r.res["actions_s"],
                  s["extra"],
                  "discarded", s.get("pages_discarded"), "dup", s.get("duplicates"))
            bad = check_all(r, zeroed, {})
            assert not bad, f"{len(bad)} wrong pages, e.g. {bad[:10]}; summary ok={s['ok']} verify={s['verify_errors'][:3]}"
            assert s["ok"] and not s["verify_errors"], s
        finally:
            r.close()


def test_remap_twice_back_and_discard_at_the_new_address(tmp_path: Path) -> None:
    """Move a range, discard part of it at its new address, move it again, then move
    another range back over... ; lanes streaming meanwhile."""
    ram = "128MiB"
    E, K = 5000, 20000  # two ranges in the two lanes' shares
    acts = [
        {"cmd": "remap", "first": E, "count": 64},  # 0
        {"cmd": "discard", "first": E + 8, "count": 8},  # 1: at the new address
        {"cmd": "remap", "first": E, "count": 64},  # 2: moved again
        {"cmd": "read-page", "page": E + 9},  # 3
        {"cmd": "read-page", "page": E + 20},  # 4
        {"cmd": "remap", "first": K, "count": 16},  # 5
        {"cmd": "remap", "first": K + 4, "count": 4},  # 6: part of a moved range moved again
    ]
    with procs.running_source(tmp_path, ram, "--keep-guest", "--rate", "20") as (_src, info):
        r = run_dest(info, acts, {"prefetch_delay": 0.3, "when": "first"})
        try:
            assert all(x.get("ok") for x in r.replies), r.replies
            new_e = int(r.replies[2]["address"])
            new_k = int(r.replies[5]["address"])
            new_k2 = int(r.replies[6]["address"])
            moved = {E + i: new_e + i * PS for i in range(64)}
            moved.update({K + i: new_k + i * PS for i in range(16)})
            moved.update({K + 4 + i: new_k2 + i * PS for i in range(4)})
            assert r.replies[3]["zero"] and r.replies[3]["check"] is None, r.replies[3]
            assert r.replies[4]["check"] is None and not r.replies[4]["zero"], r.replies[4]
            bad = check_all(r, set(range(E + 8, E + 16)), moved)
            assert not bad, f"{len(bad)} wrong pages, e.g. {bad[:10]}"
            assert r.summary["ok"] and not r.summary["verify_errors"], r.summary
        finally:
            r.close()


def test_map_over_spanning_both_lanes_shares(tmp_path: Path) -> None:
    ram, npages = "512MiB", (512 << 20) // PS
    mid = npages // 2
    acts = [{"cmd": "map-over", "first": mid - 100, "count": 200}, {"cmd": "read-page", "page": mid}]
    with procs.running_source(tmp_path, ram, "--keep-guest", "--rate", "20") as (_src, info):
        r = run_dest(info, acts, {"prefetch_delay": 0.0, "when": "first"})
        assert r.res["actions_done_before_end"] == len(acts)
        try:
            assert all(x.get("ok") for x in r.replies), r.replies
            bad = check_all(r, set(range(mid - 100, mid + 100)), {})
            s = r.summary
            if bad:
                import struct
                hdr = [struct.unpack_from("<IIII", r.dst_page(p)) for p in range(mid - 100, mid + 100)]
                same = [p for p in range(mid - 100, mid + 100) if r.dst_page(p) == r.src_page(p)]
                print("unmapped", s.get("pages_unmapped"), "eagain", s["extra"].get("kernel_eagain"),
                      "bad", bad[0], bad[-1], "same-as-source", len(same), same[:3], same[-3:], hdr[:2])
            assert not bad, f"{len(bad)} wrong pages, e.g. {bad[:10]}"
            assert r.summary["ok"] and not r.summary["verify_errors"], r.summary
        finally:
            r.close()
