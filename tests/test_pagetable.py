"""The destination's page table: states, exactly-once claims, completion, waiting times."""

from __future__ import annotations

import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migrator.dest.pagetable import INSTALLING, MISSING, PRESENT, REQUESTED, PageTable


def states(t: PageTable) -> list[int]:
    return list(t.state)


# -- on_fault ------------------------------------------------------------------------


def test_fault_on_missing_page_requests_it_and_records_the_waiter() -> None:
    t = PageTable(8)
    before = time.perf_counter_ns()
    assert t.on_fault(3, ptid=111) == MISSING
    assert t.state[3] == REQUESTED
    t_fault, ptid = t.waiting[3]
    assert ptid == 111
    assert before <= t_fault <= time.perf_counter_ns()


def test_second_fault_on_requested_page_keeps_the_first_waiter() -> None:
    t = PageTable(8)
    t.on_fault(3, ptid=111)
    first = t.waiting[3]
    assert t.on_fault(3, ptid=222) == REQUESTED
    assert t.state[3] == REQUESTED
    assert t.waiting[3] == first


def test_fault_on_installing_page_waits_without_a_new_request() -> None:
    t = PageTable(8)
    assert t.claim(2, b"\x01") == bytearray(b"\x01")
    assert t.on_fault(2, ptid=5) == INSTALLING
    assert t.state[2] == INSTALLING
    assert 2 in t.waiting


def test_fault_on_present_page_is_spurious_and_not_waited_on() -> None:
    t = PageTable(8)
    mine = t.claim(4, b"\x01")
    t.installed(4, mine)
    assert t.on_fault(4, ptid=7) == PRESENT
    assert t.state[4] == PRESENT
    assert 4 not in t.waiting


# -- request_window --------------------------------------------------------------------


def test_request_window_takes_contiguous_missing_pages_up_to_the_limit() -> None:
    t = PageTable(16)
    t.on_fault(2, 1)
    assert t.request_window(2, 4, bytes(16)) == 4
    assert states(t)[:8] == [MISSING, MISSING, REQUESTED, REQUESTED, REQUESTED, REQUESTED, MISSING, MISSING]


def test_request_window_stops_at_a_page_that_is_not_missing() -> None:
    t = PageTable(16)
    t.claim(5, b"\x01")  # page 5 is being installed by the bulk stream
    t.on_fault(3, 1)
    assert t.request_window(3, 8, bytes(16)) == 2
    assert states(t)[3:7] == [REQUESTED, REQUESTED, INSTALLING, MISSING]


def test_request_window_stops_at_an_excluded_page() -> None:
    t = PageTable(16)
    exclude = bytearray(16)
    exclude[6] = 1  # known zero: resolved locally, never requested
    t.on_fault(4, 1)
    assert t.request_window(4, 8, bytes(exclude)) == 2
    assert t.state[6] == MISSING and t.state[7] == MISSING


def test_request_window_stops_at_the_end_of_ram() -> None:
    t = PageTable(10)
    t.on_fault(8, 1)
    assert t.request_window(8, 16, bytes(10)) == 2
    t2 = PageTable(10)
    t2.on_fault(9, 1)
    assert t2.request_window(9, 16, bytes(10)) == 1


def test_request_window_of_one_requests_nothing_more() -> None:
    t = PageTable(8)
    t.on_fault(0, 1)
    assert t.request_window(0, 1, bytes(8)) == 1
    assert states(t) == [REQUESTED] + [MISSING] * 7


def test_a_page_is_requested_at_most_once() -> None:
    t = PageTable(32)
    t.on_fault(0, 1)
    assert t.request_window(0, 8, bytes(32)) == 8
    # a later fault inside the window finds the page already requested
    assert t.on_fault(5, 2) == REQUESTED
    # and a window starting just before the first one stops at it
    t.on_fault(10, 3)
    assert t.request_window(10, 8, bytes(32)) == 8
    assert t.state.count(REQUESTED) == 16


# -- claim / installed / unclaim ----------------------------------------------------------


def test_claim_only_pages_the_caller_holds() -> None:
    t = PageTable(8)
    mine = t.claim(2, b"\x01\x00\x02\x01")
    assert mine == bytearray(b"\x01\x00\x01\x01")
    assert states(t)[2:6] == [INSTALLING, MISSING, INSTALLING, INSTALLING]


def test_second_claim_of_the_same_pages_gets_nothing() -> None:
    t = PageTable(8)
    t.on_fault(1, 9)  # REQUESTED pages can still be claimed by whichever copy comes first
    assert t.claim(0, b"\x01\x01\x01") == bytearray(b"\x01\x01\x01")
    assert t.claim(0, b"\x01\x01\x01") == bytearray(3)
    t.installed(0, b"\x01\x01\x01")
    assert t.claim(0, b"\x01\x01\x01") == bytearray(3)


def test_installed_marks_present_and_reports_waiters() -> None:
    t = PageTable(8)
    t.on_fault(3, ptid=31)
    t.on_fault(5, ptid=51)
    t_fault_3, t_fault_5 = t.waiting[3][0], t.waiting[5][0]
    mine = t.claim(2, b"\x01\x01\x01\x01")
    woken = t.installed(2, mine)
    assert sorted(woken) == [(3, t_fault_3, 31), (5, t_fault_5, 51)]
    assert t_fault_3 <= t_fault_5 <= time.perf_counter_ns()  # latency = now - fault time >= 0
    assert t.waiting == {}
    assert states(t)[2:6] == [PRESENT] * 4
    assert t.present == 4
    assert (t.present, states(t).count(REQUESTED)) == (4, 0)


def test_installed_ignores_pages_not_in_the_mask() -> None:
    t = PageTable(8)
    t.on_fault(1, 10)
    mine = t.claim(0, b"\x01\x01\x01")
    mine[1] = 0
    t.unclaim(1, b"\x01")
    woken = t.installed(0, mine)
    assert woken == []
    assert states(t)[:3] == [PRESENT, MISSING, PRESENT]
    assert 1 in t.waiting  # still waiting: its page is not there yet
    assert t.present == 2


def test_unclaim_makes_pages_missing_and_claimable_again() -> None:
    t = PageTable(8)
    mine = t.claim(4, b"\x01\x01")
    t.unclaim(4, mine)
    assert states(t)[4:6] == [MISSING, MISSING]
    assert t.present == 0
    assert t.claim(4, b"\x01\x01") == bytearray(b"\x01\x01")


def test_unclaim_only_touches_the_callers_pages() -> None:
    t = PageTable(8)
    other = t.claim(0, b"\x01\x00")
    mine = t.claim(0, b"\x01\x01")  # page 0 is the other caller's
    assert mine == bytearray(b"\x00\x01")
    t.unclaim(0, mine)
    assert states(t)[:2] == [INSTALLING, MISSING]
    t.installed(0, other)
    assert t.state[0] == PRESENT


def test_claim_whole_run_all_missing() -> None:
    """The fast path: every page of the run is missing and held: all of it is ours."""
    t = PageTable(16)
    assert t.claim(4, b"\x02" * 8) == bytearray(b"\x01" * 8)
    assert states(t)[4:12] == [INSTALLING] * 8
    assert t.state[3] == MISSING and t.state[12] == MISSING


@pytest.mark.parametrize("busy_state", ["requested", "installing", "present"])
def test_claim_run_skips_exactly_the_busy_page(busy_state: str) -> None:
    t = PageTable(16)
    if busy_state == "requested":
        t.on_fault(7, 1)
    else:
        mine = t.claim(7, b"\x01")
        if busy_state == "present":
            t.installed(7, mine)
    before = states(t)
    mine = t.claim(4, b"\x02" * 8)
    if busy_state == "requested":  # a requested page may be installed by whoever holds it first
        assert mine == bytearray(b"\x01" * 8)
    else:
        assert mine == bytearray(b"\x01\x01\x01\x00\x01\x01\x01\x01")
        assert t.state[7] == before[7]


def test_claim_past_the_end_is_refused() -> None:
    t = PageTable(8)
    with pytest.raises(ValueError):
        t.claim(6, b"\x02" * 4)
    assert states(t) == [MISSING] * 8


# -- completion -------------------------------------------------------------------------


def test_all_present_is_set_by_the_last_install_only() -> None:
    t = PageTable(6)
    m1 = t.claim(0, b"\x01\x01\x01")
    t.installed(0, m1)
    assert not t.all_present.is_set()
    m2 = t.claim(3, b"\x01\x01\x02")
    assert not t.all_present.is_set()
    t.installed(3, m2)
    assert t.all_present.is_set()
    assert t.present == 6
    assert states(t).count(MISSING) == 0


def test_present_and_requested_counts() -> None:
    t = PageTable(10)
    t.on_fault(0, 1)
    t.request_window(0, 3, bytes(10))
    t.installed(5, t.claim(5, b"\x01\x01"))
    assert (t.present, states(t).count(REQUESTED)) == (2, 3)


# -- exactly once, under concurrency ------------------------------------------------------


def test_every_page_is_claimed_exactly_once_by_racing_installers() -> None:
    npages = 512
    t = PageTable(npages)
    wins = [bytearray(npages) for _ in range(6)]
    start = threading.Barrier(6)

    def installer(k: int) -> None:
        start.wait(timeout=5)
        # overlapping batches of different sizes and offsets, like demand vs bulk
        size = 7 + 5 * k
        first = (k * 13) % size
        for _ in range(2):
            pos = 0 if first == 0 else first - size
            while pos < npages:
                lo, hi = max(pos, 0), min(pos + size, npages)
                mine = t.claim(lo, b"\x01" * (hi - lo))
                for i, m in enumerate(mine):
                    wins[k][lo + i] += m
                t.installed(lo, mine)
                pos += size

    threads = [threading.Thread(target=installer, args=(k,), name=f"installer-{k}") for k in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=10)
        assert not th.is_alive()
    per_page = [sum(w[p] for w in wins) for p in range(npages)]
    assert per_page == [1] * npages
    assert t.present == npages
    assert t.all_present.is_set()


@settings(max_examples=200, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["fault", "window", "claim", "install", "unclaim"]), st.integers(0, 15), st.integers(1, 6)),
        max_size=60,
    )
)
def test_state_machine_never_installs_a_page_twice(ops: list[tuple[str, int, int]]) -> None:
    """Random interleavings of the table's operations keep its invariants."""
    npages = 16
    t = PageTable(npages)
    held: list[tuple[int, bytearray]] = []  # claims not yet installed or given back
    installs = [0] * npages
    for op, page, n in ops:
        n = min(n, npages - page)
        if op == "fault":
            t.on_fault(page, 1)
        elif op == "window":
            if t.on_fault(page, 1) == MISSING:
                assert 1 <= t.request_window(page, n, bytes(npages)) <= n
        elif op == "claim":
            mine = t.claim(page, b"\x01" * n)
            for i, m in enumerate(mine):
                if m:
                    assert all(not h[1][page + i - h[0]] for h in held if 0 <= page + i - h[0] < len(h[1]))
            held.append((page, mine))
        elif held:
            first, mine = held.pop(0)
            if op == "install":
                t.installed(first, mine)
                for i, m in enumerate(mine):
                    installs[first + i] += m
            else:
                t.unclaim(first, mine)
        assert max(installs) <= 1
        assert t.present == sum(installs) == t.state.count(PRESENT)
        assert all(t.state[p] == PRESENT for p in range(npages) if installs[p])
        assert t.all_present.is_set() == (t.present == npages)
        assert not any(t.state[p] == PRESENT for p in t.waiting)


def test_bulk_seek_after_a_fault_on_the_last_pages_wraps() -> None:
    """A fault in the last window must not seek past the end (the source refuses that)."""
    from migrator.dest.prefetch import Prefetcher
    from migrator.stats import DestStats

    seeks: list[int] = []

    class _Stream:
        def seek(self, page: int) -> None:
            seeks.append(page)

    p = Prefetcher(None, None, PageTable(100), bytes(100), DestStats(), "none", True, 64, lambda e: None)  # type: ignore[arg-type]
    p._stream = _Stream()  # type: ignore[assignment]
    p.after_fault(96, 4)
    assert seeks == [0]
