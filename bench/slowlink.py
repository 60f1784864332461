#!/usr/bin/env python3
"""Slow links: migrate a guest between two network-namespace hosts over a tbf-limited veth.

    sudo .venv/bin/python bench/slowlink.py [--ram 1GiB] [--rates 100mbit,1gbit]
        [--modes none,zstd,auto] [--runs 3] [--json out/slowlink.json]

For each link rate and compression mode, runs `migrator source` in one namespace
(10.77.0.1) and `migrator dest --compress MODE` in the other (10.77.0.2),
and prints total time, wire bytes, and the ratio of total time to the time the
link needs for those bytes (wire bytes / link rate): 1.00 means the migration
ran exactly at the link's limit.  Medians of --runs runs, with min-max.
The namespaces and processes are removed even on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time

RATES = {"100mbit": 100e6, "1gbit": 1e9}
BURST = {"100mbit": "32kb", "1gbit": "256kb"}
MIGRATOR = os.path.join(os.path.dirname(sys.executable), "migrator")


def sh(*args: str) -> None:
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


class TwoHosts:
    def __init__(self, rate: str) -> None:
        tag = f"{os.getpid() % 10000}"
        self.src, self.dst = f"mgbench-src-{tag}", f"mgbench-dst-{tag}"
        self.rate = rate

    def __enter__(self) -> "TwoHosts":
        sh("ip", "netns", "add", self.src)
        sh("ip", "netns", "add", self.dst)
        sh("ip", "link", "add", "vb-src", "netns", self.src, "type", "veth", "peer", "name", "vb-dst", "netns", self.dst)
        for ns, dev, addr in ((self.src, "vb-src", "10.77.0.1/24"), (self.dst, "vb-dst", "10.77.0.2/24")):
            sh("ip", "-n", ns, "addr", "add", addr, "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
               "rate", self.rate, "burst", BURST[self.rate], "latency", "50ms")  # fmt: skip
        return self

    def __exit__(self, *exc: object) -> None:
        for ns in (self.src, self.dst):
            subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)


def one_run(rate: str, mode: str, ram: str) -> dict:
    with TwoHosts(rate) as hosts, tempfile.TemporaryDirectory() as tmp:
        ready = os.path.join(tmp, "ready.json")
        src = subprocess.Popen(
            ["ip", "netns", "exec", hosts.src, MIGRATOR, "source", "--listen", "10.77.0.1:7000", "--ram", ram,
             "--ready-file", ready],  # fmt: skip
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 180
            while not os.path.exists(ready):
                if src.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("source did not start")
                time.sleep(0.1)
            time.sleep(1.0)
            dst = subprocess.run(
                ["ip", "netns", "exec", hosts.dst, MIGRATOR, "dest", "--source", "10.77.0.1:7000", "--compress", mode,
                 "--run-for", "0", "--json", "--quiet"],  # fmt: skip
                capture_output=True, text=True, timeout=900,
            )
            if dst.returncode != 0:
                raise SystemExit(f"dest failed ({dst.returncode}): {dst.stderr.strip()}")
            s = json.loads(dst.stdout)
        finally:
            try:
                os.killpg(src.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            src.wait()
    link_s = s["wire_bytes"] * 8 / RATES[rate]
    return {
        "rate": rate, "mode": mode, "total_ms": s["total_ms"], "wire_bytes": s["wire_bytes"],
        "ratio_to_link": (s["total_ms"] / 1e3) / link_s if link_s else 0.0, "compression": s["compression"],
        "verified": s["verified_pages"] == s["pages"] and not s["verify_errors"],
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--ram", default="1GiB")
    ap.add_argument("--rates", default="100mbit,1gbit")
    ap.add_argument("--modes", default="none,zstd,auto")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", dest="json_out", default=None)
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/slowlink.py: needs root for network namespaces", file=sys.stderr)
        return 3
    results = []
    print(f"{'link':8s} {'mode':5s} {'total s':>18s} {'wire MiB':>9s} {'total/link':>18s}  compression")
    for rate in a.rates.split(","):
        for mode in a.modes.split(","):
            runs = [one_run(rate, mode, a.ram) for _ in range(a.runs)]
            tot = [r["total_ms"] / 1e3 for r in runs]
            rat = [r["ratio_to_link"] for r in runs]
            wire = statistics.median(r["wire_bytes"] for r in runs) / (1 << 20)
            print(f"{rate:8s} {mode:5s} {statistics.median(tot):7.2f} ({min(tot):.2f}-{max(tot):.2f}) {wire:9.1f} "
                  f"{statistics.median(rat):7.3f} ({min(rat):.3f}-{max(rat):.3f})  {runs[-1]['compression']}"
                  f"{'' if all(r['verified'] for r in runs) else '  NOT VERIFIED'}", flush=True)  # fmt: skip
            results.extend(runs)
    if a.json_out:
        os.makedirs(os.path.dirname(a.json_out) or ".", exist_ok=True)
        with open(a.json_out, "w") as f:
            json.dump({"machine": {"node": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(),
                                   "python": platform.python_version()}, "ram": a.ram, "runs": results}, f, indent=2)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
