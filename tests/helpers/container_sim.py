"""Run a command with a container's privileges, without a container engine.

    python container_sim.py --seccomp PROFILE.json [--cap CAP_X ...] [--without SYSCALL] -- COMMAND [ARG...]

What Docker does to a container's process that matters for userfaultfd, done
here by hand (root only, x86_64 or any arch libseccomp knows):

* capabilities: only the ``--cap`` ones are kept (none by default: the compose
  file's ``cap_drop: [ALL]``); they are removed from the bounding, inheritable
  and ambient sets, so the exec'd command runs as uid 0 without, in particular,
  CAP_SYS_PTRACE — as container root does;
* ``no_new_privs`` (the compose file's ``no-new-privileges=true``);
* the seccomp profile, a Docker/moby JSON profile, compiled with libseccomp under
  Docker's rules: ``includes``/``excludes`` by arch, capabilities and minimum
  kernel, argument filters, ``errnoRet``; a name this arch does not have is
  skipped.  ``--without NAME`` drops a syscall from the profile (to show what
  the profile's addition is for);
* no /dev/userfaultfd: a container has no such device unless it is passed in,
  so in a private mount namespace an unreadable empty file is bound over it.

Then the command is exec'd; its children inherit all of it.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import platform
import sys
import tempfile

CAPS = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_SETGID",
    "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN",
    "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE", "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
]  # fmt: skip  # <linux/capability.h>, bit = index

# <seccomp.h>
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP = {"SCMP_CMP_NE": 1, "SCMP_CMP_LT": 2, "SCMP_CMP_LE": 3, "SCMP_CMP_EQ": 4, "SCMP_CMP_GE": 5,
            "SCMP_CMP_GT": 6, "SCMP_CMP_MASKED_EQ": 7}  # fmt: skip
#: Go's GOARCH names, which Docker profiles use in includes/excludes.arches
GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}

PR_SET_NO_NEW_PRIVS = 38
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
CLONE_NEWNS = 0x00020000
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000


def SCMP_ACT_ERRNO(err: int) -> int:
    return 0x00050000 | (err & 0xFFFF)


class scmp_arg_cmp(ctypes.Structure):  # <seccomp.h>
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


class cap_header(ctypes.Structure):  # <linux/capability.h> __user_cap_header_struct
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class cap_data(ctypes.Structure):  # __user_cap_data_struct
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_LINUX_CAPABILITY_VERSION_3 = 0x20080522
libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _kernel_at_least(version: str) -> bool:
    want = tuple(int(x) for x in version.split("."))
    have = tuple(int(x) for x in platform.release().split("-")[0].split(".")[: len(want)])
    return have >= want


def applies(entry: dict, caps: set[str], arch: str) -> bool:
    """Docker's rule for whether a profile entry is in force for this container."""
    inc, exc = entry.get("includes") or {}, entry.get("excludes") or {}
    if inc.get("arches") and arch not in inc["arches"]:
        return False
    if inc.get("caps") and not set(inc["caps"]) <= caps:
        return False
    if inc.get("minKernel") and not _kernel_at_least(inc["minKernel"]):
        return False
    if exc.get("arches") and arch in exc["arches"]:
        return False
    if exc.get("caps") and set(exc["caps"]) & caps:
        return False
    return True


def load_seccomp(profile: dict, caps: set[str], without: set[str]) -> None:
    lib = ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(scmp_arg_cmp)]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO", "only ERRNO default profiles are supported"
    ctx = lib.seccomp_init(SCMP_ACT_ERRNO(profile.get("defaultErrnoRet", 1)))
    if not ctx:
        raise OSError("seccomp_init failed")
    arch = GOARCH.get(platform.machine(), platform.machine())
    for entry in profile["syscalls"]:
        if not applies(entry, caps, arch):
            continue
        if entry["action"] == "SCMP_ACT_ALLOW":
            action = SCMP_ACT_ALLOW
        elif entry["action"] == "SCMP_ACT_ERRNO":
            action = SCMP_ACT_ERRNO(entry.get("errnoRet", 1))
        else:
            raise ValueError(f"unsupported action {entry['action']}")
        args = entry.get("args") or []
        arr = (scmp_arg_cmp * max(len(args), 1))()
        for i, a in enumerate(args):
            masked = a["op"] == "SCMP_CMP_MASKED_EQ"
            arr[i] = scmp_arg_cmp(a["index"], SCMP_CMP[a["op"]], a["value"], a.get("valueTwo", 0) if masked else 0)
        for name in entry["names"]:
            if name in without:
                continue
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr < 0:
                continue  # not a syscall of this arch
            rc = lib.seccomp_rule_add_array(ctx, action, nr, len(args), arr)
            if rc < 0:
                raise OSError(-rc, f"seccomp_rule_add({name}): {os.strerror(-rc)}")
    rc = lib.seccomp_load(ctx)  # also sets no_new_privs
    if rc < 0:
        raise OSError(-rc, f"seccomp_load: {os.strerror(-rc)}")


def hide_userfaultfd_device() -> None:
    """In a private mount namespace, cover /dev/userfaultfd with an empty mode-000 file."""
    if not os.path.exists("/dev/userfaultfd"):
        return
    _check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
    fd, path = tempfile.mkstemp(prefix="no-userfaultfd-")
    os.close(fd)
    os.chmod(path, 0)
    try:
        _check(libc.mount(path.encode(), b"/dev/userfaultfd", None, MS_BIND, None), "bind mount over /dev/userfaultfd")
    finally:
        os.unlink(path)  # the mount keeps the inode


def drop_caps(keep: set[str]) -> None:
    last = int(open("/proc/sys/kernel/cap_last_cap").read())
    for bit in range(last + 1):
        name = CAPS[bit] if bit < len(CAPS) else f"CAP_{bit}"
        if name not in keep:
            _check(libc.prctl(PR_CAPBSET_DROP, bit, 0, 0, 0), f"PR_CAPBSET_DROP {name}")
    _check(libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "PR_CAP_AMBIENT_CLEAR_ALL")
    hdr = cap_header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (cap_data * 2)()
    _check(libc.capget(ctypes.byref(hdr), data), "capget")
    data[0].inheritable = data[1].inheritable = 0
    _check(libc.capset(ctypes.byref(hdr), data), "capset")


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seccomp", required=True, help="Docker JSON seccomp profile")
    ap.add_argument("--cap", action="append", default=[], help="capability to keep (repeatable; none by default)")
    ap.add_argument("--without", action="append", default=[], help="syscall to leave out of the profile")
    ap.add_argument("command", nargs="+")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("container_sim: must run as root")
    with open(a.seccomp) as f:
        profile = json.load(f)
    keep = set(a.cap)
    hide_userfaultfd_device()
    drop_caps(keep)
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
    load_seccomp(profile, keep, set(a.without))
    os.execvp(a.command[0], a.command)


if __name__ == "__main__":
    main(sys.argv[1:])
