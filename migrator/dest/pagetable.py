"""The one table of received / in-flight pages on the destination.

Every page is in exactly one state::

    MISSING --(fault or demand window)--> REQUESTED --+
       |                                               +--(claimed by an installer)--> INSTALLING --> PRESENT
       +-----------------------------------------------+

* Only a page in MISSING is ever requested on the urgent channel, so a page is
  requested at most once (CRIU's ``is_page_queued``, QEMU's ``receivedmap``).
* Only the caller that moved a page to INSTALLING may install it, so a page is
  installed exactly once, whichever channel's copy arrives first; the later
  copy is counted as a duplicate and dropped.
* A fault on a REQUESTED or INSTALLING page needs no action: the UFFDIO_COPY
  that installs it wakes the faulting thread.

Owner: this object; its lock is a leaf (nothing else is acquired while it is
held, and no syscall is made under it).
"""

from __future__ import annotations

import threading
import time

MISSING, REQUESTED, INSTALLING, PRESENT = 0, 1, 2, 3
_INSTALLING, _PRESENT, _ONE = bytes([INSTALLING]), bytes([PRESENT]), b"\x01"


class PageTable:
    def __init__(self, npages: int) -> None:
        self.npages = npages
        self.state = bytearray(npages)
        self.present = 0
        self.all_present = threading.Event()
        self._lock = threading.Lock()
        # page -> (time the fault was read, faulting thread id) for pages a vCPU waits on
        self.waiting: dict[int, tuple[int, int]] = {}

    def on_fault(self, page: int, ptid: int) -> int:
        """Record a fault; returns the page's state before (MISSING -> now REQUESTED)."""
        with self._lock:
            st = self.state[page]
            if st != PRESENT and page not in self.waiting:
                self.waiting[page] = (time.perf_counter_ns(), ptid)
            if st == MISSING:
                self.state[page] = REQUESTED
            return st

    def request_window(self, first: int, limit: int, exclude: bytes) -> int:
        """Mark MISSING pages first+1.. as REQUESTED while contiguous; returns the run length.

        ``first`` itself must already be REQUESTED by the caller; pages flagged in
        ``exclude`` (e.g. known zero) end the window.
        """
        with self._lock:
            n = 1
            end = min(first + limit, self.npages)
            st = self.state
            while first + n < end and st[first + n] == MISSING and not exclude[first + n]:
                st[first + n] = REQUESTED
                n += 1
            return n

    def claim(self, first: int, flags: bytes | bytearray) -> bytearray:
        """Claim pages for installing: returns a mask (1 = yours to install).

        ``flags[i]`` nonzero means the caller holds page ``first+i``'s contents.
        """
        n = len(flags)
        if first + n > self.npages:
            raise ValueError(f"pages {first}+{n} outside the table of {self.npages}")
        with self._lock:
            st = self.state
            seg = st[first : first + n]
            if not seg.count(INSTALLING) and not seg.count(PRESENT) and not flags.count(0):
                # the common case, at C speed: every page is ours
                st[first : first + n] = _INSTALLING * n
                return bytearray(_ONE * n)
            mine = bytearray(n)
            for i in range(n):
                if flags[i] and st[first + i] < INSTALLING:
                    st[first + i] = INSTALLING
                    mine[i] = 1
        return mine

    def installed(self, first: int, mine: bytes | bytearray) -> list[tuple[int, int, int]]:
        """Mark claimed pages PRESENT; returns (page, fault_time_ns, ptid) of waited-on pages."""
        woken = []
        n = len(mine)
        with self._lock:
            st = self.state
            k = mine.count(1)
            if k == n:
                st[first : first + n] = _PRESENT * n
            else:
                for i, m in enumerate(mine):
                    if m:
                        st[first + i] = PRESENT
            # few vCPUs wait at any time: walk the waiters, not the pages
            if self.waiting:
                for page in [p for p in self.waiting if first <= p < first + n and mine[p - first]]:
                    t, tid = self.waiting.pop(page)
                    woken.append((page, t, tid))
            self.present += k
            if self.present == self.npages:
                self.all_present.set()
        return woken

    def unclaim(self, first: int, mine: bytes | bytearray) -> None:
        """Give claimed pages back (install failed); they are MISSING again."""
        with self._lock:
            for i, m in enumerate(mine):
                if m:
                    self.state[first + i] = MISSING
