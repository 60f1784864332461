"""The destination's page state, shared by the session, the fault process and the lanes.

One byte per page::

    MISSING --(a fault: the fault process asks for it)--> REQUESTED --+
       |                                                                +--(UFFDIO_COPY/ZEROPAGE succeeded)--> PRESENT
       +----------------------------------------------------------------+
    any of them --(the guest discards it: EVENT_REMOVE)--> DISCARDED --(faulted)--> zero page, PRESENT
    any of them --(the guest unmaps it: EVENT_UNMAP)--> GONE (no longer guest RAM)
    PRESENT --(pre-copied, stale: the session asks the guest to drop it)--> DROPPING
        --(its EVENT_REMOVE)--> MISSING (it comes again from the source)

DISCARDED and GONE are set only by the fault process, which reads the guest's
events, and only while it holds the install gate (``gate.py``): no installer
is between its check of a page and its ioctl then, so no old copy of a page
is ever installed after the guest discarded it.

One owner per transition: only the fault process moves a page to REQUESTED
(so a page is requested at most once per connection); any installer (the
fault process for demand replies and known-zero faults, a lane for its bulk
batches) moves a page to PRESENT, and only after the kernel took it.  Two
installers may race for one page (a demand reply and a bulk batch): the
kernel is the final arbiter — ``UFFDIO_COPY`` never overwrites a present page,
the loser gets ``EEXIST`` and counts a duplicate — so no page is ever
installed twice, whatever the races, and no lock is needed.  A fault on a
REQUESTED page needs nothing: the install that is coming wakes it.

Header words, one writer each:

=====================  ============  =====================================
word                   writer        meaning
=====================  ============  =====================================
0 EPOCH                session       the migration
1 ZERO_READY           lane 0        1 once ``zero`` holds the source's map
2 OUTSTANDING          fault proc    demand requests not yet answered
3 EVENTS               fault proc    guest memory events handled so far (installers
                                     that got EAGAIN wait for it to move)
4 REMAPS               fault proc    remaps so far (0: every page at base + i * page size)
5 READING              fault proc    1 while it reads the uffd (installers wait: ``gate.py``)
16 + 16k ...           process k     its counters (``COUNTERS``)
HINTS + i              fault proc    lane i: continue at this page + 1
=====================  ============  =====================================

Maps: ``state`` (above), ``zero`` (1 = never touched on the source),
``installed_ns`` (8 bytes per page: CLOCK_MONOTONIC ns of its install, written
by whoever installed it; fault latencies are read from it at the end).
"""

from __future__ import annotations

import struct
import time

from migrator.pagemaps import FLAG_OMITTED
from migrator.shm import Shared

MISSING, REQUESTED, DROPPING, PRESENT, DISCARDED, GONE = 0, 1, 2, 3, 4, 5
EPOCH, ZERO_READY, OUTSTANDING, EVENTS, REMAPS, READING = 0, 1, 2, 3, 4, 5
FIRST_SLOT, SLOT_WORDS, MAX_PROCS = 16, 16, 65  # slot 0: the fault process; 1..64: lanes
HINTS = FIRST_SLOT + SLOT_WORDS * MAX_PROCS
MAX_LANES = 64
HEADER_WORDS = HINTS + MAX_LANES
COUNTERS = (
    "installed", "data_pages", "zero_pages", "duplicates", "kernel_eexist", "kernel_eagain", "wire_bytes",
    "raw_bytes", "batches", "demand_requests", "faults", "faults_spurious", "zero_local", "discarded",
    "unmapped", "remapped",
)  # fmt: skip
# translate tables: 0xFF for pages still to install (MISSING, REQUESTED); 1 for pages done
_TO_INSTALL = bytes(0xFF if b in (MISSING, REQUESTED) else 0 for b in range(256))
_DEAD = bytes(1 if b in (DISCARDED, GONE) else 0 for b in range(256))
_DONE = bytes(1 if b in (PRESENT, DISCARDED, GONE) else 0 for b in range(256))
_NS = struct.Struct("<Q")


class PageState:
    def __init__(self, shared: Shared, npages: int) -> None:
        self.sh = shared
        self.npages = npages
        self.words = shared.words
        self.state = shared.regions["state"]
        self.zero = shared.regions["zero"]
        self.installed_ns = shared.regions["installed_ns"]
        self.addrs = shared.regions["addrs"]  # 8 bytes per page: its address once a remap happened

    @classmethod
    def create(cls, npages: int) -> "PageState":
        return cls(Shared.create("migrator-dest", HEADER_WORDS, _layout(npages)), npages)

    @classmethod
    def attach(cls, fd: int, npages: int) -> "PageState":
        return cls(Shared(fd, HEADER_WORDS, _layout(npages)), npages)

    @property
    def fd(self) -> int:
        return self.sh.fd

    # -- the maps --------------------------------------------------------------------
    def not_present_mask(self, first: int, count: int) -> bytes:
        """0xFF for each page of [first, first+count) still to install, 0x00 for the others
        (present, discarded by the guest, no longer guest RAM)."""
        return bytes(self.state[first : first + count]).translate(_TO_INSTALL)

    def dead_count(self, first: int, count: int, flags: bytes) -> int:
        """Pages of [first, first+count) discarded or unmapped by the guest, among those
        ``flags`` (a batch's, one per page) says were received (not FLAG_OMITTED)."""
        dead = bytes(self.state[first : first + count]).translate(_DEAD)
        if not dead.count(1):
            return 0
        return sum(1 for d, f in zip(dead, flags) if d and f != FLAG_OMITTED)

    def done(self) -> int:
        """Pages that need nothing more: present, discarded, or no longer guest RAM."""
        return bytes(self.state).translate(_DONE).count(1)

    def address(self, page: int) -> int:
        """Where ``page`` is in the guest now (0 before any remap: base + page * size)."""
        return int(_NS.unpack_from(self.addrs, page * 8)[0])

    def address_runs(self, first: int, count: int, base: int, page_size: int) -> list[tuple[int, int, int]]:
        """[(first page, pages, address)] of [first, first+count), split where a remap moved pages."""
        if not self.words[REMAPS]:
            return [(first, count, base + first * page_size)]
        addrs = self.addrs[first * 8 : (first + count) * 8].cast("Q")
        out: list[tuple[int, int, int]] = []
        start = 0
        for i in range(1, count + 1):
            if i == count or addrs[i] != addrs[i - 1] + page_size:
                out.append((first + start, i - start, int(addrs[start])))
                start = i
        return out

    def mark_present(self, first: int, count: int, now_ns: int | None = None) -> None:
        """Caller's install of these pages succeeded (the kernel took them)."""
        self.state[first : first + count] = b"\x03" * count
        t = time.monotonic_ns() if now_ns is None else now_ns
        self.installed_ns[first * 8 : (first + count) * 8] = _NS.pack(t) * count

    def request_window(self, first: int, limit: int) -> int:
        """Mark ``first`` and the MISSING, not known-zero pages after it REQUESTED
        (fault process only); returns the window's length (at least 1)."""
        end = min(first + limit, self.npages)
        st, zero = self.state, self.zero
        n = 1
        st[first] = REQUESTED
        zero_ready = self.words[ZERO_READY]
        while first + n < end and st[first + n] == MISSING and not (zero_ready and zero[first + n]):
            st[first + n] = REQUESTED
            n += 1
        return n

    def missing_map(self) -> bytes:
        """One byte per page, 1 = still to install (what a reconnected lane asks for again)."""
        return bytes(self.state).translate(_TO_INSTALL).replace(b"\xff", b"\x01")

    def installed_at(self, page: int) -> int:
        return int(_NS.unpack_from(self.installed_ns, page * 8)[0])

    # -- counters ------------------------------------------------------------------------
    def counters(self, slot: int) -> "Counters":
        return Counters(self, slot)

    def total(self, name: str, nslots: int) -> int:
        k = COUNTERS.index(name)
        return sum(self.words[FIRST_SLOT + SLOT_WORDS * s + k] for s in range(nslots))

    def totals(self, nslots: int) -> dict[str, int]:
        return {name: self.total(name, nslots) for name in COUNTERS}

    def close(self) -> None:
        self.sh.close()


class Counters:
    """One process's counters (it alone writes them)."""

    def __init__(self, ps: PageState, slot: int) -> None:
        self._w = ps.words
        base = FIRST_SLOT + SLOT_WORDS * slot
        self._i = {name: base + k for k, name in enumerate(COUNTERS)}

    def add(self, name: str, n: int = 1) -> None:
        if n:
            i = self._i[name]
            self._w[i] += n

    def get(self, name: str) -> int:
        return int(self._w[self._i[name]])


def _layout(npages: int) -> list[tuple[str, int]]:
    return [("state", npages), ("zero", npages), ("installed_ns", npages * 8), ("addrs", npages * 8)]
