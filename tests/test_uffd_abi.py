"""migrator.uffd.abi against the installed <linux/userfaultfd.h>, compiled with gcc.

Independent evidence: the numbers come from the C compiler and the kernel's own
header, not from our ctypes mirror.
"""

from __future__ import annotations

import ctypes
import pathlib
import shutil
import subprocess

import pytest

from migrator.uffd import abi

HEADER = pathlib.Path("/usr/include/linux/userfaultfd.h")

# name -> C expression; every value is printed as an unsigned 64-bit decimal.
C_VALUES = {
    "sizeof_uffd_msg": "sizeof(struct uffd_msg)",
    "sizeof_uffdio_api": "sizeof(struct uffdio_api)",
    "sizeof_uffdio_register": "sizeof(struct uffdio_register)",
    "sizeof_uffdio_copy": "sizeof(struct uffdio_copy)",
    "sizeof_uffdio_zeropage": "sizeof(struct uffdio_zeropage)",
    "sizeof_uffdio_range": "sizeof(struct uffdio_range)",
    "sizeof_uffdio_writeprotect": "sizeof(struct uffdio_writeprotect)",
    "UFFDIO_WRITEPROTECT": "UFFDIO_WRITEPROTECT",
    "UFFDIO_WRITEPROTECT_MODE_WP": "UFFDIO_WRITEPROTECT_MODE_WP",
    "UFFDIO_REGISTER_MODE_WP": "UFFDIO_REGISTER_MODE_WP",
    "UFFD_FEATURE_WP_HUGETLBFS_SHMEM": "UFFD_FEATURE_WP_HUGETLBFS_SHMEM",
    "off_address": "offsetof(struct uffd_msg, arg.pagefault.address)",
    "off_flags": "offsetof(struct uffd_msg, arg.pagefault.flags)",
    "off_ptid": "offsetof(struct uffd_msg, arg.pagefault.feat.ptid)",
    "UFFDIO_API": "UFFDIO_API",
    "UFFDIO_REGISTER": "UFFDIO_REGISTER",
    "UFFDIO_UNREGISTER": "UFFDIO_UNREGISTER",
    "UFFDIO_WAKE": "UFFDIO_WAKE",
    "UFFDIO_COPY": "UFFDIO_COPY",
    "UFFDIO_ZEROPAGE": "UFFDIO_ZEROPAGE",
    "UFFD_API": "UFFD_API",
    "UFFD_EVENT_PAGEFAULT": "UFFD_EVENT_PAGEFAULT",
    "UFFD_PAGEFAULT_FLAG_WRITE": "UFFD_PAGEFAULT_FLAG_WRITE",
    "UFFD_FEATURE_THREAD_ID": "UFFD_FEATURE_THREAD_ID",
    "UFFDIO_REGISTER_MODE_MISSING": "UFFDIO_REGISTER_MODE_MISSING",
    "UFFDIO_COPY_MODE_DONTWAKE": "UFFDIO_COPY_MODE_DONTWAKE",
}

# name -> the value migrator uses
PY_VALUES = {
    "sizeof_uffd_msg": ctypes.sizeof(abi.uffd_msg),
    "sizeof_uffdio_api": ctypes.sizeof(abi.uffdio_api),
    "sizeof_uffdio_register": ctypes.sizeof(abi.uffdio_register),
    "sizeof_uffdio_copy": ctypes.sizeof(abi.uffdio_copy),
    "sizeof_uffdio_zeropage": ctypes.sizeof(abi.uffdio_zeropage),
    "sizeof_uffdio_range": ctypes.sizeof(abi.uffdio_range),
    "sizeof_uffdio_writeprotect": ctypes.sizeof(abi.uffdio_writeprotect),
    "UFFDIO_WRITEPROTECT": abi.UFFDIO_WRITEPROTECT,
    "UFFDIO_WRITEPROTECT_MODE_WP": abi.UFFDIO_WRITEPROTECT_MODE_WP,
    "UFFDIO_REGISTER_MODE_WP": abi.UFFDIO_REGISTER_MODE_WP,
    "UFFD_FEATURE_WP_HUGETLBFS_SHMEM": abi.UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
    "off_address": abi.MSG_OFF_ADDRESS,
    "off_flags": abi.MSG_OFF_FLAGS,
    "off_ptid": abi.MSG_OFF_PTID,
    "UFFDIO_API": abi.UFFDIO_API,
    "UFFDIO_REGISTER": abi.UFFDIO_REGISTER,
    "UFFDIO_UNREGISTER": abi.UFFDIO_UNREGISTER,
    "UFFDIO_WAKE": abi.UFFDIO_WAKE,
    "UFFDIO_COPY": abi.UFFDIO_COPY,
    "UFFDIO_ZEROPAGE": abi.UFFDIO_ZEROPAGE,
    "UFFD_API": abi.UFFD_API,
    "UFFD_EVENT_PAGEFAULT": abi.UFFD_EVENT_PAGEFAULT,
    "UFFD_PAGEFAULT_FLAG_WRITE": abi.UFFD_PAGEFAULT_FLAG_WRITE,
    "UFFD_FEATURE_THREAD_ID": abi.UFFD_FEATURE_THREAD_ID,
    "UFFDIO_REGISTER_MODE_MISSING": abi.UFFDIO_REGISTER_MODE_MISSING,
    "UFFDIO_COPY_MODE_DONTWAKE": abi.UFFDIO_COPY_MODE_DONTWAKE,
}


def _c_source() -> str:
    lines = [
        "#include <stddef.h>",
        "#include <stdio.h>",
        "#include <sys/ioctl.h>",
        "#include <linux/userfaultfd.h>",
        "int main(void) {",
    ]
    for name, expr in C_VALUES.items():
        lines.append(f'    printf("%s %llu\\n", "{name}", (unsigned long long)({expr}));')
    lines += ["    return 0;", "}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def kernel_header_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc not found: cannot check the ABI against <linux/userfaultfd.h>")
    if not HEADER.exists():
        pytest.skip(f"{HEADER} not found (install the kernel/libc headers, e.g. linux-libc-dev)")
    tmp = tmp_path_factory.mktemp("uffd_abi")
    src = tmp / "abi.c"
    exe = tmp / "abi"
    src.write_text(_c_source())
    build = subprocess.run([gcc, "-O0", "-o", str(exe), str(src)], capture_output=True, text=True, timeout=60)
    assert build.returncode == 0, f"gcc failed:\n{build.stderr}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=10, check=True)
    values = {}
    for line in run.stdout.splitlines():
        name, value = line.split()
        values[name] = int(value)
    assert set(values) == set(C_VALUES)
    return values


@pytest.mark.parametrize("name", list(C_VALUES))
def test_matches_kernel_header(kernel_header_values: dict[str, int], name: str) -> None:
    assert PY_VALUES[name] == kernel_header_values[name], (
        f"{name}: migrator.uffd.abi has {PY_VALUES[name]:#x}, "
        f"<linux/userfaultfd.h> has {kernel_header_values[name]:#x}"
    )


def test_msg_offsets_match_struct_unpacking() -> None:
    """fd.py decodes messages with a struct format; it must agree with the ctypes layout."""
    from migrator.uffd import fd

    msg = abi.uffd_msg()
    msg.event = abi.UFFD_EVENT_PAGEFAULT
    msg.arg.pagefault.flags = abi.UFFD_PAGEFAULT_FLAG_WRITE
    msg.arg.pagefault.address = 0x7F00_1234_5000
    msg.arg.pagefault.feat.ptid = 4242
    event, flags, address, ptid = fd._MSG.unpack(bytes(msg))
    assert (event, flags, address, ptid) == (abi.UFFD_EVENT_PAGEFAULT, 1, 0x7F00_1234_5000, 4242)


# Newer than Debian 12's 6.1 headers: checked against them where they have them
# (a 6.7+ linux-libc-dev), and against this kernel's behaviour always
# (tests/test_precopy.py: the tracker finds exactly the pages a test wrote).
NEW_C_VALUES = {
    "UFFD_FEATURE_WP_UNPOPULATED": ("<linux/userfaultfd.h>", "UFFD_FEATURE_WP_UNPOPULATED", abi.UFFD_FEATURE_WP_UNPOPULATED),
    "UFFD_FEATURE_WP_ASYNC": ("<linux/userfaultfd.h>", "UFFD_FEATURE_WP_ASYNC", abi.UFFD_FEATURE_WP_ASYNC),
    "PAGEMAP_SCAN": ("<linux/fs.h>", "PAGEMAP_SCAN", abi.PAGEMAP_SCAN),
    "sizeof_pm_scan_arg": ("<linux/fs.h>", "sizeof(struct pm_scan_arg)", ctypes.sizeof(abi.pm_scan_arg)),
    "sizeof_page_region": ("<linux/fs.h>", "sizeof(struct page_region)", ctypes.sizeof(abi.page_region)),
    "PAGE_IS_WRITTEN": ("<linux/fs.h>", "PAGE_IS_WRITTEN", abi.PAGE_IS_WRITTEN),
    "PAGE_IS_PRESENT": ("<linux/fs.h>", "PAGE_IS_PRESENT", abi.PAGE_IS_PRESENT),
    "PM_SCAN_WP_MATCHING": ("<linux/fs.h>", "PM_SCAN_WP_MATCHING", abi.PM_SCAN_WP_MATCHING),
    "PM_SCAN_CHECK_WPASYNC": ("<linux/fs.h>", "PM_SCAN_CHECK_WPASYNC", abi.PM_SCAN_CHECK_WPASYNC),
}


def test_pagemap_scan_struct_offsets() -> None:
    """struct pm_scan_arg is twelve u64 in the kernel's order (include/uapi/linux/fs.h)."""
    names = [f[0] for f in abi.pm_scan_arg._fields_]
    assert names == ["size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
                     "category_inverted", "category_mask", "category_anyof_mask", "return_mask"]
    assert abi.PAGEMAP_SCAN == 0xC0606610  # _IOWR('f', 16, 96 bytes)


def test_new_abi_matches_kernel_header_when_it_has_it(tmp_path: pathlib.Path) -> None:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc not found")
    lines = ["#include <stdio.h>", "#include <sys/ioctl.h>", "#include <linux/userfaultfd.h>", "#include <linux/fs.h>",
             "int main(void) {"]
    for name, (_header, expr, _ours) in NEW_C_VALUES.items():
        lines.append(f'    printf("%s %llu\\n", "{name}", (unsigned long long)({expr}));')
    lines += ["    return 0;", "}"]
    src, exe = tmp_path / "new.c", tmp_path / "new"
    src.write_text("\n".join(lines) + "\n")
    build = subprocess.run([gcc, "-o", str(exe), str(src)], capture_output=True, text=True, timeout=60)
    if build.returncode != 0:
        pytest.skip("the installed kernel headers predate WP_ASYNC/PAGEMAP_SCAN (6.7): checked by behaviour instead")
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=10, check=True).stdout
    values = {k: int(v) for k, v in (line.split() for line in out.splitlines())}
    assert values == {name: ours for name, (_h, _e, ours) in NEW_C_VALUES.items()}
