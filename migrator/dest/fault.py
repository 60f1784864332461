"""Fault threads (in the fault process): wait on the guest's userfaultfd and turn
each fault into an action.

Waiting: each fault thread has its own epoll instance holding the uffd with
EPOLLEXCLUSIVE, plus an eventfd that stops them all.  On this kernel a blocking
read() on a uffd, select, poll and plain epoll all wake EVERY waiting thread
for each fault; an exclusive epoll entry per thread wakes one.  One thread is
the default (``bench wakeups``: handling a fault never blocks here — a request
is a queue put — so a second thread only adds wake-ups); the uffd is
non-blocking, so a thread that loses the race to read just waits again.

Per fault (no thread hand-off on this path; ``pagestate.py`` for the states):
  page PRESENT     -> UFFDIO_WAKE (an install raced our read)
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
from collections.abc import Callable

from migrator import policy
from migrator.dest.install import Installer
from migrator.dest.pagestate import HINTS, MISSING, PRESENT, REQUESTED, ZERO_READY, Counters, PageState
from migrator.errors import MigratorError
from migrator.uffd.fd import Fault, Userfaultfd
from migrator.workers import set_thread_name


class FaultHandler:
    """Decides what a fault needs; called on the fault threads."""

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
    ) -> None:
        self.uffd, self.ps, self.installer = uffd, ps, installer
        self.base, self.psize = base, page_size
        self.request = request
        self.window = window
        self.lane_starts = lane_starts  # first page of each lane, ascending
        self.c = counters
        self.records: list[tuple[int, int, int]] = []  # (page, monotonic ns read, tid)
        self._last_seek = [0.0] * len(lane_starts)
        self._seek_pos = [-1] * len(lane_starts)

    def __call__(self, f: Fault) -> None:
        page = (f.address - self.base) // self.psize
        ps = self.ps
        if not 0 <= page < ps.npages:
            raise MigratorError("fault outside guest RAM", addr=f.address)
        self.c.add("faults")
        self.records.append((page, time.monotonic_ns(), f.ptid))
        st = ps.state[page]
        if st == PRESENT:
            self.c.add("faults_spurious")
            self.uffd.wake(self.base + page * self.psize, self.psize)
        elif st == REQUESTED:
            return
        elif ps.words[ZERO_READY] and ps.zero[page]:
            self.installer.install_zero(page, f.write)
        elif st == MISSING:
            n = ps.request_window(page, self.window)
            self.request(page, n)
            self._hint(page + n)

    def _hint(self, target: int) -> None:
        """Steer the lane that owns ``target`` past the fault (QEMU's spatial hint)."""
        if target >= self.ps.npages:
            return
        lane = bisect.bisect_right(self.lane_starts, target) - 1
        now = time.monotonic()
        if policy.should_seek(target, self._seek_pos[lane], now - self._last_seek[lane]):
            self._last_seek[lane], self._seek_pos[lane] = now, target
            self.ps.words[HINTS + lane] = target + 1


class FaultThreads:
    def __init__(self, uffd: Userfaultfd, handler: Callable[[Fault], None], nthreads: int, on_error: Callable[[BaseException], None]) -> None:
        self.uffd = uffd
        self.handler = handler
        self.on_error = on_error
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
            stopfd, read_faults, handle = self._stopfd, self.uffd.read_faults, self.handler
            while True:
                events = ep.poll()
                if any(fd == stopfd for fd, _ in events):
                    return
                for f in read_faults():
                    handle(f)
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
