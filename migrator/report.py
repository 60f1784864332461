"""Build the final Summary from a destination Outcome (pure arithmetic)."""

from __future__ import annotations

import json

from migrator.dest.session import Outcome, guest_errors
from migrator.stats import Summary, percentile, pow2_histogram


def build_summary(out: Outcome, error: str = "") -> Summary:
    m, st = out.manifest, out.stats
    npages = m.ram_size // m.page_size
    lat = sorted(st.fault_latency_ns)
    total_ns = max(out.done_ns - out.paused_ns, 1)
    state = json.loads(m.vcpu_state)
    ops_resume = sum(v["ops"] for v in state["vcpus"])
    during_s = max((out.done_ns - out.resumed_ns) / 1e9, 1e-9)
    ops_during = (out.ops.get("during_ops", ops_resume) - ops_resume) / during_s
    tid_names = {tid: f"vcpu{i}" for i, tid in enumerate(out.tids)}
    blocked = {tid_names.get(t, f"tid{t}"): ns / 1e6 for t, ns in sorted(st.blocked_ns_by_tid.items())}
    gstats = out.guest_stats.get("vcpus", [])
    verify_errors = list(out.verify.get("errors", []))
    return Summary(
        ok=not error and not verify_errors and not guest_errors(out.guest_stats),
        ram_bytes=m.ram_size,
        pages=npages,
        page_size=m.page_size,
        downtime_ms=(out.resumed_ns - out.paused_ns) / 1e6,
        total_ms=total_ns / 1e6,
        throughput_gbps=m.ram_size / total_ns,
        pages_demand=st.pages_demand,
        pages_prefetch=st.pages_prefetch,
        pages_zero=st.pages_zero,
        duplicates=st.duplicates + st.kernel_eexist,
        demand_requests=st.demand_requests,
        faults=st.faults,
        fault_p50_us=percentile(lat, 0.50) / 1e3,
        fault_p99_us=percentile(lat, 0.99) / 1e3,
        fault_max_us=(lat[-1] if lat else 0) / 1e3,
        fault_hist=pow2_histogram([v / 1e3 for v in lat]),
        blocked_ms_by_vcpu=blocked,
        blocked_ms_total=sum(blocked.values()),
        wire_bytes=st.wire_bytes,
        wire_ratio=st.wire_bytes / m.ram_size,
        compression=out.compression,
        ops_before=m.ops_per_s_before,
        ops_during=ops_during,
        ops_after=out.ops.get("after", 0.0),
        guest_stalls=sum(v.get("stalls", 0) for v in gstats),
        guest_stall_ms=sum(v.get("stall_ns", 0) for v in gstats) / 1e6,
        # the guest checks every data page; the version-table pages through them
        verified_pages=npages if out.verify.get("checked") else 0,
        verify_errors=verify_errors,
        guest_errors=guest_errors(out.guest_stats),
        release=out.release.state if out.release is not None else "confirmed",
        error=error,
        pages_discarded=st.pages_discarded,
        pages_unmapped=st.pages_unmapped,
        pages_remapped=st.pages_remapped,
        uffd_mode=st.uffd_mode or "full",
        extra={
            "faults_spurious": st.faults_spurious,
            "pages_zero_local": st.pages_zero_local,
            "kernel_eexist": st.kernel_eexist,
            "kernel_eagain": st.kernel_eagain,
            "bulk_batches": st.bulk_batches,
            "reconnects": out.reconnects,
            "raw_bytes": st.raw_bytes,
            "cpu_s": st.cpu_s,
            **({"precopy": out.precopy} if out.precopy else {}),
        },
    )
