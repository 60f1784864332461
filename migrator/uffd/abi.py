"""The userfaultfd kernel ABI, mirrored in one place.

Every struct here is laid out exactly as in ``include/uapi/linux/userfaultfd.h``
(Linux 6.x); the ioctl numbers are computed from ``sizeof`` with the same
``_IOC`` encoding the kernel uses, never typed in as magic numbers.
``tests/test_uffd_abi.py`` compiles a C program against the installed header and
checks every number below against it.

Only this module knows the layout; everything else uses the names.
"""

from __future__ import annotations

import ctypes

# --- asm-generic/ioctl.h -----------------------------------------------------
_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_WRITE = 1
_IOC_READ = 2


def _IOC(direction: int, typ: int, nr: int, size: int) -> int:
    return (
        (direction << _IOC_DIRSHIFT)
        | (typ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _IOR(typ: int, nr: int, struct: type[ctypes.Structure]) -> int:
    return _IOC(_IOC_READ, typ, nr, ctypes.sizeof(struct))


def _IOWR(typ: int, nr: int, struct: type[ctypes.Structure]) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, typ, nr, ctypes.sizeof(struct))


# --- linux/userfaultfd.h: constants ------------------------------------------
UFFD_API = 0xAA
UFFDIO = 0xAA

_UFFDIO_REGISTER = 0x00
_UFFDIO_UNREGISTER = 0x01
_UFFDIO_WAKE = 0x02
_UFFDIO_COPY = 0x03
_UFFDIO_ZEROPAGE = 0x04
_UFFDIO_WRITEPROTECT = 0x06
_UFFDIO_API = 0x3F

UFFD_EVENT_PAGEFAULT = 0x12
UFFD_EVENT_FORK = 0x13
UFFD_EVENT_REMAP = 0x14
UFFD_EVENT_REMOVE = 0x15
UFFD_EVENT_UNMAP = 0x16

UFFD_PAGEFAULT_FLAG_WRITE = 1 << 0
UFFD_PAGEFAULT_FLAG_WP = 1 << 1
UFFD_PAGEFAULT_FLAG_MINOR = 1 << 2

UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
UFFD_FEATURE_EVENT_FORK = 1 << 1
UFFD_FEATURE_EVENT_REMAP = 1 << 2
UFFD_FEATURE_EVENT_REMOVE = 1 << 3
UFFD_FEATURE_MISSING_HUGETLBFS = 1 << 4
UFFD_FEATURE_MISSING_SHMEM = 1 << 5
UFFD_FEATURE_EVENT_UNMAP = 1 << 6
UFFD_FEATURE_SIGBUS = 1 << 7
UFFD_FEATURE_THREAD_ID = 1 << 8
UFFD_FEATURE_MINOR_HUGETLBFS = 1 << 9
UFFD_FEATURE_MINOR_SHMEM = 1 << 10
UFFD_FEATURE_EXACT_ADDRESS = 1 << 11
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
# Linux 6.4+ (newer than the 6.1 header Debian 12 installs; values from the
# kernel's include/uapi/linux/userfaultfd.h): write-protect ptes that are not
# populated yet, and resolve write-protect faults in the kernel itself (no
# handler: the dirty tracker of ``dirty.py``).
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_POISON = 1 << 14
UFFD_FEATURE_WP_ASYNC = 1 << 15

UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_REGISTER_MODE_MINOR = 1 << 2

UFFDIO_COPY_MODE_DONTWAKE = 1 << 0
UFFDIO_COPY_MODE_WP = 1 << 1
UFFDIO_ZEROPAGE_MODE_DONTWAKE = 1 << 0
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
UFFDIO_WRITEPROTECT_MODE_DONTWAKE = 1 << 1

# /dev/userfaultfd (linux/userfaultfd.h, 6.1+): USERFAULTFD_IOC_NEW = _IO(0xAA, 0)
USERFAULTFD_IOC = 0xAA
USERFAULTFD_IOC_NEW = _IOC(0, USERFAULTFD_IOC, 0x00, 0)
# fs/userfaultfd.c: a mode flag for userfaultfd(2) only; lets an unprivileged
# process create a uffd that handles user-mode faults only.
UFFD_USER_MODE_ONLY = 1

# x86_64 and aarch64 syscall numbers for userfaultfd(2).
SYS_userfaultfd = {"x86_64": 323, "aarch64": 282}


# --- linux/userfaultfd.h: structs --------------------------------------------
class uffdio_api(ctypes.Structure):
    """struct uffdio_api"""

    _fields_ = [
        ("api", ctypes.c_uint64),
        ("features", ctypes.c_uint64),
        ("ioctls", ctypes.c_uint64),
    ]


class uffdio_range(ctypes.Structure):
    """struct uffdio_range"""

    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class uffdio_register(ctypes.Structure):
    """struct uffdio_register"""

    _fields_ = [
        ("range", uffdio_range),
        ("mode", ctypes.c_uint64),
        ("ioctls", ctypes.c_uint64),
    ]


class uffdio_copy(ctypes.Structure):
    """struct uffdio_copy; ``copy`` is written back by the kernel."""

    _fields_ = [
        ("dst", ctypes.c_uint64),
        ("src", ctypes.c_uint64),
        ("len", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("copy", ctypes.c_int64),
    ]


class uffdio_zeropage(ctypes.Structure):
    """struct uffdio_zeropage; ``zeropage`` is written back by the kernel."""

    _fields_ = [
        ("range", uffdio_range),
        ("mode", ctypes.c_uint64),
        ("zeropage", ctypes.c_int64),
    ]


class uffdio_writeprotect(ctypes.Structure):
    """struct uffdio_writeprotect"""

    _fields_ = [("range", uffdio_range), ("mode", ctypes.c_uint64)]


class _uffd_pagefault_feat(ctypes.Union):
    _fields_ = [("ptid", ctypes.c_uint32)]


class _uffd_pagefault(ctypes.Structure):
    _pack_ = 1
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("address", ctypes.c_uint64),
        ("feat", _uffd_pagefault_feat),
    ]


class _uffd_fork(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("ufd", ctypes.c_uint32)]


class _uffd_remap(ctypes.Structure):
    _pack_ = 1
    _fields_ = [
        ("from_", ctypes.c_uint64),
        ("to", ctypes.c_uint64),
        ("len", ctypes.c_uint64),
    ]


class _uffd_remove(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64)]


class _uffd_reserved(ctypes.Structure):
    _pack_ = 1
    _fields_ = [
        ("reserved1", ctypes.c_uint64),
        ("reserved2", ctypes.c_uint64),
        ("reserved3", ctypes.c_uint64),
    ]


class _uffd_msg_arg(ctypes.Union):
    _pack_ = 1
    _fields_ = [
        ("pagefault", _uffd_pagefault),
        ("fork", _uffd_fork),
        ("remap", _uffd_remap),
        ("remove", _uffd_remove),
        ("reserved", _uffd_reserved),
    ]


class uffd_msg(ctypes.Structure):
    """struct uffd_msg (packed, 32 bytes)"""

    _pack_ = 1
    _fields_ = [
        ("event", ctypes.c_uint8),
        ("reserved1", ctypes.c_uint8),
        ("reserved2", ctypes.c_uint16),
        ("reserved3", ctypes.c_uint32),
        ("arg", _uffd_msg_arg),
    ]


assert ctypes.sizeof(uffd_msg) == 32, "struct uffd_msg must be 32 bytes"
assert ctypes.sizeof(uffdio_api) == 24
assert ctypes.sizeof(uffdio_register) == 32
assert ctypes.sizeof(uffdio_copy) == 40
assert ctypes.sizeof(uffdio_zeropage) == 32
assert ctypes.sizeof(uffdio_writeprotect) == 24

# Offsets inside struct uffd_msg, for decoding many messages from one read()
# with struct.unpack_from (cheaper than a ctypes object per message).
UFFD_MSG_SIZE = ctypes.sizeof(uffd_msg)
MSG_OFF_FLAGS = uffd_msg.arg.offset + _uffd_msg_arg.pagefault.offset + _uffd_pagefault.flags.offset
MSG_OFF_ADDRESS = uffd_msg.arg.offset + _uffd_msg_arg.pagefault.offset + _uffd_pagefault.address.offset
MSG_OFF_PTID = uffd_msg.arg.offset + _uffd_msg_arg.pagefault.offset + _uffd_pagefault.feat.offset

# --- ioctl numbers -------------------------------------------------------------
UFFDIO_API = _IOWR(UFFDIO, _UFFDIO_API, uffdio_api)
UFFDIO_REGISTER = _IOWR(UFFDIO, _UFFDIO_REGISTER, uffdio_register)
UFFDIO_UNREGISTER = _IOR(UFFDIO, _UFFDIO_UNREGISTER, uffdio_range)
UFFDIO_WAKE = _IOR(UFFDIO, _UFFDIO_WAKE, uffdio_range)
UFFDIO_COPY = _IOWR(UFFDIO, _UFFDIO_COPY, uffdio_copy)
UFFDIO_ZEROPAGE = _IOWR(UFFDIO, _UFFDIO_ZEROPAGE, uffdio_zeropage)
UFFDIO_WRITEPROTECT = _IOWR(UFFDIO, _UFFDIO_WRITEPROTECT, uffdio_writeprotect)

FEATURE_NAMES = {
    UFFD_FEATURE_PAGEFAULT_FLAG_WP: "PAGEFAULT_FLAG_WP",
    UFFD_FEATURE_EVENT_FORK: "EVENT_FORK",
    UFFD_FEATURE_EVENT_REMAP: "EVENT_REMAP",
    UFFD_FEATURE_EVENT_REMOVE: "EVENT_REMOVE",
    UFFD_FEATURE_MISSING_HUGETLBFS: "MISSING_HUGETLBFS",
    UFFD_FEATURE_MISSING_SHMEM: "MISSING_SHMEM",
    UFFD_FEATURE_EVENT_UNMAP: "EVENT_UNMAP",
    UFFD_FEATURE_SIGBUS: "SIGBUS",
    UFFD_FEATURE_THREAD_ID: "THREAD_ID",
    UFFD_FEATURE_MINOR_HUGETLBFS: "MINOR_HUGETLBFS",
    UFFD_FEATURE_MINOR_SHMEM: "MINOR_SHMEM",
    UFFD_FEATURE_EXACT_ADDRESS: "EXACT_ADDRESS",
    UFFD_FEATURE_WP_HUGETLBFS_SHMEM: "WP_HUGETLBFS_SHMEM",
    UFFD_FEATURE_WP_UNPOPULATED: "WP_UNPOPULATED",
    UFFD_FEATURE_POISON: "POISON",
    UFFD_FEATURE_WP_ASYNC: "WP_ASYNC",
}


# --- linux/fs.h (6.7+): the PAGEMAP_SCAN ioctl on /proc/PID/pagemap ------------
# Not in Debian 12's 6.1 header: laid out from the kernel's include/uapi/linux/fs.h
# (the ABI CRIU's criu/include/pagemap_scan.h and the kernel's selftest
# tools/testing/selftests/mm/pagemap_ioctl.c use).  A test checks them against
# the header when it has them, and against this kernel's behaviour always.
PAGE_IS_WPALLOWED = 1 << 0
PAGE_IS_WRITTEN = 1 << 1
PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_PFNZERO = 1 << 5
PAGE_IS_HUGE = 1 << 6
PAGE_IS_SOFT_DIRTY = 1 << 7

PM_SCAN_WP_MATCHING = 1 << 0  # write-protect the pages matched (after reporting them)
PM_SCAN_CHECK_WPASYNC = 1 << 1  # fail on a page without async write protection


class page_region(ctypes.Structure):
    """struct page_region: [start, end) bytes, and the categories of that run"""

    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64), ("categories", ctypes.c_uint64)]


class pm_scan_arg(ctypes.Structure):
    """struct pm_scan_arg; ``walk_end`` is written back by the kernel."""

    _fields_ = [
        ("size", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("start", ctypes.c_uint64),
        ("end", ctypes.c_uint64),
        ("walk_end", ctypes.c_uint64),
        ("vec", ctypes.c_uint64),
        ("vec_len", ctypes.c_uint64),
        ("max_pages", ctypes.c_uint64),
        ("category_inverted", ctypes.c_uint64),
        ("category_mask", ctypes.c_uint64),
        ("category_anyof_mask", ctypes.c_uint64),
        ("return_mask", ctypes.c_uint64),
    ]


assert ctypes.sizeof(page_region) == 24
assert ctypes.sizeof(pm_scan_arg) == 96
PAGEMAP_SCAN = _IOWR(ord("f"), 16, pm_scan_arg)
