"""The destination's shared page state and the fault handler's decisions, without
processes or a real userfaultfd (a recording stand-in for the three ioctls the
handler makes; the real ioctls are tested in test_uffd_bindings.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migrator.dest.fault import FaultHandler
from migrator.dest.pagestate import HINTS, MISSING, PRESENT, REQUESTED, ZERO_READY, PageState
from migrator.source.serving import lane_range
from migrator.uffd.fd import Fault

PS = 4096
BASE = 0x7F00_0000_0000


@pytest.fixture
def ps() -> Iterator[PageState]:
    p = PageState.create(64)
    yield p
    p.close()


# -- the maps ------------------------------------------------------------------------------
def test_request_window_takes_contiguous_missing_pages_up_to_the_limit(ps: PageState) -> None:
    assert ps.request_window(10, 4) == 4
    assert list(ps.state[10:15]) == [REQUESTED] * 4 + [MISSING]


def test_request_window_stops_at_a_page_that_is_not_missing(ps: PageState) -> None:
    ps.mark_present(12, 1)
    assert ps.request_window(10, 8) == 2
    assert ps.state[12] == PRESENT


def test_request_window_stops_at_a_known_zero_page_once_the_map_is_in(ps: PageState) -> None:
    ps.zero[13] = 1
    assert ps.request_window(10, 8) == 8  # the map is not in yet: nothing is known to be zero
    ps2 = PageState.create(64)
    try:
        ps2.zero[13] = 1
        ps2.words[ZERO_READY] = 1
        assert ps2.request_window(10, 8) == 3
    finally:
        ps2.close()


def test_request_window_stops_at_the_end_of_ram(ps: PageState) -> None:
    assert ps.request_window(62, 8) == 2


def test_mark_present_records_when(ps: PageState) -> None:
    t0 = time.monotonic_ns()
    ps.mark_present(5, 3)
    t1 = time.monotonic_ns()
    assert list(ps.state[4:9]) == [MISSING, PRESENT, PRESENT, PRESENT, MISSING]
    assert all(t0 <= ps.installed_at(p) <= t1 for p in (5, 6, 7)) and ps.installed_at(4) == 0


def test_not_present_mask_and_missing_map(ps: PageState) -> None:
    ps.mark_present(1, 2)
    ps.request_window(5, 1)
    assert ps.not_present_mask(0, 6) == bytes([0xFF, 0, 0, 0xFF, 0xFF, 0xFF])
    m = ps.missing_map()
    assert len(m) == 64 and m[:6] == bytes([1, 0, 0, 1, 1, 1]) and m.count(1) == 62


def test_counters_are_per_process_and_sum(ps: PageState) -> None:
    a, b = ps.counters(0), ps.counters(3)
    a.add("installed", 5)
    b.add("installed", 7)
    b.add("duplicates")
    assert ps.total("installed", 4) == 12 and ps.totals(4)["duplicates"] == 1 and a.get("installed") == 5


def test_a_second_mapping_sees_the_same_state(ps: PageState) -> None:
    import os

    other = PageState.attach(os.dup(ps.fd), 64)
    try:
        ps.mark_present(9, 1)
        other.words[ZERO_READY] = 1
        assert other.state[9] == PRESENT and ps.words[ZERO_READY] == 1
    finally:
        other.close()


# -- the fault handler ---------------------------------------------------------------------------
class Recorder:
    """Stands in for the uffd and the installer; records what the handler asked for."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []

    def wake(self, addr: int, length: int) -> None:
        self.calls.append(("wake", (addr - BASE) // PS, length // PS))

    def install_zero(self, page: int, write: bool, wait: bool = True) -> bool:
        self.calls.append(("zero", page, int(write)))
        return True

    def install_zero_at(self, address: int, write: bool) -> bool:
        """False: not registered there (ENOENT), as outside guest RAM."""
        self.calls.append(("zero-at", (address - BASE) // PS, int(write)))
        return False

    def install_discarded(self, page: int, write: bool, wait: bool = True) -> bool:
        """False: the kernel has a page there (EEXIST), as after an install raced the fault."""
        self.calls.append(("try-zero", page, int(write)))
        return False


def handler(ps: PageState, lanes: int = 2, window: int = 4) -> tuple[FaultHandler, Recorder, list[tuple[int, int]]]:
    rec = Recorder()
    requests: list[tuple[int, int]] = []
    starts = [lane_range(i, lanes, ps.npages)[0] for i in range(lanes)]
    h = FaultHandler(rec, ps, rec, BASE, PS, lambda p, n: requests.append((p, n)), window, starts, ps.counters(0))  # type: ignore[arg-type]
    return h, rec, requests


def fault(page: int, write: bool = False, tid: int = 1) -> Fault:
    return Fault(BASE + page * PS + 123, write, tid)


def test_fault_on_a_missing_page_requests_a_window_and_hints_its_lane(ps: PageState) -> None:
    h, rec, reqs = handler(ps)
    h(fault(40))
    assert reqs == [(40, 4)] and rec.calls == []
    assert list(ps.state[40:44]) == [REQUESTED] * 4
    assert ps.words[HINTS + 1] == 44 + 1  # lane 1 owns pages 32..63: continue past the window
    assert h.records[0][0] == 40 and h.records[0][2] == 1


def test_fault_on_a_requested_page_needs_nothing(ps: PageState) -> None:
    h, rec, reqs = handler(ps)
    h(fault(40))
    h(fault(41, tid=2))
    assert reqs == [(40, 4)] and rec.calls == []
    assert [r[0] for r in h.records] == [40, 41]  # both vCPUs wait: both are timed


def test_fault_on_a_present_page_is_woken(ps: PageState) -> None:
    h, rec, reqs = handler(ps)
    ps.mark_present(7, 1)
    h(fault(7))
    # the kernel is asked first (it may have lost the page to a discard: then zeros)
    assert rec.calls == [("try-zero", 7, 0), ("wake", 7, 1)] and reqs == [] and ps.counters(0).get("faults_spurious") == 1


def test_fault_on_a_known_zero_page_is_resolved_here(ps: PageState) -> None:
    h, rec, reqs = handler(ps)
    ps.zero[9] = 1
    h(fault(9, write=True))
    assert reqs == [(9, 4)]  # no map yet: nothing is known to be zero, ask the source
    ps.words[ZERO_READY] = 1
    ps.zero[20] = 1
    h(fault(20, write=True))
    assert rec.calls == [("zero", 20, 1)]


def test_fault_outside_guest_ram_is_woken_and_ignored(ps: PageState) -> None:
    """Not a page of guest RAM: a zero page if the address is registered (the tail an
    mremap grew), else (ENOENT: a fault read just before the event that moved or
    unmapped its page) the thread is let go; nothing is requested."""
    h, rec, reqs = handler(ps)
    h(Fault(BASE + 64 * PS + 5, False, 1))
    assert rec.calls == [("zero-at", 64, 0), ("wake", 64, 1)] and reqs == [] and ps.counters(0).get("faults_spurious") == 1


def test_a_fault_in_the_last_window_never_hints_past_the_end(ps: PageState) -> None:
    h, _, reqs = handler(ps)
    h(fault(62))
    assert reqs == [(62, 2)] and ps.words[HINTS + 1] == 0


@settings(max_examples=200, deadline=None)
@given(pages=st.lists(st.integers(0, 63), max_size=60))
def test_a_page_is_requested_at_most_once(pages: list[int]) -> None:
    ps = PageState.create(64)
    try:
        h, _, reqs = handler(ps, window=3)
        for p in pages:
            h(fault(p))
        asked = [p for first, n in reqs for p in range(first, first + n)]
        assert len(asked) == len(set(asked))
        assert set(asked) == {p for p in range(64) if ps.state[p] == REQUESTED}
    finally:
        ps.close()
