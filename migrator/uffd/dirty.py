"""Which pages a running guest wrote: userfaultfd WP_ASYNC + the PAGEMAP_SCAN ioctl.

The guest creates a userfaultfd (only a process can create one for its own
memory) and passes it to its monitor (guest_sim's ``track`` command).  The
monitor enables ``UFFD_FEATURE_WP_ASYNC`` on it, registers guest RAM in
write-protect mode and write-protects all of it.  From then on the guest's
first write to a protected page takes a write-protect fault that the *kernel*
resolves by itself (no handler, no round trip: async), which clears the
page's protection.  ``PAGEMAP_SCAN`` on ``/proc/PID/pagemap`` with
``PM_SCAN_WP_MATCHING`` then returns, in one call per up to ``VEC_LEN`` runs,
the runs of pages written since the last scan, and protects them again
(``PM_SCAN_CHECK_WPASYNC``: it fails instead of lying on a range without
async protection).

Invariants the callers rely on (``source/precopy.py``):

* a write that completes after :meth:`DirtyTracker.scan` returns is reported
  by the next scan (the re-protection happens before the scan returns, with
  the TLB flushed): so "scan, then read the page" never misses a change;
* never-populated pages are protected too (``WP_UNPOPULATED`` for anonymous
  memory, pte markers for shmem, which a memfd guest is), so a first write to
  a hole is seen; pagemap then shows those markers as swap entries, which is
  why the untouched-page map is read *before* :meth:`start`.

Closing the descriptor ends tracking: the kernel unregisters the range and
drops the protection, so a guest that stays (a cancelled migration) runs at
full speed again.  Soft-dirty (``clear_refs``) would be the fallback on a
kernel without WP_ASYNC (< 6.7); it is not implemented: :func:`probe` says so.
"""

from __future__ import annotations

import ctypes
import fcntl
import os

from migrator.errors import UnsupportedHost, uffd_error
from migrator.uffd import abi

_libc = ctypes.CDLL(None, use_errno=True)
_ioctl = _libc.ioctl
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl.restype = ctypes.c_int

VEC_LEN = 4096  # runs per PAGEMAP_SCAN call (96 KiB of page_region)
FEATURES = abi.UFFD_FEATURE_WP_ASYNC | abi.UFFD_FEATURE_WP_UNPOPULATED | abi.UFFD_FEATURE_WP_HUGETLBFS_SHMEM


class DirtyTracker:
    """Write tracking of one guest's RAM [addr, addr + size), from its monitor.

    ``uffd_fd``: a userfaultfd created by the guest (now owned by the tracker);
    ``pid``: the guest (its pagemap is opened here).  Raises UnsupportedHost if
    this kernel lacks WP_ASYNC or PAGEMAP_SCAN.
    """

    def __init__(self, uffd_fd: int, pid: int, addr: int, size: int, page_size: int) -> None:
        self.fd, self.pid, self.addr, self.size, self.page_size = uffd_fd, pid, addr, size, page_size
        self.npages = size // page_size
        self._vec = (abi.page_region * VEC_LEN)()
        self._pagemap = -1
        try:
            arg = abi.uffdio_api(abi.UFFD_API, FEATURES, 0)
            try:
                fcntl.ioctl(self.fd, abi.UFFDIO_API, arg)
            except OSError as exc:
                raise UnsupportedHost(
                    f"this kernel cannot track a guest's writes (UFFDIO_API with WP_ASYNC: {exc.strerror}); "
                    "pre-copy and hot-first need Linux 6.7+", errno=exc.errno,
                ) from exc  # fmt: skip
            self._pagemap = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            self.close()
            raise

    def start(self) -> None:
        """Register RAM in write-protect mode and protect all of it: tracking begins."""
        reg = abi.uffdio_register(abi.uffdio_range(self.addr, self.size), abi.UFFDIO_REGISTER_MODE_WP, 0)
        try:
            fcntl.ioctl(self.fd, abi.UFFDIO_REGISTER, reg)
        except OSError as exc:
            raise uffd_error("UFFDIO_REGISTER(WP)", exc.errno, addr=self.addr, len=self.size) from exc
        wp = abi.uffdio_writeprotect(abi.uffdio_range(self.addr, self.size), abi.UFFDIO_WRITEPROTECT_MODE_WP)
        if _ioctl(self.fd, abi.UFFDIO_WRITEPROTECT, ctypes.addressof(wp)) < 0:
            raise uffd_error("UFFDIO_WRITEPROTECT", ctypes.get_errno(), addr=self.addr, len=self.size)

    def scan(self, out: bytearray, *, protect: bool = True, category: int = abi.PAGE_IS_WRITTEN) -> int:
        """Set ``out[p] = 1`` for every page p in ``category`` (default: written since
        the last scan) and, with ``protect``, write-protect them again.  ``out`` has
        one byte per page; pages not in the category are left as they are.
        Returns the number of pages found.  Raises UffdError if the ioctl fails."""
        ps, base, end = self.page_size, self.addr, self.addr + self.size
        flags = (abi.PM_SCAN_WP_MATCHING | abi.PM_SCAN_CHECK_WPASYNC) if protect else 0
        arg = abi.pm_scan_arg(size=ctypes.sizeof(abi.pm_scan_arg), flags=flags, start=base, end=end,
                              vec=ctypes.addressof(self._vec), vec_len=VEC_LEN,
                              category_mask=category, return_mask=category)  # fmt: skip
        found = 0
        one = b"\x01"
        while True:
            n = _ioctl(self._pagemap, abi.PAGEMAP_SCAN, ctypes.addressof(arg))
            if n < 0:
                raise uffd_error("PAGEMAP_SCAN", ctypes.get_errno(), addr=arg.start)
            for r in self._vec[:n]:
                a, b = (r.start - base) // ps, (r.end - base) // ps
                out[a:b] = one * (b - a)
                found += b - a
            if arg.walk_end >= end or n < VEC_LEN:
                return found
            arg.start = arg.walk_end

    def close(self) -> None:
        """Stop tracking (the kernel drops the protection with the last descriptor)."""
        if self._pagemap >= 0:
            os.close(self._pagemap)
            self._pagemap = -1
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
