"""Read a paused guest's RAM from outside the guest.

Pages are read with ``preadv`` on ``/proc/PID/mem`` straight into a reusable
buffer (the syscall releases the GIL).  ``/proc/PID/pagemap`` tells which pages
were never touched (neither present nor swapped): those are zero and are never
read or sent.
"""

from __future__ import annotations

import os

from migrator.errors import GuestError

PM_PRESENT = 1 << 63
PM_SWAPPED = 1 << 62
# The top byte of a little-endian pagemap entry holds both bits.
_TOUCHED_BITS = (PM_PRESENT | PM_SWAPPED) >> 56
_UNTOUCHED_TABLE = bytes(0 if b & _TOUCHED_BITS else 1 for b in range(256))


class RamReader:
    def __init__(self, pid: int, addr: int, size: int, page_size: int) -> None:
        self.pid, self.addr, self.size, self.page_size = pid, addr, size, page_size
        self.npages = size // page_size
        try:
            self._mem = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise GuestError(f"cannot open the guest's memory: {exc.strerror}", pid=pid) from exc

    def untouched_map(self) -> bytes:
        """One byte per page: 1 if the page was never touched (so it is zero)."""
        fd = os.open(f"/proc/{self.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            want = self.npages * 8
            off = (self.addr // self.page_size) * 8
            raw = bytearray()
            while len(raw) < want:
                chunk = os.pread(fd, want - len(raw), off + len(raw))
                if not chunk:
                    raise GuestError("short read of pagemap", pid=self.pid)
                raw += chunk
        finally:
            os.close(fd)
        return bytes(raw[7::8]).translate(_UNTOUCHED_TABLE)

    def read_into(self, first: int, buf: memoryview) -> None:
        """Fill ``buf`` with the pages starting at ``first``."""
        off = self.addr + first * self.page_size
        done = 0
        while done < len(buf):
            n = os.preadv(self._mem, [buf[done:]], off + done)
            if n <= 0:
                raise GuestError("short read of guest memory", page=first, pid=self.pid)
            done += n

    def close(self) -> None:
        os.close(self._mem)
