"""Snapshots and lazy restore: real `migrator source` / `snapshot` / `restore` / `serve`
processes, real userfaultfd, memory compared through /proc/PID/mem.

Independent evidence: the source guest's RAM at the pause (read from
/proc/PID/mem while it is kept paused), the raw file another program wrote,
and the restored guest's RAM (read from /proc/PID/mem), never the restore's
own counters (except the fault counts the REAP test compares).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path

import pytest

from helpers import procmem, procs
from migrator.config import DestConfig
from migrator.dest.session import Outcome
from migrator.dest.workingset import first_touches, replay_runs, request_runs
from migrator.snapshot.image import MANIFEST, RAM, SUMS, holes_map, open_image
from migrator.snapshot.restore import RestoreOptions, restore, steady_state_ms
from tests.conftest import require_userfaultfd

pytestmark = pytest.mark.timeout(180)
PS = 4096


def _snapshot(tmp: Path, address: str, to: Path, *extra: str) -> dict:
    res = procs.run([*procs.MIGRATOR, "snapshot", "--source", address, "--to", str(to), "--json", *extra], timeout=60)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    return json.loads(res.stdout)


def _restored_ram(image: Path, **cfg: object) -> tuple[bytes, object]:
    """Restore ``image`` read-only and return the guest's RAM read from /proc/PID/mem."""
    got: dict[str, bytes] = {}

    def read(out: Outcome) -> None:
        h = out.guest.hello
        out.guest.call("pause")
        got["ram"] = procmem.read_mem(h.pid, h.addr, h.size)
        out.guest.call("resume")

    res = restore(RestoreOptions(image=str(image), run_for=0.3, write_ratio=0.0),
                  DestConfig(progress=False, **cfg), threading.Event(), inspect=read)  # type: ignore[arg-type]  # fmt: skip
    return got["ram"], res


def test_snapshot_restore_round_trip(tmp_path: Path) -> None:
    """snapshot -> restore: every page of the restored guest equals the source guest's at the pause."""
    require_userfaultfd()
    with procs.running_source(tmp_path, "32MiB", "--keep-guest") as (src, info):
        m = _snapshot(tmp_path, info["address"], tmp_path / "img", "--then", "release")
        assert m["then"] == "released" and m["guest"] == "guest_sim"
        # the source keeps its paused guest (--keep-guest): its RAM is the RAM at the pause
        pid = int(info["guest_pid"])
        addr = procmem.find_guest_ram(pid, 32 << 20)
        at_pause = procmem.read_mem(pid, addr, 32 << 20)
    ram, res = _restored_ram(tmp_path / "img")
    n, bad = procmem.mismatching_pages(ram, at_pause, PS)
    assert n == 0, f"{n} pages differ from the source's at the pause, e.g. {bad}"
    assert res.ok and res.summary.verify_errors == [] and res.summary.verified_pages == 8192
    assert res.image_checked == 8192 and res.image_mismatch == []
    # holes: exactly the source's zero pages, and never read as data
    img = open_image(str(tmp_path / "img"))
    zero_pages = {i for i in range(8192) if at_pause[i * PS : (i + 1) * PS] == bytes(PS)}
    assert {i for i, h in enumerate(img.holes) if h} == zero_pages
    assert os.stat(tmp_path / "img" / RAM).st_blocks * 512 <= (8192 - len(zero_pages)) * PS + (1 << 20)


def test_snapshot_resumes_the_source_guest(tmp_path: Path) -> None:
    """--then resume (the default): the source's guest runs on and can still be migrated."""
    require_userfaultfd()
    with procs.running_source(tmp_path, "16MiB") as (src, info):
        m = _snapshot(tmp_path, info["address"], tmp_path / "img")
        assert m["then"] == "resumed" and m["paused_ms"] > 0
        assert src.proc.poll() is None, src.stderr()
        dest = procs.run([*procs.MIGRATOR, "dest", "--source", info["address"], "--run-for", "0.3", "--json", "--quiet"],
                         timeout=60)  # fmt: skip
        assert dest.returncode == 0, dest.stderr
        assert json.loads(dest.stdout)["verified_pages"] == 4096


def test_restore_of_a_raw_file_written_by_another_program(tmp_path: Path) -> None:
    """dd and truncate write a memory file with holes, random data and zeros; it is restored byte for byte."""
    require_userfaultfd()
    raw = tmp_path / "vm.mem"
    subprocess.run(["truncate", "-s", "8M", str(raw)], check=True)
    for seek, count, src in ((3, 40, "/dev/urandom"), (700, 300, "/dev/urandom"), (1200, 64, "/dev/zero")):
        subprocess.run(["dd", f"if={src}", f"of={raw}", "bs=4096", f"seek={seek}", f"count={count}", "conv=notrunc",
                        "status=none"], check=True)  # fmt: skip
    res = procs.run([*procs.MIGRATOR, "snapshot", "--raw", str(raw), "--page-size", "4096", "--to", str(tmp_path / "img"),
                     "--json"], timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stderr
    m = json.loads(res.stdout)
    assert (m["guest"], m["data_pages"], m["zero_pages"]) == ("raw", 340, 2048 - 340)
    ram, r = _restored_ram(tmp_path / "img")
    assert ram == raw.read_bytes()
    # the CLI says the same, from its own check of /proc/PID/mem against the image's checksums
    cli = procs.run([*procs.MIGRATOR, "restore", str(tmp_path / "img"), "--run-for", "0.2", "--json", "--quiet"], timeout=60)
    assert cli.returncode == 0, cli.stderr
    s = json.loads(cli.stdout)
    assert s["image_checked"] == 2048 and s["image_mismatch"] == [] and s["mode"] == "lazy"


def _bad_image(tmp_path: Path) -> Path:
    raw = tmp_path / "mem"
    raw.write_bytes(os.urandom(64 * PS) + bytes(32 * PS) + os.urandom(32 * PS))
    img = tmp_path / "img"
    res = procs.run([*procs.MIGRATOR, "snapshot", "--raw", str(raw), "--to", str(img)], timeout=60)
    assert res.returncode == 0, res.stderr
    return img


def _truncate(img: Path) -> None:
    os.truncate(img / RAM, 100 * PS)


def _flip_sum(img: Path) -> None:
    data = bytearray((img / SUMS).read_bytes())
    data[80] ^= 1
    (img / SUMS).write_bytes(data)


def _punch(img: Path) -> None:
    subprocess.run(["fallocate", "-p", "-o", str(8 * PS), "-l", str(4 * PS), str(img / RAM)], check=True)


def _garbage_manifest(img: Path) -> None:
    (img / MANIFEST).write_text("{not json")


def _no_manifest(img: Path) -> None:
    (img / MANIFEST).unlink()


@pytest.mark.parametrize(("spoil", "says"), [
    (_truncate, "truncated image: ram.img has 409600 bytes, the manifest says 524288"),
    (_flip_sum, "corrupt image: pages.xxh3 does not match its hash in the manifest"),
    (_punch, "corrupt image: a page with data is a hole in ram.img"),
    (_garbage_manifest, "corrupt image: manifest.json is not valid JSON"),
    (_no_manifest, "not an image: manifest.json is missing"),
], ids=["truncated", "checksums", "hole", "manifest", "no-manifest"])  # fmt: skip
def test_unusable_image_refused_before_the_guest_starts(tmp_path: Path, spoil, says: str) -> None:  # type: ignore[no-untyped-def]
    img = _bad_image(tmp_path)
    spoil(img)
    res = procs.run([*procs.MIGRATOR, "restore", str(img), "--quiet"], timeout=30)
    # refused by the image check, which runs before any process is started: one line, exit 9
    assert res.returncode == 9, res
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("migrator: error: ") and says in lines[0], res.stderr
    assert res.stdout == ""


def test_corrupt_page_caught(tmp_path: Path) -> None:
    """A flipped byte in a data page: refused before the start with --verify-image; during the
    restore without it, when the page is read (exit 9), never installed in the guest."""
    require_userfaultfd()
    img = _bad_image(tmp_path)
    with open(img / RAM, "r+b") as f:
        f.seek(128 * PS - 100)  # the last data page
        b = f.read(1)
        f.seek(128 * PS - 100)
        f.write(bytes([b[0] ^ 0x40]))
    res = procs.run([*procs.MIGRATOR, "restore", str(img), "--quiet", "--verify-image"], timeout=30)
    assert res.returncode == 9 and "a page does not match its checksum (page=127)" in res.stderr, res
    res = procs.run([*procs.MIGRATOR, "restore", str(img), "--quiet", "--run-for", "0"], timeout=60)
    assert res.returncode == 9, res
    assert "Traceback" not in res.stderr and "page=127" in res.stderr.strip().splitlines()[-1], res.stderr


def test_replayed_working_set_cuts_faults(tmp_path: Path) -> None:
    """REAP on a repeated workload (hotset, the same vCPU state each restore): recording once,
    then prefetching that set before the resume, cuts the guest's faults by at least 90 %.

    The lanes are held back for the first second in both restores (REAP's baseline is a lazy
    restore without a background copy; with one, how many faults it saves depends on how
    fast the copy runs, not on the working set)."""
    require_userfaultfd()
    with procs.running_source(tmp_path, "32MiB", "--workload", "hotset", "--rate", "20000") as (_src, info):
        _snapshot(tmp_path, info["address"], tmp_path / "img")
    img, ws = str(tmp_path / "img"), str(tmp_path / "ws.json")

    def run(record: bool = False, **kw: object) -> object:
        opts = RestoreOptions(image=img, run_for=0.3, record_ws=ws if record else None, ws_seconds=2.0)
        return restore(opts, DestConfig(progress=False, **kw), threading.Event())  # type: ignore[arg-type]

    lazy = run(prefetch_delay=1.0)
    recorded = run(record=True)
    replayed = run(replay_ws=ws, prefetch_delay=1.0)
    assert recorded.ws_pages > 100, recorded.to_text()  # type: ignore[attr-defined]
    faults = lazy.summary.faults, replayed.summary.faults  # type: ignore[attr-defined]
    assert faults[0] >= 200, lazy.to_text()  # type: ignore[attr-defined]
    assert faults[1] <= 0.1 * faults[0], f"lazy {faults[0]} faults, replayed {faults[1]}"
    for r in (lazy, recorded, replayed):
        assert r.ok and r.summary.verified_pages == 8192, r.to_text()  # type: ignore[attr-defined]


def test_serve_an_image_to_migrator_dest(tmp_path: Path) -> None:
    """`migrator serve DIR` + the existing `migrator dest`: restores over gRPC, one after another;
    a working set recorded by one destination and replayed by the next (REAP over gRPC)."""
    require_userfaultfd()
    with procs.running_source(tmp_path, "16MiB", "--workload", "hotset", "--rate", "10000") as (_src, info):
        _snapshot(tmp_path, info["address"], tmp_path / "img")
    ready, ws = tmp_path / "serve.json", str(tmp_path / "ws.json")
    args = [*procs.MIGRATOR, "serve", str(tmp_path / "img"), "--listen", "127.0.0.1:0", "--ready-file", str(ready)]
    with procs.command(args, tmp_path, "serve") as srv:
        info = procs.wait_ready(srv, ready)
        dest = [*procs.MIGRATOR, "dest", "--source", info["address"], "--run-for", "0.3", "--json", "--quiet"]
        runs = []
        for extra in (["--record-ws", ws, "--ws-seconds", "1"], ["--replay-ws", ws]):
            res = procs.run([*dest, *extra], timeout=60)
            assert res.returncode == 0, res.stderr
            s = json.loads(res.stdout)
            assert s["ok"] and s["verified_pages"] == 4096 and s["pages_demand"] + s["pages_prefetch"] + s["pages_zero"] == 4096
            runs.append(s)
        recorded = len(json.loads(Path(ws).read_text())["pages"])
        assert recorded > 50 and runs[0]["faults"] >= recorded
        assert runs[1]["faults"] <= 0.1 * recorded, (runs[1]["faults"], recorded)
        srv.signal(15)
        assert srv.wait(timeout=30) == 0, srv.stderr()
        assert "2 restore(s) served" in srv.stdout()


# -- pure functions ---------------------------------------------------------------------------
def test_holes_map_from_seek_data(tmp_path: Path) -> None:
    f = tmp_path / "sparse"
    with open(f, "wb") as fh:
        fh.truncate(64 * PS)
        fh.seek(10 * PS)
        fh.write(b"x" * (3 * PS))
    fd = os.open(f, os.O_RDONLY)
    try:
        holes = holes_map(fd, 64, PS)
    finally:
        os.close(fd)
    assert [i for i, h in enumerate(holes) if not h] == [10, 11, 12]


def test_working_set_policy() -> None:
    assert first_touches([(5, 1, 0), (3, 2, 0), (5, 3, 1), (4, 4, 0)]) == [(5, 1), (3, 2), (4, 4)]
    assert request_runs([3, 4, 5, 9, 10, 2], limit=256) == [(3, 3), (9, 2), (2, 1)]
    assert request_runs([1, 2, 3, 4], limit=2) == [(1, 2), (3, 2)]
    assert request_runs([1, 4, 20], limit=256, gap=4) == [(1, 4), (20, 1)]
    assert replay_runs([9, 1, 2, 30], 256, before=True) == [(1, 2), (9, 1), (30, 1)]
    late = list(range(1000, 1512))  # a second chunk, touched later: requested after the first
    assert replay_runs(late + list(range(600, 88, -1)), 256, before=False) == [(1000, 256), (1256, 256), (89, 256), (345, 256)]


def test_steady_state() -> None:
    ms = 1_000_000
    # 100 marks per 100 ms from the start, but only 10 per 100 ms during the first 300 ms
    slow = [i * 10 * ms for i in range(30)]
    fast = [300 * ms + i * ms for i in range(700)]
    assert steady_state_ms([slow + fast], 0, 300 * ms) == 300.0
    assert steady_state_ms([[i * ms for i in range(1000)]], 0, 0) == 0.0
    # paced at 32,000 ops/s (a mark per ms): 40 ms behind after a 40 ms stall at 100 ms, caught up at 2x speed by 180 ms
    paced = [k * ms for k in range(1, 101)] + [140 * ms + k * ms // 2 for k in range(1, 81)] + [180 * ms + k * ms for k in range(1, 100)]
    assert 170 <= steady_state_ms([paced], 0, 0, rate=32000, every=32) <= 180
    assert steady_state_ms([[k * ms for k in range(1, 300)]], 0, 0, rate=32000, every=32) == 0.0


@pytest.mark.parametrize("cmd", ["snapshot", "restore", "serve"])
def test_help(cmd: str) -> None:
    res = procs.run([*procs.MIGRATOR, cmd, "--help"], timeout=30)
    assert res.returncode == 0 and res.stdout.startswith("Usage: ") and res.stderr == "", res


def test_bad_usage(tmp_path: Path) -> None:
    res = procs.run([*procs.MIGRATOR, "snapshot", "--to", str(tmp_path / "x")], timeout=30)
    assert res.returncode == 2 and "give exactly one of --source ADDR and --raw FILE" in res.stderr
    res = procs.run([*procs.MIGRATOR, "restore", str(tmp_path), "--eager", "--replay-ws", "ws.json"], timeout=30)
    assert res.returncode == 2 and "a working set adds nothing" in res.stderr
