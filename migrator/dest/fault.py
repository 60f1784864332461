"""Fault threads: wait on the guest's userfaultfd and turn each fault into an action.

Wake-one waiting: every fault thread has its own epoll instance holding the uffd
with EPOLLEXCLUSIVE, plus a shared eventfd that stops them all.  On this kernel
a blocking read() on a uffd, select, poll and plain epoll all wake EVERY waiting
thread for each fault; an exclusive epoll entry per thread wakes one.  The uffd
is non-blocking, so a thread that loses the race to read just goes back to wait.

Per fault (no thread hand-off on this path):
  page PRESENT            -> UFFDIO_WAKE (the install raced our read)
  page REQUESTED/INSTALLING -> nothing; the UFFDIO_COPY that installs it wakes the vCPU
  page known zero         -> install here, without the network
  page MISSING            -> mark a small window REQUESTED, send one demand request,
                             and steer the bulk stream past it (locality)

Lifecycle: start() -> threads wait; stop() writes the eventfd and joins; only
then may the uffd be closed (never close an fd another thread waits on).
"""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Callable

from migrator.dest.pagetable import MISSING, PRESENT, PageTable
from migrator.dest.install import Installer
from migrator.errors import MigratorError
from migrator.uffd.fd import Fault, Userfaultfd


class FaultHandler:
    """Decides what a fault needs; called on the fault threads."""

    def __init__(
        self,
        uffd: Userfaultfd,
        table: PageTable,
        installer: Installer,
        zero_map: bytes,
        base: int,
        page_size: int,
        request: Callable[[int, int], None],
        window: int,
    ) -> None:
        self.uffd, self.table, self.installer = uffd, table, installer
        self.zero_map = zero_map
        self.base, self.ps = base, page_size
        self.request = request
        self.window = window
        self.faults = 0
        self.spurious = 0

    def __call__(self, f: Fault) -> None:
        page = (f.address - self.base) // self.ps
        if not 0 <= page < self.table.npages:
            raise MigratorError("fault outside guest RAM", addr=f.address)
        self.faults += 1
        st = self.table.on_fault(page, f.ptid)
        if st == PRESENT:
            self.spurious += 1
            self.uffd.wake(self.base + page * self.ps, self.ps)
        elif st != MISSING:
            return
        elif self.zero_map[page]:
            self.installer.install_zero(page, f.write)
        else:
            n = self.table.request_window(page, self.window, self.zero_map)
            self.request(page, n)


class FaultThreads:
    def __init__(self, uffd: Userfaultfd, handler: Callable[[Fault], None], nthreads: int, on_error: Callable[[BaseException], None]) -> None:
        self.uffd = uffd
        self.handler = handler
        self.on_error = on_error
        self._stopfd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._threads = [threading.Thread(target=self._run, name=f"fault-{i}", daemon=True) for i in range(nthreads)]
        self._ready = threading.Barrier(nthreads + 1)

    def start(self) -> None:
        for t in self._threads:
            t.start()
        self._ready.wait(timeout=10)  # every thread is waiting before the guest runs

    def _run(self) -> None:
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
