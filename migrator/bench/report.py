"""Medians with ranges, and a JSON record with the machine it ran on."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from typing import Any


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            info["mem_kib"] = int(f.readline().split()[1])
    except OSError:
        pass
    try:
        import grpc
        import zstandard

        info["grpcio"] = grpc.__version__
        info["zstandard"] = zstandard.__version__
    except ImportError:
        pass
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(__file__))  # fmt: skip
        if rev.returncode == 0:
            info["git"] = rev.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info


def med(values: list[float]) -> str:
    """'median (min–max)' with sensible precision."""
    if not values:
        return "-"
    m, lo, hi = statistics.median(values), min(values), max(values)

    def f(v: float) -> str:
        a = abs(v)
        if a >= 100:
            return f"{v:,.0f}"
        if a >= 10:
            return f"{v:.1f}"
        return f"{v:.2f}"

    return f"{f(m)} ({f(lo)}–{f(hi)})"


def table(rows: list[tuple[str, list[float], str]]) -> str:
    """rows: (metric, values, target or note)."""
    w = max(len(r[0]) for r in rows)
    cells = [(name, med(vals), note) for name, vals, note in rows]
    w2 = max(len(c[1]) for c in cells)
    return "\n".join(f"  {n:<{w}}  {v:>{w2}}  {t}" for n, v, t in cells)


def write_json(path: str, scenario: str, params: dict[str, Any], runs: list[dict[str, Any]], medians: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"scenario": scenario, "machine": machine(), "params": params, "medians": medians, "runs": runs}, f, indent=2)
