"""A thin wrapper around one userfaultfd file descriptor.

The errno of every ioctl is mapped to an exception in exactly one place
(:func:`migrator.errors.uffd_error`).  Which ioctl path is used matters for the
GIL (see ../shared/LIMITS.md):

* ``fcntl.ioctl`` with a mutable buffer of at most 1024 bytes releases the GIL
  and is the cheapest call Python has; but on failure CPython does not copy the
  buffer back, so the kernel's "bytes copied before stopping" is lost.  It is
  used for single pages, where a failure means nothing was copied.
* a ctypes ``ioctl`` also releases the GIL and updates the struct in place even
  on failure; it is used for runs of pages, where a partial copy must be known.

The uffd is non-blocking: waiting is done with epoll by the fault threads
(``migrator.dest.fault``), never with a blocking ``read()``, which on this
kernel wakes every waiting thread for every fault.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import platform
import struct
from dataclasses import dataclass

from migrator.errors import UffdError, uffd_error
from migrator.uffd import abi

_libc = ctypes.CDLL(None, use_errno=True)
_libc_ioctl = _libc.ioctl
_libc_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc_ioctl.restype = ctypes.c_int
_libc_syscall = _libc.syscall
_libc_syscall.restype = ctypes.c_long

_MSG = struct.Struct("<B7xQQI4x")
assert _MSG.size == abi.UFFD_MSG_SIZE


@dataclass(frozen=True, slots=True)
class Fault:
    """One UFFD_EVENT_PAGEFAULT: the faulting address and thread."""

    address: int
    write: bool
    ptid: int


def create_userfaultfd(*, nonblock: bool = True) -> int:
    """Create a userfaultfd for the calling process's address space.

    Tries userfaultfd(2) first, then /dev/userfaultfd (which is governed by the
    device's file permissions instead of the sysctl).  Raises OSError with the
    errno of the last attempt.
    """
    flags = os.O_CLOEXEC | (os.O_NONBLOCK if nonblock else 0)
    nr = abi.SYS_userfaultfd.get(platform.machine())
    first_err = errno.ENOSYS
    if nr is not None:
        fd = _libc_syscall(nr, flags)
        if fd >= 0:
            return int(fd)
        first_err = ctypes.get_errno()
        # Unprivileged callers may still create a user-mode-only uffd.
        if first_err == errno.EPERM:
            fd = _libc_syscall(nr, flags | abi.UFFD_USER_MODE_ONLY)
            if fd >= 0:
                return int(fd)
    try:
        dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise OSError(first_err, f"userfaultfd: {os.strerror(first_err)}; /dev/userfaultfd: {exc.strerror}") from exc
    try:
        fd = fcntl.ioctl(dev, abi.USERFAULTFD_IOC_NEW, flags)
    finally:
        os.close(dev)
    return int(fd)


class Userfaultfd:
    """Operations on a userfaultfd, possibly one created by another process.

    ioctls act on the address space of the process that created the fd, so the
    migrator can register and fill the guest's RAM from outside the guest.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.features = 0
        self.supported = 0
        self.closed = False

    # -- setup ------------------------------------------------------------
    def api(self, features: int = 0) -> int:
        """UFFDIO_API handshake; returns the features now enabled (the ones asked for).

        The kernel answers with every feature it supports (kept in
        ``self.supported``); it fails the call if one asked for is missing.
        """
        arg = abi.uffdio_api(abi.UFFD_API, features, 0)
        try:
            fcntl.ioctl(self.fd, abi.UFFDIO_API, arg)
        except OSError as exc:
            raise uffd_error("UFFDIO_API", exc.errno, features=hex(features)) from exc
        self.supported = int(arg.features)
        self.features = features & self.supported
        return self.features

    def register(self, start: int, length: int, mode: int = abi.UFFDIO_REGISTER_MODE_MISSING) -> int:
        """UFFDIO_REGISTER a range; returns the bitmask of allowed range ioctls."""
        arg = abi.uffdio_register(abi.uffdio_range(start, length), mode, 0)
        try:
            fcntl.ioctl(self.fd, abi.UFFDIO_REGISTER, arg)
        except OSError as exc:
            raise uffd_error("UFFDIO_REGISTER", exc.errno, addr=start, len=length) from exc
        needed = (1 << abi._UFFDIO_COPY) | (1 << abi._UFFDIO_WAKE)
        if arg.ioctls & needed != needed:
            raise UffdError("UFFDIO_REGISTER: range does not allow COPY and WAKE", addr=start)
        return int(arg.ioctls)

    def unregister(self, start: int, length: int) -> None:
        arg = abi.uffdio_range(start, length)
        try:
            fcntl.ioctl(self.fd, abi.UFFDIO_UNREGISTER, arg)
        except OSError as exc:
            raise uffd_error("UFFDIO_UNREGISTER", exc.errno, addr=start, len=length) from exc

    # -- resolving faults -------------------------------------------------
    def copy_page(self, dst: int, src: int, length: int, *, wake: bool = True) -> None:
        """UFFDIO_COPY of one page (fast path; nothing is copied on failure)."""
        arg = abi.uffdio_copy(dst, src, length, 0 if wake else abi.UFFDIO_COPY_MODE_DONTWAKE, 0)
        try:
            fcntl.ioctl(self.fd, abi.UFFDIO_COPY, arg)
        except OSError as exc:
            raise uffd_error("UFFDIO_COPY", exc.errno, addr=dst, copied=0) from exc

    def copy(self, dst: int, src: int, length: int, *, wake: bool = True) -> int:
        """UFFDIO_COPY of a run; returns bytes copied.

        On failure the raised error's ``copied`` field says how many bytes the
        kernel copied before it stopped (the ioctl's partial-copy report).
        """
        arg = abi.uffdio_copy(dst, src, length, 0 if wake else abi.UFFDIO_COPY_MODE_DONTWAKE, 0)
        if _libc_ioctl(self.fd, abi.UFFDIO_COPY, ctypes.addressof(arg)) < 0:
            err = ctypes.get_errno()
            copied = arg.copy if arg.copy > 0 else 0
            exc = uffd_error("UFFDIO_COPY", err, addr=dst, len=length, copied=copied)
            exc.copied = copied  # type: ignore[attr-defined]
            raise exc
        return int(arg.copy)

    def zeropage(self, start: int, length: int, *, wake: bool = True) -> int:
        """UFFDIO_ZEROPAGE: map the shared zero page; returns bytes mapped."""
        mode = 0 if wake else abi.UFFDIO_ZEROPAGE_MODE_DONTWAKE
        arg = abi.uffdio_zeropage(abi.uffdio_range(start, length), mode, 0)
        if _libc_ioctl(self.fd, abi.UFFDIO_ZEROPAGE, ctypes.addressof(arg)) < 0:
            err = ctypes.get_errno()
            done = arg.zeropage if arg.zeropage > 0 else 0
            exc = uffd_error("UFFDIO_ZEROPAGE", err, addr=start, len=length, copied=done)
            exc.copied = done  # type: ignore[attr-defined]
            raise exc
        return int(arg.zeropage)

    def wake(self, start: int, length: int) -> None:
        """UFFDIO_WAKE: wake threads waiting on a range that is already mapped."""
        arg = abi.uffdio_range(start, length)
        try:
            fcntl.ioctl(self.fd, abi.UFFDIO_WAKE, arg)
        except OSError as exc:
            raise uffd_error("UFFDIO_WAKE", exc.errno, addr=start, len=length) from exc

    # -- events -------------------------------------------------------------
    def read_faults(self, max_events: int = 16) -> list[Fault]:
        """Read pending events without blocking; [] if none are queued.

        Only page faults are expected (no EVENT_* features are requested); any
        other event is a bug in our setup and raises.
        """
        try:
            data = os.read(self.fd, abi.UFFD_MSG_SIZE * max_events)
        except BlockingIOError:
            return []
        except OSError as exc:
            raise uffd_error("read(uffd)", exc.errno) from exc
        out = []
        for off in range(0, len(data), abi.UFFD_MSG_SIZE):
            event, flags, address, ptid = _MSG.unpack_from(data, off)
            if event != abi.UFFD_EVENT_PAGEFAULT:
                raise UffdError("unexpected userfaultfd event", event=hex(event))
            out.append(Fault(address, bool(flags & abi.UFFD_PAGEFAULT_FLAG_WRITE), ptid))
        return out

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)
