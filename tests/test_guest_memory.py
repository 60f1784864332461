"""The guest changes its own memory while post-copy runs (issue 11): discard,
fork, mmap over, mremap, and a system call reading a missing page.

Each row of the issue's table is a test.  One migration serves the first five:
a real ``migrator source`` (``--keep-guest``: its guest stays paused after the
migration, so its RAM is the reference), a destination in its own process
(``helpers/events_dest.py``) with the bulk stream held back for a few seconds,
and, right after the resume, control commands that make the incoming guest
discard, fork, map over and move parts of its RAM and read pages.  The
evidence is independent of migrator's counters: the guest's own checks (its
version table knows which pages it gave up), the destination guest's pagemap
(was a page ever installed?), both guests' RAM through /proc/PID/mem, and the
child's fate from waitpid().

The last row (kernel-mode access) also runs the destination as root without
CAP_SYS_PTRACE (``setpriv``), and with /dev/userfaultfd unusable too
(``unshare`` + a bind mount): the first must still get a full userfaultfd, the
second a user-mode-only one, reported.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from guest_sim import pages
from helpers import procmem, procs
from helpers.guest_events import Run, run_dest
from migrator.probe import probe

RAM = "64MiB"
PS = 4096
NPAGES = (64 << 20) // PS
ZERO_PCT, TEXT_PCT = 40, 30  # the source's defaults (guest_sim --zero-pct/--text-pct)

pytestmark = pytest.mark.timeout(180)


def data_pages(start: int, n: int) -> int:
    """The first page >= start that begins a run of n pages holding data at the start
    (not zero-kind), so that an old copy installed there would be seen."""
    p = start
    while any(pages.page_kind(q, ZERO_PCT, TEXT_PCT) == pages.KIND_ZERO for q in range(p, p + n)):
        p += 1
    return p


# pages far apart, in both lanes' shares (a lane owns half of RAM each)
A = data_pages(3000, 8)  # discarded while missing
B = data_pages(6000, 1)  # installed, then discarded
C = data_pages(9000, 1)  # a forked child reads it (missing)
D = data_pages(10500, 4)  # mapped over
E = data_pages(12000, 8)  # moved elsewhere
F = data_pages(14000, 1)  # write(2) from it: a kernel-mode access

ACTIONS: list[dict[str, Any]] = [
    {"cmd": "present", "pages": [A + i for i in range(8)] + [C, D, E, F]},  # 0
    {"cmd": "discard", "first": A, "count": 8},  # 1
    {"cmd": "read-page", "page": A},  # 2
    {"cmd": "read-page", "page": B},  # 3
    {"cmd": "present", "pages": [B]},  # 4
    {"cmd": "discard", "first": B, "count": 1},  # 5
    {"cmd": "read-page", "page": B},  # 6
    {"cmd": "fork-read", "page": C},  # 7
    {"cmd": "fork-read", "page": B},  # 8
    {"cmd": "map-over", "first": D, "count": 4},  # 9
    {"cmd": "read-page", "page": D + 1},  # 10
    {"cmd": "remap", "first": E, "count": 8},  # 11
    {"cmd": "read-page", "page": E + 3},  # 12
    {"cmd": "syscall-read", "page": F},  # 13
]


@pytest.fixture(scope="module", autouse=True)
def _userfaultfd() -> None:
    result = probe()
    if not result.ok:
        pytest.skip(result.message)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("guest-memory")
    # a slow guest (20 reads a second per vCPU): it touches few pages on its own
    with procs.running_source(tmp, RAM, "--keep-guest", "--rate", "20") as (src, info):
        r = run_dest(info, ACTIONS)
        try:
            yield r
        finally:
            r.close()


def test_the_migration_completes_verified_with_every_change_counted(run: Run) -> None:
    s = run.summary
    assert s["ok"] and not s["verify_errors"] and not s["guest_errors"], s
    assert s["verified_pages"] == NPAGES
    assert s["pages_discarded"] >= 9 and s["pages_unmapped"] == 4 and s["pages_remapped"] == 8, s
    assert s["uffd_mode"] == "full"


def test_a_page_discarded_while_missing_reads_as_zeros_and_is_never_installed(run: Run) -> None:
    """madvise(DONTNEED) on missing pages: they read as zeros; the bulk stream that
    came later never installed the source's old copy (pagemap: never mapped)."""
    r = run.replies
    assert r[0]["present"][:8] == [False] * 8, "the pages were already installed: the test proves nothing"
    assert r[2]["zero"] and r[2]["check"] is None, r[2]  # the guest's own view
    # the guest's final check read them (a read fault): each got the kernel's shared zero
    # page (pagemap's frame numbers, root only), not a copy of anything
    zpfn = procmem.zero_page_pfn()
    if zpfn:
        entries = procmem.pagemap(run.pid, run.addr + A * PS, 8, PS)
        assert [e & procmem.PM_PFN_MASK == zpfn for e in entries] == [True] * 8
    for p in range(A, A + 8):
        assert any(run.src_page(p)), f"source page {p} is zero: an old copy would not show"
        assert run.dst_page(p) == bytes(PS), f"page {p}: the source's old copy was installed after the discard"


def test_a_page_discarded_after_its_install_faults_once_and_reads_zeros(run: Run) -> None:
    """No storm of spurious faults (the page table said present, the kernel had none)."""
    r = run.replies
    assert r[3]["check"] is None and not r[3]["zero"], r[3]
    assert r[4]["present"] == [True]
    assert r[6]["zero"] and r[6]["check"] is None, r[6]
    assert run.dst_page(B) == bytes(PS) and any(run.src_page(B))
    assert run.summary["extra"]["faults_spurious"] < 50, run.summary["extra"]


def test_a_forked_child_never_reads_guest_ram(run: Run) -> None:
    """Guest RAM is MADV_DONTFORK (QEMU's choice): a child never sees a half-migrated
    copy (zeros where the guest has data): it gets SIGSEGV, missing page or not."""
    assert run.replies[7]["child"] == "SIGSEGV", run.replies[7]
    assert run.replies[8]["child"] == "SIGSEGV", run.replies[8]


def test_pages_mapped_over_are_skipped_and_the_migration_goes_on(run: Run) -> None:
    """mmap(MAP_FIXED) over guest RAM: those pages are no longer guest RAM (UNMAP):
    nothing is installed there (the new mapping stays the guest's own: zeros)."""
    assert run.replies[10]["zero"] and run.replies[10]["check"] is None, run.replies[10]
    for p in range(D, D + 4):
        assert run.dst_page(p) == bytes(PS)


def test_pages_moved_by_mremap_keep_their_identity(run: Run) -> None:
    """mremap: the pages are served at their new address (REMAP), each with its own contents."""
    new = int(run.replies[11]["address"])
    assert new != run.addr + E * PS
    assert run.replies[12]["check"] is None and not run.replies[12]["zero"], run.replies[12]
    for i in range(8):
        assert run.dst_page(E + i, new + i * PS) == run.src_page(E + i), f"page {E + i} at its new address"


def test_a_system_call_reads_a_missing_page(run: Run) -> None:
    """write(2) from a missing page: the kernel's access faults too (a full uffd)."""
    r = run.replies[13]
    assert r.get("errno") is None and r["written"] == PS and r["check"] is None, r
    assert run.dst_page(F) == run.src_page(F)


# -- kernel-mode accesses and the kind of userfaultfd -------------------------------------
def _no_ptrace() -> list[str]:
    if shutil.which("setpriv") is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv (util-linux)")
    return ["setpriv", "--bounding-set=-sys_ptrace", "--inh-caps=-sys_ptrace"]


def test_root_without_cap_sys_ptrace_still_gets_a_full_userfaultfd(tmp_path: Path) -> None:
    """The syscall needs CAP_SYS_PTRACE for a full uffd (vm.unprivileged_userfaultfd=0);
    /dev/userfaultfd does not: a system call reading a missing page must work."""
    wrap = _no_ptrace()
    if not os.path.exists("/dev/userfaultfd"):
        pytest.skip("this kernel has no /dev/userfaultfd")
    with procs.running_source(tmp_path, RAM, "--keep-guest", "--rate", "20") as (_src, info):
        r = run_dest(info, [{"cmd": "syscall-read", "page": F}], wrap=wrap)
        try:
            assert r.replies[0].get("errno") is None and r.replies[0]["check"] is None, r.replies[0]
            assert r.summary["uffd_mode"] == "full" and r.summary["ok"], r.summary
        finally:
            r.close()


def test_user_mode_only_is_said_and_its_limit_is_real(tmp_path: Path) -> None:
    """Neither CAP_SYS_PTRACE nor /dev/userfaultfd (bind-mounted over, in a mount
    namespace of its own): a user-mode-only uffd.  The guest's own accesses are
    served and the migration completes; a system call reading a missing page
    fails with EFAULT; `dest --check` and the summary say so."""
    wrap = _no_ptrace()
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux)")
    hide = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount --bind /dev/null /dev/userfaultfd 2>/dev/null || true; exec "$@"', "sh"]  # fmt: skip
    check = subprocess.run([*hide, *wrap, *procs.MIGRATOR, "dest", "--check"], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "user-mode only" in check.stdout and "EFAULT" in check.stdout, check
    with procs.running_source(tmp_path, RAM, "--keep-guest", "--rate", "20") as (_src, info):
        r = run_dest(info, [{"cmd": "syscall-read", "page": F}, {"cmd": "read-page", "page": F}], wrap=[*hide, *wrap])
        try:
            assert r.replies[0].get("errno") == errno.EFAULT, r.replies[0]
            assert r.replies[1]["check"] is None and not r.replies[1]["zero"], r.replies[1]
            assert r.summary["uffd_mode"] == "user-mode only" and r.summary["ok"], r.summary
        finally:
            r.close()


def test_the_demo_inflates_a_balloon() -> None:
    """`--balloon N`: right after the resume the guest gives its last N pages back;
    the migration completes verified and says so."""
    r = procs.run([*procs.MIGRATOR, "demo", "--ram", RAM, "--balloon", "3000", "--run-for", "0", "--warmup", "0.5",
                   "--quiet"], timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "by the guest: 3000 discarded" in r.stdout, r.stdout
    assert f"memory verified: {NPAGES} of {NPAGES} pages" in r.stdout, r.stdout
