"""End to end: the destination's memory is exactly the source's at the pause.

A real ``migrator source`` (its own process, with --keep-guest so its guest
stays paused after completion), a destination run through the library in this
process, real userfaultfd and gRPC on loopback.  The evidence is independent of
migrator's own code and counters:

* both guests' RAM read through ``/proc/PID/mem`` and compared page by page;
* the source snapshot checked against its own version table with guest_sim's
  page format (so it is a consistent paused state, not a torn one);
* ``/proc/PID/pagemap`` of the destination guest: no page left missing.

With ``write_ratio=0`` on the destination the guest only reads after resuming,
so its RAM must stay byte-for-byte equal to the source's.
"""

from __future__ import annotations

import json
import signal
import threading
from array import array
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from guest_sim import pages
from helpers import migrate as helpers_migrate
from helpers import procmem, procs
from migrator.dest.session import guest_errors
from migrator.guest import GuestProcess, GuestSpec
from migrator.probe import probe

RAM = "64MiB"
RAM_BYTES = 64 << 20
WARMUP_S = 1.0

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module", autouse=True)
def _userfaultfd() -> None:
    result = probe()
    if not result.ok:
        pytest.skip(result.message)


def migrated(tmp: Path, cfg_kw: Mapping[str, object]) -> Any:
    """A 64 MiB source guest (random workload, half writes, dirtying memory for a while) migrated here."""
    return helpers_migrate.migrated(tmp, RAM, cfg_kw, "--workload", "random", "--write-ratio", "0.5", warmup_s=WARMUP_S)


def stop_source(src: procs.Cmd) -> None:
    """SIGTERM the source (as a user's Ctrl-C would stop --keep-guest), expect a clean exit."""
    src.signal(signal.SIGTERM)
    rc = src.wait(timeout=15)
    assert rc == 0, f"source exited with {rc}:\n{src.stderr()}"
    assert src.leftovers() == [], "the source's guest outlived it"


def check_snapshot_consistent(ram: bytes, page_size: int) -> int:
    """Check every data page of a RAM image against the version table at its start
    (guest_sim's page format); returns how many data pages hold data."""
    npages = len(ram) // page_size
    first = pages.table_pages(npages, page_size)
    versions = array("I")
    versions.frombytes(ram[: 4 * npages])
    errors = []
    for idx in range(first, npages):
        err = pages.check_page(ram[idx * page_size : (idx + 1) * page_size], idx, versions[idx])
        if err:
            errors.append(err)
    assert not errors, f"{len(errors)} inconsistent pages in the source snapshot, first: {errors[:5]}"
    return sum(1 for v in versions[first:] if v)


def test_destination_ram_equals_source_ram_at_pause(tmp_path: Path) -> None:
    with migrated(tmp_path, {"write_ratio": 0.0, "verify": False}) as (src, info, session, out):
        h = out.guest.hello
        ps = h.page_size
        npages = h.size // ps
        assert h.size == RAM_BYTES
        assert out.guest.alive(), "the destination guest is not running after migrate()"

        # 1. pagemap first: reading /proc/PID/mem would itself map any missing page
        entries = procmem.pagemap(h.pid, h.addr, npages, ps)
        missing = [i for i, e in enumerate(entries) if not e & (procmem.PM_PRESENT | procmem.PM_SWAPPED)]
        assert not missing, f"{len(missing)} destination pages left missing, first: {missing[:20]}"
        zpfn = procmem.zero_page_pfn()
        if zpfn:  # root sees frame numbers: zero-mapped pages are the kernel's shared zero page
            on_zero = sum(1 for e in entries if e & procmem.PM_PFN_MASK == zpfn)
            assert on_zero <= out.stats.pages_zero

        # 2. every page, byte for byte, against the paused source guest
        src_pid = int(info["guest_pid"])  # type: ignore[call-overload]
        assert procs.alive(src_pid), "--keep-guest: the source guest should still be there, paused"
        src_ram = procmem.read_mem(src_pid, procmem.find_guest_ram(src_pid, h.size, ps), h.size)
        dst_ram = procmem.read_mem(h.pid, h.addr, h.size)
        nbad, first_bad = procmem.mismatching_pages(src_ram, dst_ram, ps)
        assert nbad == 0, f"{nbad} of {npages} pages differ from the source at the pause; first: {first_bad}"

        # 3. the snapshot is a real guest state: consistent, and not trivially empty
        written = check_snapshot_consistent(src_ram, ps)
        assert written > npages // 4, f"only {written} data pages hold data: did we read the right mapping?"

        # 4. every page installed exactly once: the successful ioctls (the kernel's own
        # count of pages it took) add up to the pages; a racing second copy of a page is
        # refused by the kernel (EEXIST: never installed twice), and stays rare
        st = out.stats
        assert st.pages_demand + st.pages_prefetch + st.pages_zero == npages, st
        assert st.kernel_eexist < npages // 100, f"{st.kernel_eexist} racing second copies (EEXIST)"

        # 5. the guest read pages for a while after the migration and found nothing wrong
        gstats = out.guest.call("stats")
        assert sum(v["reads"] for v in gstats["vcpus"]) > 0
        writes_at_pause = sum(v["writes"] for v in json.loads(out.manifest.vcpu_state)["vcpus"])
        assert sum(v["writes"] for v in gstats["vcpus"]) == writes_at_pause, "write_ratio=0 but the guest wrote"
        assert guest_errors(gstats) == []

        stop_source(src)
        assert not procs.alive(src_pid)
        # the source and its copy are gone; the guest lives on here, on its own memory
        assert out.guest.alive()
        assert guest_errors(out.guest.call("stats")) == []
    assert not procs.alive(h.pid), "the destination guest outlived session.close()"


def test_guest_keeps_writing_after_migration_and_verifies(tmp_path: Path) -> None:
    with migrated(tmp_path, {}) as (src, _info, session, out):
        npages = out.guest.hello.size // out.guest.hello.page_size
        st = out.stats
        assert st.pages_demand + st.pages_prefetch + st.pages_zero == npages, st
        assert st.kernel_eexist < npages // 100
        session.run_after(out, 1.0, threading.Event())
        assert out.ops["after"] > 0, "the guest made no progress after the migration"
        session.finish(out)
        assert out.verify["checked"] > 0
        assert out.verify["errors"] == []
        assert guest_errors(out.guest_stats) == []
        writes = sum(v["writes"] for v in out.guest_stats["vcpus"])
        assert writes > 0, "the destination guest did not write (default write ratio is 0.5)"
        stop_source(src)


def test_guest_quit_releases_its_control_socket() -> None:
    """After a guest quits cleanly (what DestinationSession.finish and run_source do),
    nothing of it stays behind: not its control socket, not its /tmp/migrator-* dir."""
    guest = GuestProcess(GuestSpec(ram=16 * 4096, vcpus=1))
    try:
        assert guest.quit() == 0
        assert guest.sock.fileno() == -1, "control socket still open after quit()"
        assert not Path(guest.sock_path).parent.exists(), "temp dir left behind after quit()"
    finally:
        guest.kill()  # also closes what quit() left open
