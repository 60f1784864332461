"""`migrator bench` runs its scenarios for real (small RAM here) and writes JSON."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import procs
from tests.conftest import require_userfaultfd


def test_bench_qemu_mix_prints_a_table_and_writes_json(tmp_path: Path) -> None:
    require_userfaultfd()
    out = tmp_path / "results"
    r = procs.run([*procs.MIGRATOR, "bench", "qemu-mix", "--runs", "1", "--ram", "32MiB", "--out", str(out)], timeout=180)
    assert r.returncode == 0, r.stderr
    assert "pure (4096 writes/s): vCPU blocked (ms)" in r.stdout and "hot (flat out): total (ms)" in r.stdout, r.stdout
    data = json.loads((out / "qemu-mix.json").read_text())
    assert len(data["runs"]) == 2 and all(run["guest_errors"] == [] for run in data["runs"]), data
    assert data["medians"]["hot (flat out): total (ms)"] > 0
