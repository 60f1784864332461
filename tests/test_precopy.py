"""Pre-copy then post-copy, and hot pages first: real processes, real uffd, real gRPC.

Evidence independent of migrator's own counters:

* the dirty tracker against writes this test makes itself, through
  ``/proc/PID/mem``, into a paused guest (pages it chose, holes included);
* after a migration, both guests' RAM read through ``/proc/PID/mem`` and
  compared page by page (the source kept paused with --keep-guest), and the
  guest's own full check of its version table;
* a guest that writes the same few pages hard while it is pre-copied, so that
  pages change after they were sent: none may be left stale.
"""

from __future__ import annotations

import json
import os
import signal
from array import array
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from guest_sim import pages
from helpers import migrate as helpers_migrate
from helpers import procmem, procs
from migrator import policy
from migrator.config import DestConfig, parse_precopy
from migrator.dest.pagestate import PRESENT
from migrator.dest.session import DestinationSession, Outcome, guest_errors
from migrator.guest import GuestProcess, GuestSpec
from migrator.probe import probe
from migrator.source.ram_reader import RamReader
from migrator.uffd import abi
from migrator.uffd.dirty import DirtyTracker

pytestmark = pytest.mark.timeout(120)
RAM = "64MiB"


@pytest.fixture(scope="module", autouse=True)
def _userfaultfd() -> None:
    result = probe()
    if not result.ok:
        pytest.skip(result.message)


# -- policy (pure) ------------------------------------------------------------------------
def test_precopy_stops_when_told() -> None:
    done = policy.precopy_done
    assert done([], 0.2, 1.0, False) == ""  # round 1 goes on
    assert done([], 1.0, 1.0, False).startswith("time limit")
    assert done([(1000, 500, 0.1)], 0.2, 0.0, True) == ""  # shrinking: on
    assert "shrinks" in done([(1000, 500, 0.1), (500, 480, 0.05)], 0.3, 0.0, True)
    assert "faster" in done([(100, 150, 0.1)], 0.2, 0.0, True)  # writes outrun the link
    assert done([(100, 150, 0.1)], 0.2, 5.0, False) == ""  # a time limit alone does not judge rates
    assert done([(1000, 10, 0.1)], 0.2, 5.0, False).startswith("converged")
    assert done([(1000, 900, 0.1)] * policy.PRECOPY_MAX_ROUNDS, 1.0, 0.0, False).endswith("rounds")


def test_and_not_and_parse() -> None:
    assert policy.and_not(b"\x01\x01\x00\x00", b"\x01\x00\x01\x00") == b"\x00\x01\x00\x00"
    assert parse_precopy("auto") == (0.0, True)
    assert parse_precopy("1.5") == (1.5, False)
    assert parse_precopy("0") == (0.0, False)
    for bad in ("banana", "-1", "9999"):
        with pytest.raises(ValueError):
            parse_precopy(bad)


# -- the tracker, against writes we make ourselves ------------------------------------------
def test_tracker_reports_exactly_the_pages_written(tmp_path: Path) -> None:
    g = GuestProcess(GuestSpec(ram=16 << 20, vcpus=1, workload="random", write_ratio=1.0))
    try:
        h = g.hello
        ps, npages = h.page_size, h.size // h.page_size
        untouched = RamReader(h.pid, h.addr, h.size, ps)
        holes = [i for i, u in enumerate(untouched.untouched_map()) if u]
        untouched.close()
        _reply, fd = g.call_fd("track")
        t = DirtyTracker(fd, h.pid, h.addr, h.size, ps)
        try:
            t.start()
            g.call("pause")  # no vCPU writes from here on: only ours
            t.scan(bytearray(npages))  # forget what the vCPUs wrote before they parked
            chosen = sorted({npages - 1, npages // 2, npages // 2 + 1, *holes[:3], *holes[-2:]})
            assert len(holes) > 10, "the guest should have never-touched pages (zero_pct 40)"
            with open(f"/proc/{h.pid}/mem", "r+b", buffering=0) as mem:
                for p in chosen:
                    mem.seek(h.addr + p * ps + 100)
                    mem.write(b"written by the test")
            got = bytearray(npages)
            assert t.scan(got) == len(chosen)
            assert [i for i, v in enumerate(got) if v] == chosen
            again = bytearray(npages)
            assert t.scan(again) == 0, "the scan must write-protect what it reported"
            present = bytearray(npages)
            t.scan(present, protect=False, category=abi.PAGE_IS_PRESENT)
            assert all(present[p] for p in chosen)
        finally:
            t.close()
    finally:
        g.kill()


# -- end to end ------------------------------------------------------------------------------
def migrated(tmp: Path, cfg_kw: Mapping[str, object], *source_args: str) -> Any:
    return helpers_migrate.migrated(tmp, RAM, cfg_kw, *source_args)


def same_as_source_at_pause(info: dict[str, object], out: Outcome) -> bytes:
    """Both guests' RAM through /proc/PID/mem, page by page; returns the source's."""
    h = out.guest.hello
    src_pid = int(info["guest_pid"])  # type: ignore[call-overload]
    src_ram = procmem.read_mem(src_pid, procmem.find_guest_ram(src_pid, h.size, h.page_size), h.size)
    dst_ram = procmem.read_mem(h.pid, h.addr, h.size)
    nbad, first_bad = procmem.mismatching_pages(src_ram, dst_ram, h.page_size)
    detail = []
    for i in first_bad[:5]:  # which version each side holds (guest_sim's page header)
        sp, dp = src_ram[i * h.page_size :][:32], dst_ram[i * h.page_size :][:32]
        detail.append((i, pages.HEADER.unpack(sp)[2:4], pages.HEADER.unpack(dp)[2:4]))
    assert nbad == 0, f"{nbad} pages differ from the source at the pause; (page, (index, version) here and there): {detail}"
    return src_ram


def stop_source(src: procs.Cmd) -> None:
    src.signal(signal.SIGTERM)
    assert src.wait(timeout=15) == 0, src.stderr()


def test_precopy_of_a_guest_writing_few_pages_hard_leaves_nothing_stale(tmp_path: Path) -> None:
    """Hot set, writes only, flat out: most pre-copied hot pages change after they were
    sent.  The destination must end byte-for-byte equal to the source at the pause."""
    cfg = {"precopy": 1.0, "hot_first": True, "write_ratio": 0.0, "verify": False}
    with migrated(tmp_path, cfg, "--workload", "hotset", "--write-ratio", "1.0") as (src, info, session, out):
        pre = out.precopy
        h = out.guest.hello
        npages = h.size // h.page_size
        src_ram = same_as_source_at_pause(info, out)
        assert pre["mode"] == "pre-copy" and pre["installed"] > npages // 4, pre
        # dropped before the handshake (stale when the pre-copy was done) or at the switch
        assert pre["discarded"] + pre.get("discarded_early", 0) > 0, f"nothing changed after it was sent? {pre}"
        # every page installed exactly once after the switch: the pre-copied ones still
        # valid, plus what post-copy installed, is every page, and nothing is missing
        st = out.stats
        assert pre["present_at_switch"] + st.pages_demand + st.pages_prefetch + st.pages_zero == npages, (pre, st)
        entries = procmem.pagemap(h.pid, h.addr, npages, h.page_size)
        assert not [i for i, e in enumerate(entries) if not e & (procmem.PM_PRESENT | procmem.PM_SWAPPED)]
        # the pages written hard (versions > 1 in the guest's own table) did change after the pre-copy began
        versions = array("I")
        versions.frombytes(src_ram[: 4 * npages])
        assert sum(1 for v in versions if v > 2) > 100
        assert guest_errors(out.guest.call("stats")) == []
        stop_source(src)


def test_precopy_auto_then_the_guest_runs_and_verifies(tmp_path: Path) -> None:
    with migrated(tmp_path, {"precopy_auto": True}, "--workload", "random", "--rate", "3000") as (src, _info, session, out):
        assert out.precopy["mode"] == "pre-copy" and out.precopy["rounds"] >= 1, out.precopy
        assert out.precopy["why"], out.precopy
        session.run_after(out, 0.5, __import__("threading").Event())
        session.finish(out)
        assert out.verify["checked"] > 0 and out.verify["errors"] == []
        assert guest_errors(out.guest_stats) == []
        stop_source(src)


def test_hot_first_sends_the_recently_written_pages_first(tmp_path: Path) -> None:
    cfg = {"hot_first": True, "write_ratio": 0.0, "verify": False, "lanes": 1}
    with migrated(tmp_path, cfg, "--workload", "hotset", "--write-ratio", "1.0", "--lanes", "1") as (src, info, session, out):
        assert out.precopy["mode"] == "hot-first tracking"
        src_ram = same_as_source_at_pause(info, out)
        h = out.guest.hello
        npages = h.size // h.page_size
        versions = array("I")
        versions.frombytes(src_ram[: 4 * npages])
        first = pages.table_pages(npages, h.page_size)
        # the guest's own table: pages it wrote (version > 1) are the hot tenth; the
        # others it never wrote since it filled them
        hot = [i for i in range(first, npages) if versions[i] > 1]
        cold = [i for i in range(first, npages) if versions[i] == 1]
        assert hot and cold
        ps = session.ps
        assert ps is not None and all(ps.state[i] == PRESENT for i in hot)
        t_hot = sorted(ps.installed_at(i) for i in hot)
        t_cold = sorted(ps.installed_at(i) for i in cold)
        # address order would put the hot tenth (low addresses) first as well: so compare
        # with the cold pages *below* the highest hot page too
        top = max(hot)
        low_cold = sorted(ps.installed_at(i) for i in cold if i < top)
        median = lambda xs: xs[len(xs) // 2]  # noqa: E731
        assert median(t_hot) < median(t_cold)
        assert median(t_hot) < median(low_cold), "hot pages did not come before the cold ones among them"
        stop_source(src)


def test_bad_precopy_value_is_one_line_exit_2(tmp_path: Path) -> None:
    r = procs.run([*procs.MIGRATOR, "dest", "--source", "127.0.0.1:1", "--precopy", "banana"], timeout=30)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "--precopy" in r.stderr, r.stderr


def test_abandoned_precopy_leaves_the_source_guest_running(tmp_path: Path) -> None:
    """A destination that starts a pre-copy and goes away: the source stops tracking and
    takes the next destination as if nothing happened."""
    from migrator.dest.source_client import GrpcControl

    with procs.running_source(tmp_path, RAM, "--switchover-timeout", "0.5") as (src, info):
        secret = str(info.get("secret") or os.environ.get("MIGRATOR_SECRET", ""))
        ctl = GrpcControl(str(info["address"]), secret=secret or None)
        it = ctl.precopy(os.urandom(16), seconds=30.0, auto=False, track_only=True, hot_first=True)
        first = next(it)
        assert first.epoch and first.round == 0
        ctl.close()  # gone, mid-tracking
        procs.wait_for(lambda: "without a switch-over" in src.stderr(), 15, what="the source ending the pre-copy")
        session = DestinationSession(DestConfig(source=str(info["address"]), progress=False, secret=secret or None))
        try:
            out = session.migrate()
            session.finish(out)
            assert out.verify["errors"] == [] and guest_errors(out.guest_stats) == []
        finally:
            session.close()
        json.dumps(out.precopy)


FAKE_PEER = '''
import json, os, sys
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
def metrics(r):  # the real peer's names (shared/peers/qemu_postcopy.py)
    q, d = r["src_query"], r["dst_query"]
    return {"total_ms": q["total-time"], "ev_downtime_ms": r["timeline"]["event_downtime_ms"],
            "pc_req": q["ram"]["postcopy-requests"], "vcpu_bt_ms": d["postcopy-vcpu-blocktime"][0]}
if __name__ == "__main__":
    args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "qemu-" + args["--tag"] + ".jsonl"), "w") as f:
        f.write(json.dumps({"meta": {}}) + "\\n")
        for rep in range(int(args["--reps"])):
            for i, name in enumerate(args["--configs"].split(",")):
                f.write(json.dumps({"config": name, "src_query": {"total-time": 1000 + i, "ram": {"postcopy-requests": 50 + rep}},
                                    "dst_query": {"postcopy-vcpu-blocktime": [188.0]},
                                    "timeline": {"event_downtime_ms": 9.0}}) + "\\n")
        f.write(json.dumps({"config": "pure-1G", "error": "boom"}) + "\\n")
'''


def test_bench_reads_the_qemu_peers_results(tmp_path: Path) -> None:
    """bench precopy --peer: the peer's own script runs, its JSON lines become our columns
    (a stand-in peer with the real one's interface: running QEMU takes minutes and root)."""
    from migrator.bench.precopy import PEER_CONFIGS, run_peer

    script = tmp_path / "peer.py"
    script.write_text(FAKE_PEER)
    got = run_peer(str(script), 2, lambda _m: None)
    assert set(got) == set(PEER_CONFIGS)
    assert got["pure-1G"]["total_with_precopy_ms"] == [1000.0, 1000.0]
    assert got["pre1s-1G"]["demand_requests"] == [50.0, 51.0]
    assert got["pre1s-1G"]["blocked_ms"] == [188.0, 188.0] and got["pure-1G"]["downtime_ms"] == [9.0, 9.0]


def test_a_sparse_batch_carries_scattered_pages_packed(tmp_path: Path) -> None:
    """Scattered pages share one batch spanning more than batch_pages pages; its data are
    exactly those pages of the image, in order (read back with protobuf's own parser)."""
    import random

    import xxhash

    from migrator.dest.local_source import _FileReader
    from migrator.source.batches import BatchBuilder
    from migrator.wire import migration_pb2 as pb

    ps, npages = 4096, 4096
    rnd = random.Random(7)
    image = bytes(rnd.getrandbits(8) for _ in range(64)) * (ps * npages // 64)
    image = b"".join(p.to_bytes(8, "little") + image[p * ps + 8 : (p + 1) * ps] for p in range(npages))
    path = tmp_path / "ram.img"
    path.write_bytes(image)
    chosen = sorted(rnd.sample(range(npages), 8))
    include = bytearray(npages)
    for p in chosen:
        include[p] = 1
    reader = _FileReader(str(path), ps)
    try:
        built = BatchBuilder(reader, bytes(npages), 8, max_span=npages).build(0, npages, bytes(include), pb.CODEC_NONE)
    finally:
        reader.close()
    msg = pb.PageBatch.FromString(built.message)
    assert msg.count == npages and built.data_pages == 8
    assert [i for i, f in enumerate(msg.flags) if f] == chosen
    assert msg.data == b"".join(image[p * ps : (p + 1) * ps] for p in chosen)
    assert xxhash.xxh3_64_intdigest(msg.data) == msg.xxh3
