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

_MSG = struct.Struct("<B7xQQI4x")  # a page fault: flags, address, ptid
_RANGE = struct.Struct("<B7xQQQ")  # remove/unmap: start, end; remap: from, to, len
assert _MSG.size == _RANGE.size == abi.UFFD_MSG_SIZE


@dataclass(frozen=True, slots=True)
class Fault:
    """One UFFD_EVENT_PAGEFAULT: the faulting address and thread."""

    address: int
    write: bool
    ptid: int


@dataclass(frozen=True, slots=True)
class Event:
    """A non-cooperative event: the guest changed its own memory.

    ``kind`` is "remove" (madvise DONTNEED/REMOVE: [start, end) reads as zeros
    from now on), "unmap" (munmap or a mapping put over [start, end): no longer
    guest RAM) or "remap" (mremap: ``length`` bytes moved from ``start`` to
    ``end``, keeping their contents and registration).
    """

    kind: str
    start: int
    end: int
    length: int = 0


FULL, USER_MODE_ONLY = "full", "user-mode only"
# what a destination asks UFFDIO_API for: the faulting thread's id, and the guest's
# memory events (madvise DONTNEED/REMOVE, munmap, mremap: dest/fault.py).  No
# EVENT_FORK: guest RAM is MADV_DONTFORK (QEMU's choice), a child never has it.
MIGRATION_FEATURES = (abi.UFFD_FEATURE_THREAD_ID | abi.UFFD_FEATURE_EVENT_REMOVE | abi.UFFD_FEATURE_EVENT_UNMAP
                      | abi.UFFD_FEATURE_EVENT_REMAP)  # fmt: skip


def create_userfaultfd(*, nonblock: bool = True) -> int:
    """Create a userfaultfd for the calling process's address space (see :func:`create_uffd`)."""
    return create_uffd(nonblock=nonblock)[0]


def create_uffd(*, nonblock: bool = True) -> tuple[int, str]:
    """Create a userfaultfd for the calling process's address space: (fd, mode).

    A *full* one whenever permitted — it also catches faults the kernel takes
    on the guest's behalf (a system call reading guest RAM, e.g. write(2) from
    a missing page) — in this order: userfaultfd(2) (root, CAP_SYS_PTRACE, or
    the sysctl vm.unprivileged_userfaultfd=1), then /dev/userfaultfd (governed
    by the device's permissions).  Only when neither is allowed, a
    *user-mode-only* one (UFFD_USER_MODE_ONLY, Linux 5.11+): the guest's own
    accesses fault as usual, but a system call touching a missing page fails
    with EFAULT.  Raises OSError with the errno of the last attempt.
    """
    flags = os.O_CLOEXEC | (os.O_NONBLOCK if nonblock else 0)
    nr = abi.SYS_userfaultfd.get(platform.machine())
    first_err = errno.ENOSYS
    if nr is not None:
        fd = _libc_syscall(nr, flags)
        if fd >= 0:
            return int(fd), FULL
        first_err = ctypes.get_errno()
    dev_err = ""
    try:
        dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        dev_err = exc.strerror or str(exc)
    else:
        try:
            return int(fcntl.ioctl(dev, abi.USERFAULTFD_IOC_NEW, flags)), FULL
        except OSError as exc:
            dev_err = exc.strerror or str(exc)
        finally:
            os.close(dev)
    if nr is not None and first_err == errno.EPERM:
        fd = _libc_syscall(nr, flags | abi.UFFD_USER_MODE_ONLY)
        if fd >= 0:
            return int(fd), USER_MODE_ONLY
    raise OSError(first_err, f"userfaultfd: {os.strerror(first_err)}; /dev/userfaultfd: {dev_err}")


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
        """Read pending page faults without blocking; [] if none are queued.

        For a uffd without EVENT_* features; any other message raises (use
        :meth:`read_messages` where events are enabled).
        """
        out = self.read_messages(max_events)
        for m in out:
            if not isinstance(m, Fault):
                raise UffdError("unexpected userfaultfd event", event=m.kind)
        return out  # type: ignore[return-value]

    def read_messages(self, max_events: int = 16) -> list[Fault | Event]:
        """Read pending messages (page faults and events) without blocking; [] if none."""
        try:
            data = os.read(self.fd, abi.UFFD_MSG_SIZE * max_events)
        except BlockingIOError:
            return []
        except OSError as exc:
            raise uffd_error("read(uffd)", exc.errno) from exc
        out: list[Fault | Event] = []
        for off in range(0, len(data), abi.UFFD_MSG_SIZE):
            event = data[off]
            if event == abi.UFFD_EVENT_PAGEFAULT:
                _e, flags, address, ptid = _MSG.unpack_from(data, off)
                out.append(Fault(address, bool(flags & abi.UFFD_PAGEFAULT_FLAG_WRITE), ptid))
            elif event in (abi.UFFD_EVENT_REMOVE, abi.UFFD_EVENT_UNMAP):
                _e, start, end, _ = _RANGE.unpack_from(data, off)
                out.append(Event("remove" if event == abi.UFFD_EVENT_REMOVE else "unmap", start, end))
            elif event == abi.UFFD_EVENT_REMAP:
                _e, frm, to, length = _RANGE.unpack_from(data, off)
                out.append(Event("remap", frm, to, length))
            else:
                raise UffdError("unexpected userfaultfd event", event=hex(event))
        return out

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)
