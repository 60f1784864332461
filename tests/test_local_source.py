"""The transport seam: the whole destination pipeline (the fault process, the
lanes) against a RAM image file (no network), real userfaultfd and a real guest
process; the guest's RAM must equal the image byte for byte."""

from __future__ import annotations

import threading
from pathlib import Path

from guest_sim.ram import GuestRam
from migrator.config import DestConfig
from migrator.dest.local_source import LocalControl
from migrator.dest.session import DestinationSession
from tests.conftest import require_userfaultfd

RAM = 16 << 20


def test_migration_from_a_local_image(tmp_path: Path) -> None:
    require_userfaultfd()
    image = GuestRam(RAM)  # only a buffer here: filled in guest_sim's page format
    image.fill(zero_pct=40, text_pct=30, seed=7)
    expected = bytes(image.map[:])
    path = tmp_path / "ram.img"
    path.write_bytes(expected)
    state = {"config": {"workload": "random", "write_permille": 0, "zero_pct": 40, "text_pct": 30, "nvcpus": 2},
             "vcpus": [{"rng": 11, "cursor": 0, "ops": 0, "reads": 0, "writes": 0},
                       {"rng": 13, "cursor": 0, "ops": 0, "reads": 0, "writes": 0}]}  # fmt: skip
    src = LocalControl(str(path), 4096, state)
    session = DestinationSession(DestConfig(source="local", progress=False, verify=True, run_for=0), control=src)
    try:
        out = session.migrate()
        assert src.completed.is_set()
        session.run_after(out, 0.5, threading.Event())
        pid, addr = out.guest.hello.pid, out.guest.hello.addr
        out.guest.call("pause")
        with open(f"/proc/{pid}/mem", "rb") as mem:
            mem.seek(addr)
            got = mem.read(RAM)
        assert got == expected  # read-only guest: exactly the image
        out.guest.call("resume")
        session.finish(out)
        assert out.verify["errors"] == []
        st = out.stats
        assert st.pages_demand + st.pages_prefetch + st.pages_zero == RAM // 4096
    finally:
        session.close()
