"""Can this process use userfaultfd?  Probe before use, and say why not.

The same probe backs `migrator check`, `migrator dest --check` (the container
healthcheck), the start of `migrator dest` and the tests' skip reasons.  Each
cause has its own message: a seccomp filter, the sysctl, a missing capability,
a kernel without userfaultfd.
"""

from __future__ import annotations

import errno
import mmap
import os
import ctypes
from dataclasses import dataclass

from migrator.errors import MigratorError, UnsupportedHost
from migrator.uffd import abi
from migrator.uffd.fd import FULL, MIGRATION_FEATURES, Userfaultfd, create_uffd


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    message: str
    cause: str = ""

    def error(self) -> UnsupportedHost:
        return UnsupportedHost(self.message, cause=self.cause)


def _status_field(name: str) -> str:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _sysctl_unprivileged() -> str:
    try:
        with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _has_cap(bit: int) -> bool:
    eff = _status_field("CapEff")
    return bool(eff) and bool(int(eff, 16) >> bit & 1)


CAP_SYS_PTRACE = 19


def explain(err: int) -> tuple[str, str]:
    """(cause, one-line message) for a failed userfaultfd creation."""
    seccomp = _status_field("Seccomp") == "2"
    if seccomp and err in (errno.EPERM, errno.EACCES, errno.ENOSYS):
        return "seccomp", (
            "userfaultfd is refused by a seccomp filter (Seccomp: 2 in /proc/self/status), as under Docker's "
            "default profile; run the container with --security-opt seccomp=docker/seccomp-uffd.json (the "
            "default profile plus userfaultfd, in the migrator repository) or with --device /dev/userfaultfd"
        )
    if err == errno.ENOSYS:
        return "kernel", "this kernel has no userfaultfd (CONFIG_USERFAULTFD is off)"
    if err in (errno.EPERM, errno.EACCES):
        sysctl = _sysctl_unprivileged()
        if os.geteuid() != 0 and not _has_cap(CAP_SYS_PTRACE):
            return "permission", (
                f"userfaultfd not permitted: vm.unprivileged_userfaultfd={sysctl}, no CAP_SYS_PTRACE, and "
                "/dev/userfaultfd is not accessible; run as root, set the sysctl to 1, or grant access to /dev/userfaultfd"
            )
        return "permission", f"userfaultfd not permitted ({os.strerror(err)}; vm.unprivileged_userfaultfd={sysctl})"
    return "unknown", f"userfaultfd unavailable: {os.strerror(err)}"


def probe() -> ProbeResult:
    try:
        fd, mode = create_uffd()
    except OSError as exc:
        cause, msg = explain(exc.errno or errno.EPERM)
        return ProbeResult(False, msg, cause)
    uffd = Userfaultfd(fd)
    size = 4 * mmap.PAGESIZE
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    anchor = ctypes.c_char.from_buffer(m)
    try:
        uffd.api(MIGRATION_FEATURES)
        features = uffd.supported
        addr = ctypes.addressof(anchor)
        uffd.register(addr, size)
        uffd.zeropage(addr, mmap.PAGESIZE)
        uffd.unregister(addr, size)
    except MigratorError as exc:
        return ProbeResult(False, f"userfaultfd present but unusable: {exc}", "ioctl")
    finally:
        del anchor
        m.close()
        uffd.close()
    names = [n for bit, n in abi.FEATURE_NAMES.items() if features & bit]
    if mode != FULL:
        return ProbeResult(True, (
            "userfaultfd ok but user-mode only (no CAP_SYS_PTRACE, /dev/userfaultfd not usable): the guest's own "
            "accesses are served, a system call reading a page still missing fails with EFAULT; run as root with "
            "CAP_SYS_PTRACE or grant access to /dev/userfaultfd for a full one"), "user-mode-only")  # fmt: skip
    return ProbeResult(True, f"userfaultfd ok: full (kernel-mode faults too), MISSING mode, COPY/ZEROPAGE/WAKE, "
                             f"guest memory events; kernel features {' '.join(names)}")  # fmt: skip
