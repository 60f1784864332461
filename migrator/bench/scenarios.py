"""The benchmark scenarios; each runs a real migration (or fault storm) several times.

Every migration here is the real thing: `migrator source` in its own process on
loopback, the destination pipeline in this process, the guests in theirs.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

from migrator.bench.report import table, write_json
from migrator.config import DestConfig, GuestOptions
from migrator.runner import DemoSource, run_destination_outcome
from migrator.stats import pow2_histogram

Say = Callable[[str], None]


def _migrate(guest: GuestOptions, cfg: DestConfig, warmup: float, plot: str | None = None) -> tuple[dict[str, Any], Any]:
    src = DemoSource(guest)
    try:
        time.sleep(warmup)
        dcfg = DestConfig(**{**cfg.__dict__, "source": src.address, "secret": src.secret})
        summary, out = run_destination_outcome(dcfg, threading.Event(), plot)
        src.proc.wait(timeout=60)
    finally:
        src.close()
    d = dict(summary.__dict__)
    return d, out


def _summary_row(s: dict[str, Any]) -> dict[str, Any]:
    keep = ("downtime_ms", "total_ms", "throughput_gbps", "pages_demand", "pages_prefetch", "pages_zero", "duplicates",
            "faults", "fault_p50_us", "fault_p99_us", "fault_max_us", "blocked_ms_total", "blocked_ms_by_vcpu",
            "wire_bytes", "wire_ratio", "ops_before", "ops_during", "ops_after", "compression", "fault_hist", "guest_errors")  # fmt: skip
    return {k: s[k] for k in keep}


def migrate_1g(runs: int, out_dir: str, say: Say, ram: int = 1 << 30) -> dict[str, Any]:
    guest = GuestOptions(ram=ram, vcpus=2, workload="random", write_ratio=0.5, zero_pct=40, text_pct=30)
    cfg = DestConfig(progress=False, verify=False, run_for=1.0)
    results: list[dict[str, Any]] = []
    hist_lat: list[float] = []
    for i in range(runs):
        plot = os.path.join(out_dir, "migrate-1g.png") if i == 0 and _have_mpl() else None
        s, out = _migrate(guest, cfg, warmup=1.0, plot=plot)
        hist_lat.extend(v / 1e3 for v in out.stats.fault_latency_ns)
        results.append(_summary_row(s))
        say(f"  run {i + 1}/{runs}: total {s['total_ms']:.0f} ms, downtime {s['downtime_ms']:.1f} ms, "
            f"fault p50 {s['fault_p50_us']:.0f} us, blocked {s['blocked_ms_total']:.0f} ms")  # fmt: skip

    def col(k: str) -> list[float]:
        return [float(r[k]) for r in results]

    rows = [
        ("downtime (ms)", col("downtime_ms"), "target <= 10"),
        ("total time (ms)", col("total_ms"), "target <= 1000 (QEMU 966 / preempt 818)"),
        ("throughput (GB/s of RAM)", col("throughput_gbps"), ""),
        ("demand pages", col("pages_demand"), "QEMU requests: 192 / 824"),
        ("prefetched pages", col("pages_prefetch"), ""),
        ("zero pages", col("pages_zero"), ""),
        ("received twice", col("duplicates"), ""),
        ("wire (MiB)", [v / (1 << 20) for v in col("wire_bytes")], ""),
        ("fault latency p50 (us)", col("fault_p50_us"), "target <= 300"),
        ("fault latency p99 (us)", col("fault_p99_us"), "target <= 1500"),
        ("fault latency max (us)", col("fault_max_us"), ""),
        ("vCPU blocked, sum (ms)", col("blocked_ms_total"), "target <= 400 (QEMU 640 / preempt 377)"),
        ("guest ops/s before", col("ops_before"), ""),
        ("guest ops/s during", col("ops_during"), ""),
        ("guest ops/s after", col("ops_after"), ""),
    ]
    hist = pow2_histogram(hist_lat)
    text = table(rows) + "\n  fault latency histogram (all runs): " + ", ".join(f"{k} {v}" for k, v in hist.items())
    medians = {name: statistics.median(vals) for name, vals, _ in rows}
    write_json(os.path.join(out_dir, "migrate-1g.json"), "migrate-1g", {"ram": ram, "runs": runs}, results,
               {**medians, "fault_hist": hist})  # fmt: skip
    return {"text": text, "medians": medians}


def fault_latency(runs: int, out_dir: str, say: Say, ram: int = 512 << 20) -> dict[str, Any]:
    """Demand-fault latency with the bulk stream idle (held back 2 s) vs streaming at full speed."""
    guest = GuestOptions(ram=ram, vcpus=2, workload="random", write_ratio=0.5)
    idle: list[list[float]] = []
    busy: list[list[float]] = []
    for i in range(runs):
        for mode in ("idle", "running"):
            cfg = DestConfig(progress=False, verify=False, run_for=0, prefetch_delay=2.0 if mode == "idle" else 0.0)
            _s, out = _migrate(guest, cfg, warmup=1.0)
            st = out.stats
            lat = []
            for done, l in zip(st.fault_done_ns, st.fault_latency_ns):
                in_bulk = st.bulk_started_ns and st.bulk_started_ns <= done <= (st.bulk_finished_ns or done)
                if (mode == "idle" and (not st.bulk_started_ns or done < st.bulk_started_ns)) or (mode == "running" and in_bulk):
                    lat.append(l / 1e3)
            (idle if mode == "idle" else busy).append(sorted(lat))
            say(f"  run {i + 1}/{runs} bulk {mode}: {len(lat)} faults, p50 {statistics.median(lat) if lat else 0:.0f} us")

    def pct(groups: list[list[float]], q: float) -> list[float]:
        return [g[min(len(g) - 1, int(q * (len(g) - 1)))] for g in groups if g]

    rows = [
        ("bulk idle: faults", [float(len(g)) for g in idle], ""),
        ("bulk idle: p50 (us)", pct(idle, 0.5), ""),
        ("bulk idle: p99 (us)", pct(idle, 0.99), ""),
        ("bulk running: faults", [float(len(g)) for g in busy], ""),
        ("bulk running: p50 (us)", pct(busy, 0.5), "target <= 300"),
        ("bulk running: p99 (us)", pct(busy, 0.99), "target <= 1500"),
    ]
    medians = {name: statistics.median(vals) if vals else None for name, vals, _ in rows}
    write_json(os.path.join(out_dir, "fault-latency.json"), "fault-latency", {"ram": ram, "runs": runs},
               [{"idle_us": a, "running_us": b} for a, b in zip(idle, busy)], medians)  # fmt: skip
    return {"text": table(rows), "medians": medians}


def bulk(runs: int, out_dir: str, say: Say, ram: int = 1 << 30) -> dict[str, Any]:
    """Bulk-stream throughput on loopback with compression off / on / auto."""
    guest = GuestOptions(ram=ram, vcpus=2, workload="random", write_ratio=0.5, zero_pct=40, text_pct=30)
    results: list[dict[str, Any]] = []
    rows = []
    for mode in ("none", "zstd", "auto"):
        rates, totals, ratios = [], [], []
        for i in range(runs):
            cfg = DestConfig(progress=False, verify=False, run_for=0, compress=mode)
            s, out = _migrate(guest, cfg, warmup=1.0)
            st = out.stats
            dur = max(st.bulk_finished_ns - st.bulk_started_ns, 1) / 1e9
            rate = st.raw_bytes / dur / 1e9
            rates.append(rate)
            totals.append(s["total_ms"])
            ratios.append(s["wire_ratio"])
            results.append({"mode": mode, "bulk_gbps": rate, "total_ms": s["total_ms"], "wire_ratio": s["wire_ratio"],
                            "compression": s["compression"]})  # fmt: skip
            say(f"  {mode} run {i + 1}/{runs}: bulk {rate:.3f} GB/s, total {s['total_ms']:.0f} ms")
        rows += [
            (f"{mode}: bulk stream (GB/s of page data)", rates, "gRPC server stream ceiling 0.59 (LIMITS.md)"),
            (f"{mode}: total time (ms)", totals, ""),
            (f"{mode}: wire / RAM", ratios, ""),
        ]
    medians = {name: statistics.median(vals) for name, vals, _ in rows}
    write_json(os.path.join(out_dir, "bulk.json"), "bulk", {"ram": ram, "runs": runs}, results, medians)
    return {"text": table(rows), "medians": medians}


def qemu_mix(runs: int, out_dir: str, say: Say, ram: int = 1 << 30) -> dict[str, Any]:
    """QEMU's own workload (``../shared/peers/qemu_postcopy.py``): 1 GiB, 1 vCPU, 25 %
    zero / 25 % text / 50 % random pages, random writes at 4096/s (``pure-1G``) and
    flat out (``pure-hot-1G``); post-copy at once.  Run the peer in the same sitting
    and divide: the ratios are the result, absolute times move between sittings."""
    rows = []
    results: list[dict[str, Any]] = []
    for label, rate in (("pure (4096 writes/s)", 4096), ("hot (flat out)", 0)):
        guest = GuestOptions(ram=ram, vcpus=1, workload="random", write_ratio=1.0, zero_pct=25, text_pct=25, rate=rate)
        cfg = DestConfig(progress=False, verify=False, run_for=0)
        rs = []
        for i in range(runs):
            s, _out = _migrate(guest, cfg, warmup=1.0)
            rs.append({"config": label, **_summary_row(s), "demand_requests": s["demand_requests"]})
            say(f"  {label} run {i + 1}/{runs}: total {s['total_ms']:.0f} ms, downtime {s['downtime_ms']:.1f} ms, "
                f"{s['demand_requests']} requests, blocked {s['blocked_ms_total']:.0f} ms")  # fmt: skip
        results += rs
        rows += [
            (f"{label}: total (ms)", [r["total_ms"] for r in rs], "QEMU: total-time"),
            (f"{label}: downtime (ms)", [r["downtime_ms"] for r in rs], "QEMU: STOP -> RESUME"),
            (f"{label}: demand requests", [float(r["demand_requests"]) for r in rs], "QEMU: postcopy requests"),
            (f"{label}: vCPU blocked (ms)", [r["blocked_ms_total"] for r in rs], "QEMU: postcopy-vcpu-blocktime"),
            (f"{label}: fault p50 (us)", [r["fault_p50_us"] for r in rs], ""),
            (f"{label}: fault p99 (us)", [r["fault_p99_us"] for r in rs], ""),
        ]
    medians = {name: statistics.median(vals) for name, vals, _ in rows}
    write_json(os.path.join(out_dir, "qemu-mix.json"), "qemu-mix", {"ram": ram, "runs": runs}, results, medians)
    return {"text": table(rows), "medians": medians}


def _have_mpl() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


SCENARIOS: dict[str, Callable[..., dict[str, Any]]] = {
    "migrate-1g": migrate_1g,
    "fault-latency": fault_latency,
    "bulk": bulk,
    "qemu-mix": qemu_mix,
}
