"""Read a paused guest's RAM from outside the guest.

Two ways.  A guest whose RAM is a memfd (a source's guest_sim, like QEMU's
memory-backend-memfd) passes it to its monitor: :class:`MappedRam` maps it
read-only and serves pages as views of the mapping, with no copy at all
(reading /proc/PID/mem copies every byte twice in the kernel: 0.7-0.8 s of CPU
per GiB here, the largest cost of a source lane).  Otherwise (a guest that
arrived by migration, in private anonymous memory) :class:`RamReader` reads
``/proc/PID/mem`` with ``preadv`` into a reusable buffer (the syscall releases
the GIL).  ``/proc/PID/pagemap`` tells which pages were never touched (neither
present nor swapped): those are zero and are never read or sent.
"""

from __future__ import annotations

import mmap
import os

from migrator.errors import GuestError

PM_PRESENT = 1 << 63
PM_SWAPPED = 1 << 62
# The top byte of a little-endian pagemap entry holds both bits.
_TOUCHED_BITS = (PM_PRESENT | PM_SWAPPED) >> 56
_UNTOUCHED_TABLE = bytes(0 if b & _TOUCHED_BITS else 1 for b in range(256))


class RamReader:
    """The guest's RAM and pagemap; with ``mem_fd`` (a worker), RAM only, through that descriptor."""

    def __init__(self, pid: int, addr: int, size: int, page_size: int, mem_fd: int | None = None) -> None:
        self.pid, self.addr, self.size, self.page_size = pid, addr, size, page_size
        self.npages = size // page_size
        # Both are opened once, up front: reading them later needs no new descriptor.
        self._mem = mem_fd if mem_fd is not None else self._open("mem")
        self._pagemap = -1
        if mem_fd is None:
            try:
                self._pagemap = self._open("pagemap")
            except GuestError:
                os.close(self._mem)
                raise

    @property
    def mem_fd(self) -> int:
        return self._mem

    def _open(self, name: str) -> int:
        try:
            return os.open(f"/proc/{self.pid}/{name}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise GuestError(f"cannot open the guest's {name}: {exc.strerror}", pid=self.pid) from exc

    def untouched_map(self) -> bytes:
        """One byte per page: 1 if the page was never touched (so it is zero)."""
        want = self.npages * 8
        off = (self.addr // self.page_size) * 8
        raw = bytearray()
        while len(raw) < want:
            try:
                chunk = os.pread(self._pagemap, want - len(raw), off + len(raw))
            except OSError as exc:
                raise GuestError(f"cannot read the guest's pagemap: {exc.strerror}", pid=self.pid) from exc
            if not chunk:
                raise GuestError("short read of pagemap", pid=self.pid)
            raw += chunk
        return bytes(raw[7::8]).translate(_UNTOUCHED_TABLE)

    def read_into(self, first: int, buf: memoryview) -> None:
        """Fill ``buf`` with the pages starting at ``first``."""
        off = self.addr + first * self.page_size
        done = 0
        while done < len(buf):
            try:
                n = os.preadv(self._mem, [buf[done:]], off + done)
            except OSError as exc:
                raise GuestError(f"cannot read guest memory: {exc.strerror}", page=first, pid=self.pid) from exc
            if n <= 0:
                raise GuestError("short read of guest memory", page=first, pid=self.pid)
            done += n

    def close(self) -> None:
        os.close(self._mem)
        if self._pagemap >= 0:
            os.close(self._pagemap)


class MappedRam:
    """A guest's RAM mapped read-only from its memfd: pages without a copy."""

    def __init__(self, fd: int, size: int, page_size: int) -> None:
        self.page_size = page_size
        self.fd = fd
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        self._mv = memoryview(self._map)

    def view(self, first: int, count: int) -> memoryview:
        ps = self.page_size
        return self._mv[first * ps : (first + count) * ps]

    def read_into(self, first: int, buf: memoryview) -> None:
        buf[:] = self._mv[first * self.page_size : first * self.page_size + len(buf)]

    def close(self) -> None:
        self._mv.release()
        self._map.close()
        os.close(self.fd)
