"""The install gate: no installer is between its check of a page and its ioctl
while the fault process reads the guest's memory events.

Why: when the guest discards a page (madvise DONTNEED), the kernel queues an
EVENT_REMOVE and holds the guest's thread until the event is *read*; only then
does it zap the range.  An installer (a lane, the demand receiver) that checked
the page before the fault process marked it DISCARDED, and whose UFFDIO_COPY
lands after the zap, would put the source's old copy where the guest expects
zeros.  A single-threaded handler (CRIU's lazy-pages, Firecracker's examples)
cannot race with itself; several processes can.  So the fault process reads the
uffd and applies its events with every installer's gate held, and an installer
holds its own gate from its check of a chunk to the end of the chunk's ioctls.
Installs are cut into chunks of ``CHUNK_PAGES`` so that a read waits at most
for one chunk's copy per lane.

Mechanism: open-file-description locks (``F_OFD_SETLKW``) on bytes of the
shared-memory file.  Byte ``slot`` (1..lanes) is lane ``slot - 1``'s gate; the
reader takes them all.  A lane re-takes its gate right after letting it go,
and the kernel's file locks are not fair, so the reader announces itself
first: it holds byte 0 and sets the ``READING`` word, and an installer that
sees the word waits on byte 0 before taking its own gate.  Each process opens
its own description of the file (locks of one description never conflict
with each other); the kernel drops a dead process's locks.  Inside the fault
process, its reader and its own installs (the demand receiver, zero pages for
faults) share a ``threading.Lock`` instead (slot 0).
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from migrator.dest.pagestate import EVENTS, READING

CHUNK_PAGES = 64  # a read of the uffd waits for at most one chunk's copy per lane (256 KiB: ~0.1 ms)
_FLOCK = struct.Struct("hhqqi4x")  # struct flock (x86-64, aarch64): type, whence, start, len, pid


class Gate:
    """One process's side of the gate over the page state's shared-memory file."""

    def __init__(self, shm_fd: int, words: Any) -> None:
        self.fd = os.open(f"/proc/self/fd/{shm_fd}", os.O_RDWR | os.O_CLOEXEC)  # our own description
        self.words = words
        self.local = threading.Lock()  # the fault process: its reader and its own installs

    def _lock(self, kind: int, start: int, length: int) -> None:
        fcntl.fcntl(self.fd, fcntl.F_OFD_SETLKW, _FLOCK.pack(kind, os.SEEK_SET, start, length, 0))

    @contextmanager
    def installing(self, slot: int) -> Iterator[None]:
        """An installer's turn (slot 0: the fault process; 1..: lanes): its check of a
        chunk and the ioctls that install it."""
        if slot == 0:
            with self.local:
                yield
            return
        if self.words[READING]:  # the reader is in or on its way: after it
            self._lock(fcntl.F_RDLCK, 0, 1)
            self._lock(fcntl.F_UNLCK, 0, 1)
        self._lock(fcntl.F_WRLCK, slot, 1)
        try:
            yield
        finally:
            self._lock(fcntl.F_UNLCK, slot, 1)

    @contextmanager
    def reading(self, lanes: int) -> Iterator[None]:
        """The fault process reads the uffd and applies the events: no installer in between."""
        with self.local:
            if lanes == 0:
                yield
                return
            self._lock(fcntl.F_WRLCK, 0, 1)
            self.words[READING] = 1
            try:
                self._lock(fcntl.F_WRLCK, 1, lanes)  # waits for the chunks in flight
                try:
                    yield
                finally:
                    self._lock(fcntl.F_UNLCK, 1, lanes)
            finally:
                self.words[READING] = 0
                self._lock(fcntl.F_UNLCK, 0, 1)

    def close(self) -> None:
        os.close(self.fd)


def wait_for_events(words: Any, seen: int, timeout: float = 0.2) -> None:
    """After EAGAIN (the guest's address space is changing: an event is queued and
    not yet read), wait until the fault process has read and applied events
    (``EVENTS`` moved past ``seen``), or ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while words[EVENTS] == seen and time.monotonic() < deadline:
        time.sleep(0.0002)
