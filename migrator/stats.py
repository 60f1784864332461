"""Counters, latency histograms and the final summary of a migration."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any


def percentile(sorted_vals: list[int], q: float) -> int:
    if not sorted_vals:
        return 0
    k = min(len(sorted_vals) - 1, max(0, int(round(q * (len(sorted_vals) - 1)))))
    return sorted_vals[k]


def pow2_histogram(values_us: list[float]) -> dict[str, int]:
    """Power-of-two buckets in µs: key '<=N' counts values in (N/2, N]."""
    hist: dict[int, int] = {}
    for v in values_us:
        b = 1
        while b < v:
            b <<= 1
        hist[b] = hist.get(b, 0) + 1
    return {f"<={k}us": hist[k] for k in sorted(hist)}


@dataclass
class DestStats:
    """Counters of the destination pipeline; updated under ``lock``."""

    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    pages_demand: int = 0
    pages_prefetch: int = 0
    pages_zero: int = 0
    pages_zero_local: int = 0
    duplicates: int = 0
    kernel_eexist: int = 0
    kernel_eagain: int = 0
    faults: int = 0
    faults_spurious: int = 0
    demand_requests: int = 0
    bulk_batches: int = 0
    wire_bytes: int = 0
    raw_bytes: int = 0
    pages_discarded: int = 0  # by the guest while pages were missing (EVENT_REMOVE)
    pages_unmapped: int = 0  # ... no longer guest RAM (EVENT_UNMAP)
    pages_remapped: int = 0  # ... moved elsewhere (EVENT_REMAP)
    uffd_mode: str = ""  # "full" or "user-mode only" (uffd/fd.py:create_uffd)
    fault_latency_ns: list[int] = field(default_factory=list)
    fault_done_ns: list[int] = field(default_factory=list)  # perf_counter_ns when each fault was resolved
    bulk_started_ns: int = 0  # perf_counter_ns of the first and last bulk batch
    bulk_finished_ns: int = 0
    # one (time.time_ns, perf_counter_ns) pair taken together: maps the two clocks
    clock_ref: tuple[int, int] = field(default_factory=lambda: (time.time_ns(), time.perf_counter_ns()))
    blocked_ns_by_tid: dict[int, int] = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds of each worker process
    timeline: list[tuple[int, str, int, int]] = field(default_factory=list)  # (t_ns, kind, pages, latency_ns)

    def add(self, **kw: int) -> None:
        with self.lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    def record_resolved(self, woken: list[tuple[int, int, int]], now: int) -> None:
        """Faults resolved at ``now`` (perf_counter_ns): latency and per-thread blocked time.

        Caller holds ``lock``.
        """
        for _page, t_fault, tid in woken:
            lat = now - t_fault
            self.fault_latency_ns.append(lat)
            self.fault_done_ns.append(now)
            self.blocked_ns_by_tid[tid] = self.blocked_ns_by_tid.get(tid, 0) + lat


@dataclass
class Summary:
    ok: bool
    ram_bytes: int
    pages: int
    page_size: int
    downtime_ms: float
    total_ms: float
    throughput_gbps: float
    pages_demand: int
    pages_prefetch: int
    pages_zero: int
    duplicates: int
    demand_requests: int
    faults: int
    fault_p50_us: float
    fault_p99_us: float
    fault_max_us: float
    fault_hist: dict[str, int]
    blocked_ms_by_vcpu: dict[str, float]
    blocked_ms_total: float
    wire_bytes: int
    wire_ratio: float
    compression: str
    ops_before: float
    ops_during: float
    ops_after: float
    guest_stalls: int
    guest_stall_ms: float
    verified_pages: int
    verify_errors: list[str]
    guest_errors: list[str]
    release: str = "confirmed"  # the source released its copy (confirmed), or why not yet
    error: str = ""
    pages_discarded: int = 0
    pages_unmapped: int = 0
    pages_remapped: int = 0
    uffd_mode: str = "full"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    def _guest_changes(self) -> str:
        """What the guest did to its own memory while pages were missing, if anything."""
        parts = [f"{n} {what}" for n, what in ((self.pages_discarded, "discarded"), (self.pages_unmapped, "unmapped"),
                                               (self.pages_remapped, "moved")) if n]  # fmt: skip
        return f"; by the guest: {', '.join(parts)}" if parts else ""

    def to_text(self) -> str:
        mib = self.ram_bytes / (1 << 20)
        installed = self.pages_demand + self.pages_prefetch + self.pages_zero
        lines = [
            f"migrated        {mib:.0f} MiB guest, {self.pages} pages of {self.page_size} B",
            f"downtime        {self.downtime_ms:.1f} ms   (source paused -> destination vCPUs running)",
            f"total time      {self.total_ms:.0f} ms   (source paused -> last page installed), {self.throughput_gbps:.2f} GB/s",
            f"pages           {installed} installed: {self.pages_demand} demand, {self.pages_prefetch} prefetch, "
            f"{self.pages_zero} zero; {self.duplicates} received twice" + self._guest_changes(),
            f"demand faults   {self.faults} faults, {self.demand_requests} requests; latency p50 {self.fault_p50_us:.0f} us, "
            f"p99 {self.fault_p99_us:.0f} us, max {self.fault_max_us:.0f} us",
            f"vCPU blocked    {self.blocked_ms_total:.1f} ms in total ("
            + ", ".join(f"{k} {v:.1f} ms" for k, v in self.blocked_ms_by_vcpu.items())
            + ")",
            f"wire            {self.wire_bytes / (1 << 20):.1f} MiB for {mib:.0f} MiB of RAM "
            f"(ratio {self.wire_ratio:.3f}, compression {self.compression})",
            f"guest progress  {self.ops_before:,.0f} ops/s before, {self.ops_during:,.0f} during, {self.ops_after:,.0f} after"
            f"; {self.guest_stalls} accesses stalled > 50 us ({self.guest_stall_ms:.0f} ms)",
            f"source copy     {'released (confirmed by the source)' if self.release == 'confirmed' else 'release ' + self.release}",
        ]
        if self.uffd_mode and self.uffd_mode != "full":
            lines.append(f"userfaultfd     {self.uffd_mode}: a system call reading a page still missing fails with EFAULT "
                         "(CAP_SYS_PTRACE or access to /dev/userfaultfd gives a full one)")  # fmt: skip
        pre = self.extra.get("precopy")
        if pre and pre.get("mode") == "pre-copy":
            lines.insert(3, f"pre-copy        {pre.get('installed', 0) + pre.get('rewritten', 0)} pages in {pre.get('rounds', 0)} "
                            f"rounds, {pre.get('seconds', 0.0):.2f} s before the pause ({pre.get('why', '')}); "
                            f"{pre.get('discarded', 0)} changed since and dropped here")  # fmt: skip
        elif pre:
            lines.insert(3, f"hot-first       the source tracked its guest's writes for {pre.get('seconds', 0.0):.2f} s "
                            "before the pause; those pages came first")  # fmt: skip
        if self.verified_pages:
            lines.append(
                f"memory verified: {self.verified_pages - len(self.verify_errors)} of {self.verified_pages} pages"
                + (f"  FAILED: {'; '.join(self.verify_errors[:3])}" if self.verify_errors else "")
            )
        if self.guest_errors:
            lines.append(f"guest self-check FAILED: {'; '.join(self.guest_errors[:3])}")
        if self.error:
            lines.append(f"error           {self.error}")
        return "\n".join(lines)
