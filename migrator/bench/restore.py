"""Benchmark `restore`: lazy restore vs a replayed working set (REAP) vs eager, side by side.

One `migrator source` guest (hotset workload: 90 % of accesses go to a tenth
of its memory, paced at ``rate`` ops/s per vCPU) is snapshotted once.  Every
restore starts from that image with the same vCPU state, so the guest repeats
the same accesses each time: REAP's premise (a function touches the same pages
on every invocation).  The working set is recorded once (a lazy restore with
the lanes held back ``ws_seconds``), then each run restores the image in each
mode, in turn:

* lazy: the guest resumes at once, faults fetched from the image, the lanes
  prefetch the rest;
* ws-before: the recorded set installed before the resume, then as lazy;
* ws-while: the set's requests queued ahead of the guest's faults, resumed at once;
* eager: every page installed before the resume.

Reported per mode, median (min–max) over the runs: restore latency (handshake
-> vCPUs running), first access, faults, vCPU blocked time, steady state
(``snapshot/restore.py`` defines it) and total time.  The load average is
recorded with every run: numbers taken on a busy machine say so.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import threading
from collections.abc import Callable
from typing import Any

from migrator.bench.report import med, write_json
from migrator.config import DestConfig, GuestOptions
from migrator.runner import DemoSource
from migrator.snapshot.capture import snapshot_source
from migrator.snapshot.restore import RestoreOptions, restore

MODES = ("lazy", "ws-before", "ws-while", "eager")
METRICS = (
    ("restore latency (ms)", "downtime_ms"),
    ("first access (ms)", "first_access_ms"),
    ("faults", "faults"),
    ("vCPU blocked (ms)", "blocked_ms_total"),
    ("steady state (ms)", "steady_ms"),
    ("last page (ms)", "total_ms"),
)


def _load() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def _cfg(mode: str, ws: str) -> DestConfig:
    base = DestConfig(progress=False, verify=False)
    if mode == "eager":
        return DestConfig(**{**base.__dict__, "eager": True})
    if mode.startswith("ws-"):
        return DestConfig(**{**base.__dict__, "replay_ws": ws, "replay_mode": mode[3:]})
    return base


def restore_bench(runs: int, out_dir: str, say: Callable[[str], None], ram: int = 256 << 20, rate: int = 10000,
                  ws_seconds: float = 2.0, run_for: float = 1.5) -> dict[str, Any]:  # fmt: skip
    tmp = tempfile.mkdtemp(prefix="migrator-bench-restore-")
    try:
        img, ws = os.path.join(tmp, "img"), os.path.join(tmp, "ws.json")
        src = DemoSource(GuestOptions(ram=ram, workload="hotset", write_ratio=0.5, rate=rate))
        try:
            threading.Event().wait(1.0)  # the guest runs a little before the snapshot
            taken = snapshot_source(src.address, img, then="release", secret=src.secret)
            src.proc.wait(timeout=60)
        finally:
            src.close()
        say(f"  snapshot: {ram >> 20} MiB, {taken.manifest['data_pages']} data pages, guest paused {taken.paused_ms:.0f} ms")
        rec = restore(RestoreOptions(image=img, run_for=0.5, record_ws=ws, ws_seconds=ws_seconds),
                      DestConfig(progress=False, verify=False), threading.Event())  # fmt: skip
        say(f"  working set: {rec.ws_pages} pages recorded in {ws_seconds:g} s ({rec.summary.faults} faults)")
        results: list[dict[str, Any]] = []
        for i in range(runs):
            for mode in MODES:
                load0 = _load()
                r = restore(RestoreOptions(image=img, run_for=run_for), _cfg(mode, ws), threading.Event())
                row = {k: r.as_dict()[k] for _n, k in METRICS}
                row.update(mode=mode, run=i, load=(load0, _load()), ok=r.ok, startup_ms=r.startup_ms)
                results.append(row)
                say(f"  run {i + 1}/{runs} {mode:9s}: latency {row['downtime_ms']:.1f} ms, first access "
                    f"{row['first_access_ms']:.2f} ms, {row['faults']} faults, blocked {row['blocked_ms_total']:.0f} ms, "
                    f"steady {row['steady_ms']:.0f} ms, load {load0:.2f}")  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cols = {m: [r for r in results if r["mode"] == m] for m in MODES}
    head = f"  {'':22s}" + "".join(f"{m:>26s}" for m in MODES)
    lines = [head]
    medians: dict[str, Any] = {}
    for name, key in METRICS:
        cells = []
        for m in MODES:
            vals = [float(r[key]) for r in cols[m]]
            cells.append(med(vals))
            medians[f"{m}: {name}"] = statistics.median(vals) if vals else None
        lines.append(f"  {name:22s}" + "".join(f"{c:>26s}" for c in cells))
    loads = [x for r in results for x in r["load"]]
    lines.append(f"  working set: {rec.ws_pages} pages ({rec.ws_pages * 100 // max(1, rec.image.npages)} % of RAM); "
                 f"load average during the runs {min(loads):.2f}–{max(loads):.2f}")  # fmt: skip
    write_json(os.path.join(out_dir, "restore.json"), "restore",
               {"ram": ram, "runs": runs, "rate": rate, "ws_seconds": ws_seconds, "run_for": run_for,
                "ws_pages": rec.ws_pages}, results, medians)  # fmt: skip
    return {"text": "\n".join(lines), "medians": medians}
