"""Run a command under a seccomp filter that refuses userfaultfd with EPERM.

    python deny_uffd.py COMMAND [ARG...]

Like a container runtime's default profile: userfaultfd(2) (x86_64 syscall 323)
and ``ioctl(fd, USERFAULTFD_IOC_NEW)`` on /dev/userfaultfd both fail with
EPERM; every other system call is allowed.  The filter is inherited by the
command and its children (exec keeps it; PR_SET_NO_NEW_PRIVS makes it legal
without CAP_SYS_ADMIN).  x86_64 only.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import shutil
import sys

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
AUDIT_ARCH_X86_64 = 0xC000003E
NR_USERFAULTFD = 323
NR_IOCTL = 16
USERFAULTFD_IOC_NEW = 0xAA00  # _IO(0xAA, 0x00)

# classic BPF opcodes
BPF_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
BPF_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
BPF_RET_K = 0x06  # BPF_RET | BPF_K

# offsets in struct seccomp_data {int nr; u32 arch; u64 ip; u64 args[6];}
OFF_NR, OFF_ARCH, OFF_ARG1_LO = 0, 4, 24  # args[1] low half on little-endian


class sock_filter(ctypes.Structure):  # <linux/filter.h>
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class sock_fprog(ctypes.Structure):  # <linux/filter.h>
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(sock_filter))]


def program() -> list[tuple[int, int, int, int]]:
    """(code, jt, jf, k); jumps are relative to the next instruction."""
    deny = SECCOMP_RET_ERRNO | errno.EPERM
    return [
        (BPF_LD_W_ABS, 0, 0, OFF_ARCH),  # 0
        (BPF_JEQ_K, 0, 5, AUDIT_ARCH_X86_64),  # 1: other arch -> 7 allow
        (BPF_LD_W_ABS, 0, 0, OFF_NR),  # 2
        (BPF_JEQ_K, 4, 0, NR_USERFAULTFD),  # 3: -> 8 deny
        (BPF_JEQ_K, 0, 2, NR_IOCTL),  # 4: not ioctl -> 7 allow
        (BPF_LD_W_ABS, 0, 0, OFF_ARG1_LO),  # 5
        (BPF_JEQ_K, 1, 0, USERFAULTFD_IOC_NEW),  # 6: -> 8 deny, else 7
        (BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),  # 7
        (BPF_RET_K, 0, 0, deny),  # 8
    ]


def install() -> None:
    if platform.machine() != "x86_64":
        raise SystemExit("deny_uffd: x86_64 only")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    insns = program()
    filt = (sock_filter * len(insns))(*(sock_filter(*i) for i in insns))
    prog = sock_fprog(len(insns), ctypes.cast(filt, ctypes.POINTER(sock_filter)))
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, None, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit(__doc__)
    exe = argv[0] if os.sep in argv[0] else shutil.which(argv[0])
    if exe is None:
        raise SystemExit(f"deny_uffd: {argv[0]}: not found")
    install()
    os.execv(exe, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
