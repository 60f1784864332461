"""Shared memory between a session and its worker processes.

One memfd, mapped by every process of one side: a header of 64-bit words
(fixed slots, each written by one process) and page maps of one byte per page
(``bytes``-like slices: searched and combined at C speed).  The session
creates it and passes the descriptor to its workers (``pass_fds``).

Who writes what is stated where each layout is defined (``source/shared.py``,
``dest/pagestate.py``): one writer per word, so no lock is needed for the
header; a map byte may be written by two processes only where both write the
same value or the kernel arbitrates (see those modules).
"""

from __future__ import annotations

import mmap
import os

WORD = 8


class Shared:
    """A mapped memfd: ``words`` (the header, 64-bit) and named byte regions after it."""

    def __init__(self, fd: int, header_words: int, regions: list[tuple[str, int]], create: bool = False) -> None:
        self.fd = fd
        self.header_words = header_words
        header = header_words * WORD
        size = header + sum(n for _, n in regions)
        size = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
        if create:
            os.ftruncate(fd, size)
        self.map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self.map)
        self.words = self.view[:header].cast("Q")
        self.regions: dict[str, memoryview] = {}
        self.offsets: dict[str, int] = {}
        off = header
        for name, n in regions:
            self.regions[name] = self.view[off : off + n]
            self.offsets[name] = off
            off += n

    @classmethod
    def create(cls, name: str, header_words: int, regions: list[tuple[str, int]]) -> "Shared":
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        return cls(fd, header_words, regions, create=True)

    def close(self) -> None:
        for r in self.regions.values():
            r.release()
        self.words.release()
        self.view.release()
        self.map.close()
        try:
            os.close(self.fd)
        except OSError:
            pass
