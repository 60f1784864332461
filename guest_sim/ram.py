"""Guest RAM: one anonymous private mapping, touched only through ctypes calls.

Every access by a vCPU goes through ``ctypes.memmove``, a foreign call that
releases the GIL: a vCPU that faults on a missing page blocks in the kernel
without the GIL, so the other vCPUs and the control thread keep running.  Plain
slicing of the mmap would fault while holding the GIL and freeze the process.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import random
from array import array

from guest_sim import pages

memmove = ctypes.memmove


class GuestRam:
    """``shared``: RAM is a memfd mapped MAP_SHARED (a source's guest, like QEMU's
    memory-backend-memfd), so that its monitor's workers can map it and read it
    without a copy; else anonymous private memory (an incoming guest: userfaultfd's
    MISSING mode fills that)."""

    def __init__(self, size: int, page_size: int = mmap.PAGESIZE, shared: bool = False) -> None:
        if size % page_size or size < 16 * page_size:
            raise ValueError(f"RAM size {size} must be a multiple of {page_size} and at least 16 pages")
        self.size = size
        self.page_size = page_size
        self.npages = size // page_size
        self.first_data = pages.table_pages(self.npages, page_size)
        self.memfd = -1
        if shared:
            self.memfd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
            os.ftruncate(self.memfd, size)
            self.map = mmap.mmap(self.memfd, size, flags=mmap.MAP_SHARED)
        else:
            self.map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        # Keep every page a 4 KiB page so that "never touched" in pagemap is
        # exact for the source and faults arrive per page on the destination.
        self.map.madvise(mmap.MADV_NOHUGEPAGE)
        # A child the guest forks does not inherit its RAM (QEMU's choice for guest
        # RAM too): a child reading it gets SIGSEGV, never a page that is missing
        # on a destination (it would read zeros where the guest has data).
        self.map.madvise(mmap.MADV_DONTFORK)
        self._anchor = ctypes.c_char.from_buffer(self.map)
        self.addr = ctypes.addressof(self._anchor)
        self.table_addr = self.addr  # the version table is at the start of RAM
        # where each page is now (mremap moves some): the vCPUs look their pages up here
        self.page_addr = array("Q", range(self.addr, self.addr + size, page_size))

    def fill(self, zero_pct: int, text_pct: int, seed: int) -> int:
        """Initial contents: every non-zero-kind data page at version 1.

        Runs before any vCPU and before any uffd exists, so it may write through
        the mmap directly.  Returns the number of pages written.
        """
        rnd = random.Random(seed)
        ps = self.page_size
        buf = bytearray(ps)
        versions = array("I", bytes(4 * self.npages))
        written = 0
        for idx in range(self.first_data, self.npages):
            kind = pages.page_kind(idx, zero_pct, text_pct)
            if kind == pages.KIND_ZERO:
                continue
            pages.build_page(buf, idx, 1, kind, 0xFFFF, rnd)
            self.map[idx * ps : (idx + 1) * ps] = buf
            versions[idx] = 1
            written += 1
        raw = versions.tobytes()
        self.map[0 : len(raw)] = raw
        return written

    def drop(self, runs: list[tuple[int, int]]) -> int:
        """Drop the pages of ``runs`` ([first page, count]) with MADV_DONTNEED (vCPUs
        paused): in userfaultfd-registered RAM they are missing again and fault.
        Returns the number of pages dropped; raises ValueError for a run outside RAM."""
        ps = self.page_size
        for first, count in runs:
            if first < 0 or count <= 0 or first + count > self.npages:
                raise ValueError(f"drop run {first}+{count} outside RAM of {self.npages} pages")
        if not _process_madvise(self.addr, ps, runs):  # up to 1024 runs a call (Linux 6.13+ on itself)
            for first, count in runs:
                self.map.madvise(mmap.MADV_DONTNEED, first * ps, count * ps)
        return sum(count for _first, count in runs)

    def verify_all(self, limit: int = 20) -> tuple[int, list[str]]:
        """Check every data page against the version table (vCPUs must be paused)."""
        ps = self.page_size
        buf = (ctypes.c_char * ps)()
        table = (ctypes.c_char * (4 * self.npages))()
        memmove(table, self.table_addr, 4 * self.npages)
        versions = array("I", bytes(table))
        errors: list[str] = []
        nerr = 0
        for idx in range(self.first_data, self.npages):
            memmove(buf, self.page_addr[idx], ps)
            err = pages.check_page(bytes(buf), idx, versions[idx])
            if err:
                nerr += 1
                if len(errors) < limit:
                    errors.append(err)
        if nerr > len(errors):
            errors.append(f"... and {nerr - len(errors)} more")
        return self.npages - self.first_data, errors

    # -- the guest changes its own memory (vCPUs paused by the caller) -------------------
    def _data_range(self, first: int, count: int) -> None:
        if count < 1 or first < self.first_data or first + count > self.npages:
            raise ValueError(f"pages {first}+{count} are not data pages ({self.first_data}..{self.npages - 1})")
        run = self.page_addr[first : first + count]
        if any(b - a != self.page_size for a, b in zip(run, run[1:])):
            raise ValueError(f"pages {first}+{count} are not contiguous in memory")

    def _forget(self, first: int, count: int) -> None:
        """Pages whose contents the guest gave up: they read as zeros (version 0) from now on."""
        zero = ctypes.c_uint32(0)
        for idx in range(first, first + count):
            memmove(self.table_addr + 4 * idx, ctypes.byref(zero), 4)

    def discard(self, first: int, count: int) -> None:
        """madvise(MADV_DONTNEED): a balloon or free-page reporting gives these pages back."""
        self._data_range(first, count)
        if _libc.madvise(ctypes.c_void_p(self.page_addr[first]), count * self.page_size, MADV_DONTNEED):
            raise OSError(ctypes.get_errno(), "madvise(MADV_DONTNEED)")
        self._forget(first, count)

    def map_over(self, first: int, count: int) -> None:
        """mmap(MAP_FIXED) a fresh anonymous mapping over these pages: no longer the RAM they were."""
        self._data_range(first, count)
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED
        got = _libc.mmap(ctypes.c_void_p(self.page_addr[first]), count * self.page_size,
                         mmap.PROT_READ | mmap.PROT_WRITE, flags, -1, 0)  # fmt: skip
        if got in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap(MAP_FIXED)")
        self._forget(first, count)

    def remap(self, first: int, count: int) -> int:
        """mremap these pages elsewhere; they keep their contents.  Returns the new address."""
        self._data_range(first, count)
        length = count * self.page_size
        spot = _libc.mmap(None, length, PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        if spot in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap (a place to move to)")
        new = _libc.mremap(ctypes.c_void_p(self.page_addr[first]), length, length,
                           MREMAP_MAYMOVE | MREMAP_FIXED, ctypes.c_void_p(spot))  # fmt: skip
        if new in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mremap")
        self.page_addr[first : first + count] = array("Q", range(new, new + length, self.page_size))
        return int(new)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.mremap.restype = ctypes.c_void_p
_libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MADV_DONTNEED, MAP_FIXED, MREMAP_MAYMOVE, MREMAP_FIXED, PROT_NONE = 4, 0x10, 1, 2, 0

class _iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_SYS_process_madvise = {"x86_64": 440, "aarch64": 440}
_IOV_MAX = 1024


def _process_madvise(addr: int, page_size: int, runs: list[tuple[int, int]]) -> bool:
    """MADV_DONTNEED on many runs in few syscalls; False if this kernel refuses it
    (before 6.13 process_madvise takes no MADV_DONTNEED, even on oneself)."""
    import os
    import platform

    nr = _SYS_process_madvise.get(platform.machine())
    if nr is None or not runs:
        return not runs
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        pidfd = os.pidfd_open(os.getpid())
    except OSError:
        return False
    try:
        iov = (_iovec * _IOV_MAX)()
        for k in range(0, len(runs), _IOV_MAX):
            chunk = runs[k : k + _IOV_MAX]
            want = 0
            for j, (first, count) in enumerate(chunk):
                iov[j].base, iov[j].len = addr + first * page_size, count * page_size
                want += count * page_size
            if libc.syscall(nr, pidfd, iov, len(chunk), mmap.MADV_DONTNEED, 0) != want:
                if k == 0:
                    return False  # nothing done yet: the caller's madvise loop does it all
                raise OSError(ctypes.get_errno(), "process_madvise(MADV_DONTNEED) stopped part way")
        return True
    finally:
        os.close(pidfd)
