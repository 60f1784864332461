"""Bench ``precopy``: pure post-copy, hot-first post-copy and pre-copy + post-copy,
side by side (and, with ``--peer``, QEMU's own pure and pre-copy + post-copy in
the same sitting).

The guest is QEMU peer's workload as guest_sim can play it: 1 GiB, one vCPU,
4,096 page writes per second, 25 % zero / 25 % text / 50 % random pages
(``../shared/peers/README.md``).  The modes alternate run by run, so a noisy
moment hurts them alike.  Numbers: total time and downtime (DESIGN.md's
definitions), demand faults (uffd faults read) and requests (QEMU's
"postcopy requests"), vCPU blocked time (QEMU's postcopy-vcpu-blocktime), and
what the pre-copy did before the pause (its own time is not in the total,
as in QEMU's figures).
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from migrator.bench.report import table, write_json
from migrator.config import DestConfig, GuestOptions

Say = Callable[[str], None]

MODES: dict[str, dict[str, Any]] = {
    "pure": {},
    "hot-first": {"hot_first": True},
    "pre1s": {"precopy": 1.0, "hot_first": True},
    "pre-auto": {"precopy_auto": True, "hot_first": True},
    # the same two post-copy orders on a guest with locality (90 % of its accesses to a tenth
    # of its pages, spread over all RAM: guest_sim's hotscatter; its hotset keeps them at the
    # start of RAM, which address order already sends first): what hot-first is for; a
    # uniform random writer gives it nothing to predict
    "pure/hotscatter": {"workload": "hotscatter"},
    "hot-first/hotscatter": {"hot_first": True, "workload": "hotscatter"},
}
PEER_CONFIGS = {"pure-1G": "QEMU pure", "pre1s-1G": "QEMU pre1s"}


def loadavg() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def precopy(runs: int, out_dir: str, say: Say, ram: int = 1 << 30, peer: str | None = None) -> dict[str, Any]:
    from migrator.bench.scenarios import _migrate

    guest = GuestOptions(ram=ram, vcpus=1, workload="random", write_ratio=1.0, zero_pct=25, text_pct=25, rate=4096)
    say(f"  load average now {loadavg():.2f} (numbers taken above ~0.8 are not to be trusted)")
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    for i in range(runs):
        for mode, kw in MODES.items():
            load = loadavg()
            kw = dict(kw)
            g = GuestOptions(**{**guest.__dict__, "workload": kw.pop("workload", guest.workload)})
            cfg = DestConfig(progress=False, verify=True, run_for=0.5, **kw)
            s, out = _migrate(g, cfg, warmup=2.0)
            pre = out.precopy
            r = {"total_ms": s["total_ms"], "downtime_ms": s["downtime_ms"], "faults": s["faults"],
                 "demand_requests": s["demand_requests"], "blocked_ms": s["blocked_ms_total"],
                 "pages_demand": s["pages_demand"], "wire_mib": s["wire_bytes"] / (1 << 20),
                 "precopy_pages": pre.get("installed", 0) + pre.get("rewritten", 0),
                 "precopy_s": pre.get("seconds", 0.0),
                 "total_with_precopy_ms": s["total_ms"] + 1000 * pre.get("seconds", 0.0) * (pre.get("mode") == "pre-copy"), "precopy_rounds": pre.get("rounds", 0),
                 "precopy_why": pre.get("why", ""), "discarded": pre.get("discarded", 0),
                 "verified": not s["verify_errors"] and not s["guest_errors"], "loadavg": load}  # fmt: skip
            results[mode].append(r)
            say(f"  run {i + 1}/{runs} {mode}: total {r['total_ms']:.0f} ms, downtime {r['downtime_ms']:.1f} ms, "
                f"{r['faults']} faults / {r['demand_requests']} requests, blocked {r['blocked_ms']:.0f} ms, "
                f"pre-copy {r['precopy_pages']} pages in {r['precopy_s']:.2f} s; verified {r['verified']}; "
                f"load {load:.2f}")  # fmt: skip
    peer_rows = run_peer(peer, runs, say) if peer else {}
    rows: list[tuple[str, list[float], str]] = []
    metrics = [("total, pause -> last page (ms)", "total_ms"), ("total incl. pre-copy (ms)", "total_with_precopy_ms"),
               ("downtime (ms)", "downtime_ms"), ("demand faults", "faults"), ("demand requests", "demand_requests"),
               ("vCPU blocked (ms)", "blocked_ms"), ("pre-copy or tracking before the pause (s)", "precopy_s"),
               ("wire after the pause (MiB)", "wire_mib")]  # fmt: skip
    for label, key in metrics:
        for mode in MODES:
            rows.append((f"{mode}: {label}", [float(r[key]) for r in results[mode]], ""))
        for name, vals in peer_rows.items():
            if key in vals:
                rows.append((f"{PEER_CONFIGS[name]}: {label}", vals[key], ""))
    medians = {name: statistics.median(vals) if vals else None for name, vals, _ in rows}
    loads = [r["loadavg"] for rs in results.values() for r in rs]
    note = f"\n  load average at each run: max {max(loads):.2f}" + ("  (> 0.8: re-measure on a quiet machine)" if max(loads) > 0.8 else "")
    write_json(os.path.join(out_dir, "precopy.json"), "precopy",
               {"ram": ram, "runs": runs, "guest": guest.__dict__, "modes": MODES, "peer": bool(peer)},
               [{"mode": m, **r} for m, rs in results.items() for r in rs] + [{"peer": peer_rows}], medians)  # fmt: skip
    return {"text": table(rows) + note, "medians": medians}


def run_peer(script: str, runs: int, say: Say) -> dict[str, dict[str, list[float]]]:
    """QEMU's pure-1G and pre1s-1G in this sitting (the peer's own script; root, apt-get).
    Returns per config the metrics under migrator's names."""
    tag = f"migrator-precopy-{time.strftime('%Y%m%d-%H%M%S')}"
    say(f"  QEMU peer: {script} --configs {','.join(PEER_CONFIGS)} --reps {runs} --accel tcg (a few minutes)")
    proc = subprocess.run([sys.executable, script, "--reps", str(runs), "--accel", "tcg", "--configs",
                           ",".join(PEER_CONFIGS), "--tag", tag], capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        say(f"  QEMU peer failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")
        return {}
    spec = importlib.util.spec_from_file_location("qemu_peer", script)
    assert spec is not None and spec.loader is not None
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    path = os.path.join(peer.RESULTS, f"qemu-{tag}.jsonl")
    out: dict[str, dict[str, list[float]]] = {}
    # QEMU's total-time runs from `migrate` (so it includes its pre-copy) to the last page
    names = {"total_ms": "total_with_precopy_ms", "ev_downtime_ms": "downtime_ms", "pc_req": "demand_requests",
             "vcpu_bt_ms": "blocked_ms"}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if "meta" in r or "error" in r:
                continue
            m = peer.metrics(r)
            row = out.setdefault(r["config"], {})
            for theirs, ours in names.items():
                if m.get(theirs) is not None:
                    row.setdefault(ours, []).append(float(m[theirs]))
    return out
