"""One post-copy migration, destination side, from empty guest to completion.

Steps (the downtime is 4 to 6; everything slow happens before the pause):

 1. describe the source's guest (no pause) and start an empty incoming guest;
    it passes its userfaultfd; UFFDIO_API (``MIGRATION_FEATURES``: the guest's memory
    events) + UFFDIO_REGISTER (MISSING) on it;
 2. start the worker processes (``crew.py``): the fault process (fault
    threads, the urgent stream) and the bulk lanes, each connected to its
    own server on the source, all holding the uffd and the shared page state;
 2b. (``--precopy``/``--hot-first``) pre-copy: the source tracks its running
    guest's writes and the lanes install its pages in rounds, into this
    still-paused guest; when the source says "switch now" the lanes stop
    (``precopy.py`` has the design);
 3. handshake: the source pauses its guest and returns the vCPU state
    (retried with the same token across a lost connection); the fault process
    opens its urgent stream at once;
 4. switch-over: the source records that this side may run the guest; only
    then is it resumed here;
 5. resume the guest with that state (after a pre-copy it first drops the
    pages that changed on the source since they were sent): it runs, faulting
    on missing pages; the lanes start streaming;
 6. wait until every page is present, or discarded or unmapped by the guest
    (the page state in shared memory), watching the guest and every worker; a lost connection is
    reconnected by each worker, this session says so and keeps the deadline;
 7. stop the workers, UFFDIO_UNREGISTER, close the uffd, then Complete: only
    now may the source drop its copy.  Complete is retried (``release.py``)
    until the source confirms; a complete guest is never stopped for want of
    that confirmation.

Any failure before the switch-over cancels the migration (the source resumes
its guest).  After it, the guest's memory is split between two hosts: this
side reports, stops its guest, and says how to take it back on the source.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from migrator.config import DestConfig
from migrator.dest import workingset
from migrator.dest.crew import Crew, event_error
from migrator.dest.pagestate import EPOCH, PageState
from migrator.dest.precopy import PrecopyPhase
from migrator.dest.priority import deprioritize, restore_priority
from migrator.dest.release import Release
from migrator.dest.source_client import Control, GrpcControl, port_address
from migrator.errors import (
    AuthError,
    GuestDied,
    GuestError,
    GuestStalled,
    MigrationEnded,
    MigratorError,
    ProtocolError,
    SourceUnreachable,
    TransportError,
    UffdError,
)
from migrator.guest import GuestProcess, GuestSpec
from migrator.stats import DestStats
from migrator.uffd.fd import MIGRATION_FEATURES, Userfaultfd
from migrator.wire import migration_pb2 as pb

log = logging.getLogger("migrator.dest")
T = TypeVar("T")
MAX_LANES = 16
OUTAGE_GRACE_S = 2.0  # a worker that notices a cut this long after the others: the same outage


@dataclass
class Progress:
    """What the live display shows; produced every ~0.2 s."""

    elapsed_s: float
    present: int
    npages: int
    demand: int
    prefetch: int
    zero: int
    ops_per_s: float
    phase: str


@dataclass
class Outcome:
    manifest: pb.Manifest
    stats: DestStats
    guest: GuestProcess
    paused_ns: int = 0
    resumed_ns: int = 0
    done_ns: int = 0
    ops: dict[str, float] = field(default_factory=dict)
    guest_stats: dict[str, Any] = field(default_factory=dict)
    verify: dict[str, Any] = field(default_factory=dict)
    compression: str = "none"
    tids: list[int] = field(default_factory=list)
    reconnects: int = 0
    release: "Release | None" = None
    precopy: dict[str, Any] = field(default_factory=dict)  # what the pre-copy did (empty: none)
    resumed_mono_ns: int = 0  # the guest's CLOCK_MONOTONIC at its resume
    touched: list[tuple[int, int]] = field(default_factory=list)  # (page, monotonic ns) first faults, in order


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


class DestinationSession:
    def __init__(self, cfg: DestConfig, control: Control | None = None) -> None:
        self.cfg = cfg
        self.control = control
        self._failure: BaseException | None = None
        self._failed = threading.Event()
        self.guest: GuestProcess | None = None
        self.uffd: Userfaultfd | None = None
        self.crew: Crew | None = None
        self.ps: PageState | None = None
        self.release: Release | None = None
        self._lanes_due = 0.0
        self._last_ops = 0
        self._switching = False
        self.precopy: PrecopyPhase | None = None
        self.token = os.urandom(16)  # names this destination's handshake (idempotent retries)
        self.say: Callable[[str], None] = lambda m: log.warning("%s", m)

    def fail(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc
        self._failed.set()

    def _check(self) -> None:
        if self._failure is not None:
            exc = self._failure
            if isinstance(exc, MigratorError):
                raise exc
            raise MigratorError(f"internal error in a migration thread: {exc!r}") from exc
        if self.guest is not None and not self.guest.alive():
            raise GuestDied("the destination guest died", exit=self.guest.proc.returncode)

    def migrate(self, on_progress: Callable[[Progress], None] | None = None) -> Outcome:
        """Run steps 1-7; returns with the guest running on this side."""
        cfg = self.cfg
        if self.control is None:
            self.control = GrpcControl(cfg.source, secret=cfg.secret, tls=cfg.tls, connect_timeout=cfg.connect_timeout)
        ctl = self.control
        desc = ctl.describe()
        self.precopy = pre_phase = PrecopyPhase(cfg, ctl, self.token, self.say, self._check)
        pre_phase.track_early()  # hot-first alone: the source tracks while this side starts
        spec = GuestSpec(ram=desc.ram_size, page_size=desc.page_size, vcpus=desc.vcpus or 2, incoming=True)
        self.guest = guest = GuestProcess(spec)
        h = guest.hello
        assert h.uffd is not None
        self.uffd = uffd = Userfaultfd(h.uffd)
        uffd.api(MIGRATION_FEATURES)
        uffd.register(h.addr, h.size)
        npages = h.size // h.page_size
        self.ps = ps = PageState.create(npages)
        manifest: pb.Manifest | None = None
        switched = resumed = False
        try:
            # Everything that does not need the manifest is ready before the pause.
            self.crew = crew = self._start_crew(desc, ps, uffd.fd, h.addr, h.page_size)
            niced = deprioritize(guest.hello.pid, cfg.guest_nice)  # vCPU threads inherit it
            pre = pre_phase.run(crew, ps, guest)
            # the source pauses; a source gone before it answered will not come back: a shorter wait
            manifest = self._retrying("handshake", lambda: ctl.handshake(self.token), min(cfg.reconnect_deadline, 30.0))
            t_hs = time.time_ns()
            if manifest.ram_size != h.size or manifest.page_size != h.page_size:
                raise ProtocolError("manifest does not match the guest", ram=manifest.ram_size, page_size=manifest.page_size)
            state = json.loads(manifest.vcpu_state)
            discard = pre_phase.at_switch(manifest, ps, len(crew.lanes))
            t_st = time.time_ns()
            ps.words[EPOCH] = manifest.epoch
            urgent = crew.open_urgent(manifest.epoch)  # opens while the switch-over travels
            # Only once the source has recorded the switch-over may the guest run here.
            self._switching = True
            self._retrying("switch-over", ctl.switchover)
            switched = True
            crew.fault.wait(urgent, 10)  # no fault waits for the urgent stream to open
            t_sw = time.time_ns()
            lanes_started = workingset.before_resume(cfg, crew, ps, manifest.epoch, self._check)  # replay, eager
            reply = guest.call("resume", state=state, write_ratio=cfg.write_ratio, drop=discard)
            resumed = True
            self._lanes_due = time.monotonic() + cfg.prefetch_delay  # (held back only to measure an idle bulk)
            if cfg.prefetch_delay <= 0 and not lanes_started:
                crew.start_lanes(manifest.epoch, pre_phase.resync)
                self._lanes_due = 0.0
            out = Outcome(manifest, DestStats(), guest, paused_ns=manifest.paused_unix_ns, resumed_ns=int(reply["resumed_ns"]))
            out.precopy = pre
            out.tids = list(reply.get("tids", []))
            out.resumed_mono_ns = int(reply.get("mono_ns", 0))
            if cfg.balloon_pages:
                self._balloon(guest, cfg.balloon_pages)
            log.debug("handshake->resume %.1f ms (stale pages %.1f ms, switch-over %.1f ms, %d runs dropped)",
                      (out.resumed_ns - t_hs) / 1e6, (t_st - t_hs) / 1e6, (t_sw - t_st) / 1e6, len(discard))  # fmt: skip
            self._wait_all_present(out, on_progress)
            out.done_ns = time.time_ns()
            if niced:
                restore_priority(guest.hello.pid, out.tids)
        except BaseException as exc:
            if self.crew is not None:
                self.crew.kill()
            guest.kill()
            uffd.close()
            told = self._failed_because(exc, manifest, switched, resumed)
            if told is exc:
                raise
            raise told from exc
        self._collect(out, crew.stop())
        out.stats.uffd_mode = h.uffd_mode
        with contextlib.suppress(UffdError):  # best effort: closing the uffd unregisters what is left
            uffd.unregister(h.addr, h.size)  # (the guest may have moved or unmapped some of it)
        uffd.close()
        # Every page is here: the source may release its copy.  Confirmed, or
        # retried in the background; never a reason to stop this guest.
        self.release = Release(ctl, npages, self.say, self.fail)
        out.release = self.release
        self.release.start()
        return out

    def _balloon(self, guest: GuestProcess, count: int) -> None:
        """The guest gives its last ``count`` data pages back, as a balloon driver
        inflating would (madvise DONTNEED): the guest-memory events at work."""
        h = guest.hello
        npages = h.size // h.page_size
        count = min(count, npages - h.table_pages)
        guest.call("discard", first=npages - count, count=count, timeout=30)  # GuestError if it cannot

    def _start_crew(self, desc: pb.Manifest, ps: PageState, uffd_fd: int, base: int, page_size: int) -> Crew:
        cfg = self.cfg
        if not desc.lane_port_offsets or not desc.urgent_port_offset:
            raise ProtocolError("the source did not say where its page servers listen")
        lanes = max(1, min(cfg.lanes, MAX_LANES))
        offsets = list(desc.lane_port_offsets)
        local = getattr(self.control, "worker_source", None)  # an image: every worker reads the file
        if local is not None:
            source: dict[str, Any] = local(ps.fd)  # (the page state: a local source skips what is here)
            urgent, lane_addrs = "", [""] * lanes
        else:
            tls = cfg.tls
            source = {"kind": "grpc", "secret": cfg.secret,
                      "tls": {"cert": tls.cert, "key": tls.key, "ca": tls.ca} if tls.enabled else None}  # fmt: skip
            urgent = port_address(cfg.source, desc.urgent_port_offset)
            lane_addrs = [port_address(cfg.source, offsets[i % len(offsets)]) for i in range(lanes)]
        crew = Crew(
            ps, uffd_fd, base, page_size, lanes, source, urgent, lane_addrs,
            window=cfg.demand_window, fault_threads=cfg.fault_threads, batch_pages=cfg.batch_pages,
            compress=cfg.compress, loopback=local is not None or _is_loopback(cfg.source),
            connect_timeout=cfg.connect_timeout,
        )  # fmt: skip
        try:
            crew.wait_ready(cfg.connect_timeout + 30)
        except BaseException:
            crew.kill()
            raise
        return crew

    def _retrying(self, what: str, call: Callable[[], T], deadline_s: float | None = None) -> T:
        """``call`` until it answers, across a lost connection, for up to the reconnect
        deadline; a refusal (or the guest dying here) ends it at once."""
        deadline_s = self.cfg.reconnect_deadline if deadline_s is None else deadline_s
        deadline = time.monotonic() + deadline_s
        backoff = 0.1
        said = False
        while True:
            try:
                return call()
            except (SourceUnreachable, TransportError) as exc:
                if isinstance(exc, AuthError) or time.monotonic() + backoff > deadline:
                    raise
                if not said:
                    self.say(f"source unreachable during the {what} ({exc}); retrying for up to {deadline_s:g} s")
                    said = True
            self._check()
            time.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    def _failed_because(self, exc: BaseException, manifest: pb.Manifest | None, switched: bool, resumed: bool) -> BaseException:
        """What a failure means for the guest, in one line (the guest here is stopped)."""
        ctl = self.control
        assert ctl is not None
        if manifest is not None and not switched:
            # the guest never ran here: the source may resume its copy at once
            try:
                ctl.cancel(f"destination failed before the switch-over: {exc}")
            except MigratorError:
                if self._switching and isinstance(exc, TransportError):
                    # the switch-over may have reached the source (only its answer was lost)
                    return type(exc)(
                        f"{exc}; the source may have recorded the switch-over, but the guest never ran here: "
                        f"taking it back on the source is safe: `migrator rollback --source {self.cfg.source} --force`"
                    )
            return exc
        if switched and not isinstance(exc, MigrationEnded) and isinstance(exc, MigratorError):
            how = "after the switch-over" if not resumed else "while pages were missing"
            return type(exc)(
                f"{exc}; the destination failed {how}: its guest is stopped, and the source keeps its paused "
                f"copy: take it back there with `migrator rollback --source {self.cfg.source} --force`"
            )
        return exc

    def _wait_all_present(self, out: Outcome, on_progress: Callable[[Progress], None] | None) -> None:
        """Until every page is present: progress, the workers' events, recovery, the deadline."""
        ps, crew, cfg = self.ps, self.crew, self.cfg
        assert ps is not None and crew is not None
        npages, nslots = ps.npages, crew.nslots
        t0 = last_show = time.monotonic()
        last_ops: tuple[float, int] | None = None
        lost: set[str] = set()
        lost_since = back_at = 0.0  # an outage: from the first "lost" to the last "back" (+ a grace)
        while ps.done() < npages:
            name, ev = crew.next_event(0.02)
            kind = ev.get("event")
            if kind == "lost":
                if not lost and not back_at:  # a new outage (workers notice one cut at different times)
                    lost_since = time.monotonic()
                    self._say_lost(ev)
                lost.add(name)
            elif kind == "back":
                lost.discard(name)
                if not lost:
                    back_at = time.monotonic()
            elif kind in ("fatal", "exited"):
                raise event_error(name, ev)
            if self._lanes_due and time.monotonic() >= self._lanes_due:
                self._lanes_due = 0.0
                crew.start_lanes(out.manifest.epoch, self.precopy is not None and self.precopy.resync)
            if back_at and not lost and time.monotonic() - back_at > OUTAGE_GRACE_S:
                back_at = 0.0
                out.reconnects += 1
                self.say(f"reconnected to the source (reconnection {out.reconnects}); "
                         f"{npages - ps.done()} pages still missing")  # fmt: skip
            if lost and time.monotonic() - lost_since > cfg.reconnect_deadline:
                raise SourceUnreachable(
                    f"source unreachable for {cfg.reconnect_deadline:g} s, giving up; the guest's memory is split "
                    f"between the two hosts and this side cannot finish"
                )
            self._check()
            now = time.monotonic()
            if on_progress is not None and now - last_show >= 0.2:
                last_show = now
                ops = self._guest_ops()
                rate = (ops - last_ops[1]) / (now - last_ops[0]) if last_ops else 0.0
                last_ops = (now, ops)
                t = ps.totals(nslots)
                fault = ps.counters(0)
                on_progress(Progress(now - t0, ps.done(), npages, fault.get("data_pages"),
                                     t["data_pages"] - fault.get("data_pages"), t["zero_pages"], rate, "migrating"))  # fmt: skip
        if back_at:  # the last outage ended just before the last page
            out.reconnects += 1
            self.say(f"reconnected to the source (reconnection {out.reconnects})")
        self._check()
        # the guest's op counter at the last page; report.py turns it into ops/s during
        out.ops["during_ops"] = self._guest_ops()

    def _say_lost(self, ev: dict[str, Any]) -> None:
        """Say once that the source is unreachable, unless it ended the migration
        (then the worker's next attempt fails with that, and that is all there is to say)."""
        ctl = self.control
        assert ctl is not None
        try:
            ctl.switchover(timeout=2.0)  # idempotent: "is this migration still on?"
        except MigrationEnded as exc:
            raise exc
        except MigratorError:
            pass
        self.say(f"source unreachable ({ev.get('error', '')}); the guest waits for its pages; reconnecting for up to "
                 f"{self.cfg.reconnect_deadline:g} s")  # fmt: skip

    def _collect(self, out: Outcome, reports: dict[str, dict[str, Any]]) -> None:
        """The workers' counters (shared memory) and final reports into the summary's stats."""
        ps, crew = self.ps, self.crew
        assert ps is not None and crew is not None
        st = out.stats
        t = ps.totals(crew.nslots)
        fault = ps.counters(0)
        st.pages_demand = fault.get("data_pages")
        st.pages_prefetch = t["data_pages"] - st.pages_demand
        st.pages_zero, st.pages_zero_local = t["zero_pages"], t["zero_local"]
        st.duplicates, st.kernel_eexist, st.kernel_eagain = t["duplicates"], t["kernel_eexist"], t["kernel_eagain"]
        st.faults, st.faults_spurious, st.demand_requests = t["faults"], t["faults_spurious"], t["demand_requests"]
        st.bulk_batches, st.wire_bytes, st.raw_bytes = t["batches"], t["wire_bytes"], t["raw_bytes"]
        st.pages_discarded, st.pages_unmapped, st.pages_remapped = t["discarded"], t["unmapped"], t["remapped"]
        st.clock_ref = (time.time_ns(), time.monotonic_ns())
        for lat, done, tid in reports.get(crew.fault.name, {}).get("faults", []):
            st.fault_latency_ns.append(lat)
            st.fault_done_ns.append(done)
            st.blocked_ns_by_tid[tid] = st.blocked_ns_by_tid.get(tid, 0) + lat
        out.touched = [(int(p), int(t)) for p, t in reports.get(crew.fault.name, {}).get("touched", [])]
        for name, rep in reports.items():
            st.timeline.extend((tm, kind, n, 0) for tm, kind, n in rep.get("timeline", []))
        bulk = [tm for tm, kind, _n, _ in st.timeline if kind == "prefetch"]
        st.bulk_started_ns, st.bulk_finished_ns = (min(bulk), max(bulk)) if bulk else (0, 0)
        st.cpu_s = {name: rep.get("cpu_s", 0.0) for name, rep in reports.items()}
        lane0 = reports.get(crew.lanes[0].name, {}) if crew.lanes else {}
        out.compression = str(lane0.get("compression", "none"))

    def _guest_ops(self) -> int:
        """The guest's operation counter (for ops/s).  A guest that does not answer in
        time (stalled, stopped: GuestStalled) is not a failure: the last count stands."""
        assert self.guest is not None
        try:
            st = self.guest.call("stats", timeout=10)
        except GuestStalled:
            return self._last_ops
        self._last_ops = sum(v["ops"] for v in st["vcpus"])
        return self._last_ops

    def run_after(self, out: Outcome, seconds: float | None, stop: threading.Event, on_progress: Callable[[Progress], None] | None = None) -> None:
        """Keep the guest running on this side for ``seconds`` (None: until ``stop``)."""
        guest = out.guest
        t0 = time.monotonic()
        ops0 = self._guest_ops()
        last = (t0, ops0)
        while not stop.wait(0.5):
            self._check()  # e.g. the source took the guest back by force
            now = time.monotonic()
            ops = self._guest_ops()
            if on_progress is not None:
                t = out.manifest.ram_size // out.manifest.page_size
                s = out.stats
                on_progress(Progress(now - t0, t, t, s.pages_demand, s.pages_prefetch, s.pages_zero, (ops - last[1]) / (now - last[0]), "running"))
            last = (now, ops)
            if seconds is not None and now - t0 >= seconds:
                break
        now = time.monotonic()
        ops = self._guest_ops()
        out.ops["after"] = (ops - ops0) / max(now - t0, 1e-9) if now > t0 else 0.0

    def finish(self, out: Outcome, *, keep_running: bool = False) -> None:
        """Pause the guest, let it verify every page, collect its stats; then stop
        it, or (keep_running, for the next hop) let it run on."""
        guest = out.guest
        if out.release is not None and not out.release.confirmed.is_set():
            out.release.wait(5.0)  # a last chance to hear from the source before the summary
        self._check()
        if self.cfg.verify:
            guest.call("pause", timeout=30)
            out.verify = guest.call("verify", timeout=600)
            if keep_running:
                guest.call("resume")
        out.guest_stats = guest.call("stats")
        if keep_running:
            self.guest = None  # no longer ours to kill in close()
        else:
            guest.quit()

    def close(self, *, keep_release: bool = False) -> None:
        """Stop everything of this session; ``keep_release``: Complete keeps being
        retried in the background (the guest lives on, serving the next hop)."""
        if self.release is not None and not keep_release:
            self.release.stop()
        if self.crew is not None:
            self.crew.kill()
        if self.guest is not None and self.guest.alive():
            self.guest.kill()
        if self.control is not None and not keep_release:
            self.control.close()
        if self.ps is not None:
            self.ps.close()


def guest_errors(guest_stats: dict[str, Any]) -> list[str]:
    errs: list[str] = []
    for v in guest_stats.get("vcpus", []):
        errs.extend(v.get("first_errors", []))
    return errs


__all__ = ["DestinationSession", "Outcome", "Progress", "guest_errors", "GuestError"]
