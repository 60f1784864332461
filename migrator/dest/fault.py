"""Fault threads (in the fault process): wait on the guest's userfaultfd and turn
each fault into an action.

Waiting: each fault thread has its own epoll instance holding the uffd with
EPOLLEXCLUSIVE, plus an eventfd that stops them all.  On this kernel a blocking
read() on a uffd, select, poll and plain epoll all wake EVERY waiting thread
for each fault; an exclusive epoll entry per thread wakes one.  One thread is
the default (``bench wakeups``: handling a fault never blocks here — a request
is a queue put — so a second thread only adds wake-ups); the uffd is
non-blocking, so a thread that loses the race to read just waits again.

The guest's memory events (REMOVE, UNMAP, REMAP: it discarded, unmapped or
moved part of its RAM) are read with the faults and applied first, with the
install gate held (``gate.py``); see :meth:`FaultHandler.event`.

Per fault (no thread hand-off on this path; ``pagestate.py`` for the states):
  page PRESENT     -> UFFDIO_WAKE (an install raced our read); or, if the kernel
                      has no page there (the guest discarded it), a zero page
  page DISCARDED   -> a zero page (what a discarded anonymous page reads as)
  page REQUESTED   -> nothing: the install that is coming wakes the vCPU
  page known zero  -> installed here, without the network
  page MISSING     -> a small window marked REQUESTED, one demand request, and
                      a hint to the lane that owns the page to continue past it

Every fault is recorded (page, time read, thread) so that its latency (until
its page's install, ``installed_ns``) and the per-vCPU blocked time can be
computed at the end.

Lifecycle: start() -> threads wait; stop() writes the eventfd and joins; only
then may the uffd be closed (never close an fd another thread waits on).
"""

from __future__ import annotations

import bisect
import os
import select
import threading
import time
from array import array
from collections.abc import Callable
from contextlib import nullcontext

from migrator import policy
from migrator.dest.gate import Gate
from migrator.dest.install import Installer
from migrator.dest.pagestate import (
    DISCARDED, DROPPING, EVENTS, GONE, HINTS, MISSING, PRESENT, REMAPS, REQUESTED, ZERO_READY, Counters, PageState,
)  # fmt: skip
from migrator.errors import RetryLater, Unmapped
from migrator.uffd.fd import Event, Fault, Userfaultfd
from migrator.workers import set_thread_name


DEFER_POLL_S = 0.0005  # with faults deferred: look at the uffd again this soon
MAX_DEFER_S = 10.0


class FaultHandler:
    """Decides what a fault needs, and applies the guest's memory events; called on
    the fault threads."""

    def __init__(
        self,
        uffd: Userfaultfd,
        ps: PageState,
        installer: Installer,
        base: int,
        page_size: int,
        request: Callable[[int, int], None],
        window: int,
        lane_starts: list[int],
        counters: Counters,
        discarded: Callable[[int, int], None] = lambda first, count: None,
    ) -> None:
        self.uffd, self.ps, self.installer = uffd, ps, installer
        self.base, self.psize = base, page_size
        self.request = request
        self.discarded = discarded  # tell the source: (first page, count)
        self.window = window
        self.lane_starts = lane_starts  # first page of each lane, ascending
        self.c = counters
        self.records: list[tuple[int, int, int]] = []  # (page, monotonic ns read, tid)
        self._last_seek = [0.0] * len(lane_starts)
        self._seek_pos = [-1] * len(lane_starts)
        # where guest RAM is: (start address, end address, first page), by start; one
        # segment until a remap moves pages
        self._where: tuple[list[tuple[int, int, int]], list[int]] = ([(base, base + ps.npages * page_size, 0)], [base])

    # -- faults --------------------------------------------------------------------------
    def __call__(self, f: Fault) -> None:
        """Handle a fault just read.  Raises RetryLater/Unmapped when the guest's
        address space is changing (an event queued, unread): the caller reads the
        events and calls :meth:`retry`."""
        page = self.page_of(f.address)
        self.c.add("faults")
        if page is not None:
            self.records.append((page, time.monotonic_ns(), f.ptid))
        self.resolve(f, page)

    def retry(self, f: Fault) -> None:
        """A fault deferred by RetryLater/Unmapped, after the events were read."""
        self.resolve(f, self.page_of(f.address))

    def resolve(self, f: Fault, page: int | None) -> None:
        ps, psize = self.ps, self.psize
        if page is None:
            # not a page of guest RAM: the tail an mremap grew (registered, new: zeros),
            # or an address no longer registered (the thread faults elsewhere)
            if not self.installer.install_zero_at(f.address, f.write):
                self.c.add("faults_spurious")
                self.uffd.wake(f.address & ~(psize - 1), psize)
            return
        st = ps.state[page]
        if st == PRESENT or st == DISCARDED:
            # PRESENT: an install raced our read (the kernel has the page: EEXIST, wake),
            # or the guest discarded it after its install (the kernel has none: zeros).
            if not self.installer.install_discarded(page, f.write, wait=False):
                self.c.add("faults_spurious")
                self.uffd.wake(self.address(page), psize)
        elif st == REQUESTED:
            return
        elif ps.words[ZERO_READY] and ps.zero[page]:
            if not self.installer.install_zero(page, f.write, wait=False):
                self.uffd.wake(self.address(page), psize)  # installed by another meanwhile
        elif st == MISSING:
            n = ps.request_window(page, self.window)
            self.request(page, n)
            self._hint(page + n)
        else:  # GONE (an address since reused by a mapping of its own) or DROPPING
            self.uffd.wake(f.address & ~(psize - 1), psize)

    def page_of(self, address: int) -> int | None:
        """The guest page at ``address`` now, or None outside guest RAM."""
        segs, starts = self._where  # one read: a remap on another thread replaces both at once
        i = bisect.bisect_right(starts, address) - 1
        if i < 0:
            return None
        start, end, first = segs[i]
        return first + (address - start) // self.psize if address < end else None

    def address(self, page: int) -> int:
        return self.ps.address(page) or self.base + page * self.psize

    def _hint(self, target: int) -> None:
        """Steer the lane that owns ``target`` past the fault (QEMU's spatial hint)."""
        if target >= self.ps.npages:
            return
        lane = bisect.bisect_right(self.lane_starts, target) - 1
        now = time.monotonic()
        if policy.should_seek(target, self._seek_pos[lane], now - self._last_seek[lane]):
            self._last_seek[lane], self._seek_pos[lane] = now, target
            self.ps.words[HINTS + lane] = target + 1

    # -- the guest's memory events (called with the install gate held: gate.py) ----------
    def event(self, ev: Event) -> None:
        """Apply a non-cooperative event (CRIU's uffd.c handles the same three).

        remove: [start, end) reads as zeros from now on: those pages become
        DISCARDED (never installed from the source again; a fault there gets a
        zero page) and the threads waiting on them are woken to fault again.
        unmap: no longer guest RAM: GONE (skipped by every installer).
        remap: the pages keep their identity at their new address.
        """
        ps = self.ps
        if ev.kind == "remap":
            self._remap(ev.start, ev.end, ev.length)
        else:
            remove = ev.kind == "remove"
            for first, count, addr in self._runs(ev.start, ev.end):
                before = bytes(ps.state[first : first + count])
                ps.state[first : first + count] = before.translate(_ON_REMOVE if remove else _ON_UNMAP)
                newly = before.translate(_NEWLY_DISCARDED if remove else _NEWLY_GONE)
                n = newly.count(1)
                if n:
                    self.c.add("discarded" if remove else "unmapped", n)
                    for i, k in policy.runs_of(newly, 1, max_run=1 << 30):
                        self.discarded(first + i, k)
                self.uffd.wake(addr, count * self.psize)  # threads waiting on them fault again
        ps.words[EVENTS] += 1

    def _runs(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """[(first page, pages, address)] of guest RAM within [start, end)."""
        out = []
        for s, e, first in self._where[0]:
            lo, hi = max(s, start), min(e, end)
            if lo < hi:
                ps = self.psize
                lo -= (lo - s) % ps
                out.append((first + (lo - s) // ps, (hi - lo + ps - 1) // ps, lo))
        return out

    def _remap(self, old: int, new: int, length: int) -> None:
        ps, psize = self.ps, self.psize
        addrs = ps.addrs.cast("Q")
        try:
            if not ps.words[REMAPS]:  # the first move: every page's address, written out
                addrs[:] = array("Q", range(self.base, self.base + ps.npages * psize, psize))
            moved = 0
            for first, count, addr in self._runs(old, old + length):
                to = new + (addr - old)
                addrs[first : first + count] = array("Q", range(to, to + count * psize, psize))
                moved += count
        finally:
            addrs.release()
        ps.words[REMAPS] += 1
        self.c.add("remapped", moved)
        runs = ps.address_runs(0, ps.npages, self.base, psize)
        segs = sorted((a, a + n * psize, p) for p, n, a in runs)
        self._where = (segs, [s for s, _e, _p in segs])


# remove: the guest's own discard (DISCARDED), or the drop of a stale pre-copied page the
# session asked for (DROPPING -> MISSING: it comes again); unmap: GONE
_ON_REMOVE = bytes(GONE if b == GONE else MISSING if b == DROPPING else DISCARDED for b in range(256))
_ON_UNMAP = bytes(GONE for _ in range(256))
_NEWLY_DISCARDED = bytes(1 if b in (MISSING, REQUESTED, PRESENT) else 0 for b in range(256))
_NEWLY_GONE = bytes(0 if b == GONE else 1 for b in range(256))


class FaultThreads:
    """The fault threads: each waits on its own exclusive epoll entry, reads the uffd
    with the install gate held (so events are applied before any installer looks
    at a page again), then handles the faults it read, gate released."""

    def __init__(self, uffd: Userfaultfd, handler: FaultHandler, nthreads: int, on_error: Callable[[BaseException], None],
                 gate: Gate | None = None, lanes: int = 0) -> None:  # fmt: skip
        self.uffd = uffd
        self.handler = handler
        self.on_error = on_error
        self.gate, self.lanes = gate, lanes
        self._stopfd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._threads = [threading.Thread(target=self._run, args=(i,), name=f"fault-{i}", daemon=True) for i in range(nthreads)]
        self._ready = threading.Barrier(nthreads + 1)

    def start(self) -> None:
        for t in self._threads:
            t.start()
        self._ready.wait(timeout=10)  # every thread is waiting before the guest runs

    def _run(self, i: int) -> None:
        set_thread_name(f"fault-{i}")
        ep = select.epoll()
        try:
            ep.register(self.uffd.fd, select.EPOLLIN | select.EPOLLEXCLUSIVE)
            ep.register(self._stopfd, select.EPOLLIN)
            self._ready.wait(timeout=10)
            stopfd, read, handle, apply = self._stopfd, self.uffd.read_messages, self.handler, self.handler.event
            gate, lanes = self.gate, self.lanes
            # faults refused while the guest's address space changes (EAGAIN: an event is
            # queued, unread): this thread reads the events next, then handles them again
            deferred: list[Fault] = []
            deferred_since = 0.0
            while True:
                events = ep.poll(DEFER_POLL_S if deferred else -1)
                if any(fd == stopfd for fd, _ in events):
                    return
                with gate.reading(lanes) if gate is not None else nullcontext():
                    msgs = read()
                    faults = []
                    for m in msgs:
                        if isinstance(m, Fault):
                            faults.append(m)
                        else:
                            apply(m)
                again, deferred = deferred, []
                for f in again:
                    try:
                        self.handler.retry(f)
                    except (RetryLater, Unmapped):
                        deferred.append(f)
                for f in faults:
                    try:
                        handle(f)
                    except (RetryLater, Unmapped):
                        deferred.append(f)
                if not deferred:
                    deferred_since = 0.0
                elif not deferred_since:
                    deferred_since = time.monotonic()
                elif time.monotonic() - deferred_since > MAX_DEFER_S:
                    raise RetryLater("faults refused for 10 s: the guest's address space never settled")
        except BaseException as exc:  # noqa: BLE001 - reported to the session, which ends the migration
            self.on_error(exc)
        finally:
            ep.close()

    def stop(self, timeout: float = 5.0) -> None:
        os.eventfd_write(self._stopfd, 1)
        for t in self._threads:
            if t.is_alive() and t is not threading.current_thread():
                t.join(timeout)
        os.close(self._stopfd)
