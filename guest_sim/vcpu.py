"""vCPU threads: run the workload over guest RAM and check every page they read.

State that migrates (``export``/``load``) is tiny: per vCPU an RNG word, a
cursor and counters; the workload's parameters travel with it.  Everything
else, including the version table, is in guest RAM.

A vCPU parks between two operations when a pause is requested, so a paused
guest's RAM and table are always consistent.
"""

from __future__ import annotations

import ctypes
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from guest_sim import pages, workload
from guest_sim.ram import GuestRam

memmove = ctypes.memmove
STALL_NS = 50_000  # an access slower than this counts as a stall (fault wait)
TRACE_EVERY, TRACE_MAX = 32, 65536  # a CLOCK_MONOTONIC time every 32 ops, for the first 2 M ops after a start


@dataclass
class VcpuConfig:
    workload: str = "random"
    write_permille: int = 500
    zero_pct: int = 40
    text_pct: int = 30
    nvcpus: int = 2
    rate: int = 0  # operations per second per vCPU; 0 = as fast as it goes
    check: bool = True  # check every page read (False: memory not in guest_sim's format, e.g. a raw image)


@dataclass
class VcpuState:
    rng: int
    cursor: int = 0
    ops: int = 0
    reads: int = 0
    writes: int = 0
    # guest's own view of fault stalls
    stalls: int = 0
    stall_ns: int = 0
    stall_max_ns: int = 0
    hist: dict[int, int] = field(default_factory=dict)
    errors: int = 0
    first_errors: list[str] = field(default_factory=list)
    # this run's progress (not migrated): the first access done, then every TRACE_EVERY ops
    first_op_ns: int = 0
    trace: list[int] = field(default_factory=list)

    def export(self) -> dict[str, int]:
        return {"rng": self.rng, "cursor": self.cursor, "ops": self.ops, "reads": self.reads, "writes": self.writes}


class Vcpu(threading.Thread):
    def __init__(self, vid: int, ram: GuestRam, cfg: VcpuConfig, state: VcpuState, ctl: "PauseControl") -> None:
        super().__init__(name=f"vcpu{vid}", daemon=True)
        self.vid = vid
        self.ram = ram
        self.cfg = cfg
        self.state = state
        self.ctl = ctl
        self.tid = 0
        self.started_evt = threading.Event()

    def run(self) -> None:
        self.tid = threading.get_native_id()
        self.started_evt.set()
        ram, cfg, st, ctl = self.ram, self.cfg, self.state, self.ctl
        ps = ram.page_size
        buf = bytearray(ps)
        cbuf = (ctypes.c_char * ps).from_buffer(buf)
        ver = ctypes.c_uint32()
        owned = workload.owned_count(ram.first_data, ram.npages, self.vid, cfg.nvcpus)
        rnd = random.Random(st.rng)
        if owned == 0:
            return
        table, page_addr = ram.table_addr, ram.page_addr
        perf = time.perf_counter_ns
        pace_t0, pace_ops = perf(), 0  # --rate: the schedule restarts after every pause
        while True:
            if ctl.pause_req:
                ctl.park(self.vid)
                if ctl.quit:
                    return
                pace_t0, pace_ops = perf(), 0
                continue
            if cfg.rate:
                ahead = pace_ops / cfg.rate - (perf() - pace_t0) / 1e9
                if ahead > 0:
                    time.sleep(min(ahead, 0.002))  # short naps: a pause request is seen at once
                    continue
                pace_ops += 1
            st.rng = workload.xorshift64(st.rng)
            slot, st.cursor = workload.next_slot(cfg.workload, st.rng, st.cursor, owned)
            idx = workload.slot_to_page(slot, ram.first_data, self.vid, cfg.nvcpus)
            t0 = perf()
            memmove(ctypes.byref(ver), table + 4 * idx, 4)
            addr = page_addr[idx]
            memmove(cbuf, addr, ps)
            dt = perf() - t0
            if dt > STALL_NS:
                st.stalls += 1
                st.stall_ns += dt
                if dt > st.stall_max_ns:
                    st.stall_max_ns = dt
                b = (dt // 1000).bit_length()
                st.hist[b] = st.hist.get(b, 0) + 1
            err = pages.check_page(buf, idx, ver.value) if cfg.check else None
            if err:
                st.errors += 1
                if len(st.first_errors) < 10:
                    st.first_errors.append(f"vcpu{self.vid}: {err}")
            if (st.rng >> 40) % 1000 < cfg.write_permille:
                v = ver.value + 1
                kind = pages.page_kind(idx, cfg.zero_pct, cfg.text_pct) or pages.KIND_TEXT
                pages.build_page(buf, idx, v, kind, self.vid, rnd)
                memmove(addr, cbuf, ps)
                ver.value = v
                memmove(table + 4 * idx, ctypes.byref(ver), 4)
                st.writes += 1
            else:
                st.reads += 1
            st.ops += 1
            if not st.ops % TRACE_EVERY or not st.first_op_ns:
                now = time.monotonic_ns()
                st.first_op_ns = st.first_op_ns or now
                if len(st.trace) < TRACE_MAX and not st.ops % TRACE_EVERY:
                    st.trace.append(now)


class PauseControl:
    """Pause/resume handshake between the control thread and the vCPUs."""

    def __init__(self, nvcpus: int) -> None:
        self.pause_req = False
        self.quit = False
        self._cond = threading.Condition()
        self._parked: set[int] = set()
        self._nvcpus = nvcpus

    def park(self, vid: int) -> None:
        with self._cond:
            self._parked.add(vid)
            self._cond.notify_all()
            while self.pause_req and not self.quit:
                self._cond.wait()
            self._parked.discard(vid)

    def pause(self, timeout: float, alive: int) -> bool:
        """Request a pause; True once every live vCPU has parked."""
        with self._cond:
            self.pause_req = True
            return self._cond.wait_for(lambda: len(self._parked) >= alive, timeout)

    def resume(self) -> None:
        with self._cond:
            self.pause_req = False
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self.quit = True
            self.pause_req = True
            self._cond.notify_all()


def state_blob(cfg: VcpuConfig, states: list[VcpuState]) -> dict[str, Any]:
    return {"config": cfg.__dict__.copy(), "vcpus": [s.export() for s in states]}


def load_blob(blob: dict[str, Any]) -> tuple[VcpuConfig, list[VcpuState]]:
    cfg = VcpuConfig(**blob["config"])
    states = [VcpuState(**v) for v in blob["vcpus"]]
    if len(states) != cfg.nvcpus:
        raise ValueError("vCPU state does not match the vCPU count")
    if cfg.workload not in workload.WORKLOADS:
        raise ValueError(f"unknown workload {cfg.workload!r}")
    return cfg, states
