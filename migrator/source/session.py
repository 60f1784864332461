"""The source's side of a migration: one guest, served to one destination at a time.

Processes (``workers.py``): this session owns the guest's control channel, the
:class:`~migrator.source.ownership.Ownership` state machine, the control
server (Describe, Handshake, Switchover, Complete, Cancel, Rollback) and the
shared page maps (``shared.py``); an *urgent* worker serves Demand streams and
each *lane* worker bulk Streams, each on its own port, each reading the paused
guest's RAM itself.  Nothing of the data path runs here.

Lock order: ``SourceSession._lock`` only; it guards the state machine and the
manifest, and is never held while talking to the guest, the workers or the
network.

Epochs across processes: a handshake resets the maps, then writes EPOCH (the
workers check every message against it).  An epoch ends by clearing EPOCH and
telling every worker, which cancels that epoch's streams and marks it ended
under its own lock before it answers; only when every worker has answered is
the guest resumed (so no batch read after the resume is ever sent: see
``serving.py``).  The source never drops the guest's memory before the
destination's Complete.
"""

from __future__ import annotations

import json
import logging
import queue
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import zstandard

from migrator import PROTOCOL_VERSION
from migrator.errors import GuestError, MigratorError
from migrator.guest import GuestProcess
from migrator.pagemaps import or_bytes
from migrator.security import TlsFiles
from migrator.source import shared as sh
from migrator.source.guard import RefusalLog
from migrator.source.ownership import PRECOPY_ENDED, Ownership, Phase, Refused
from migrator.source.precopy import Precopy, Request
from migrator.source.ram_reader import RamReader
from migrator.wire import migration_pb2 as pb
from migrator.workers import Worker, WorkerError

log = logging.getLogger("migrator.source")

PAUSE_TIMEOUT_S = 5.0  # the guest's vCPUs park within this, or the migration is refused
LOST_GRACE_S = 2.0  # no stream of the migration for this long: the destination went away
END_ACK_S = 3.0  # a worker acknowledges an ended epoch within this, or it is replaced
URGENT_NICE = -10  # the urgent worker ahead of everything (needs CAP_SYS_NICE; else 0)


@dataclass
class SourceStats:
    demand_requests: int = 0
    demand_pages: int = 0
    bulk_pages: int = 0
    resent_pages: int = 0
    bytes_sent: int = 0
    rejected: int = 0
    refused_auth: int = 0
    discarded_pages: int = 0  # the destination's guest gave them up: not sent


class SourceSession:
    """One guest, served to at most one destination at a time."""

    def __init__(self, guest: GuestProcess, *, switchover_timeout: float = 5.0, lanes: int = 2) -> None:
        self.guest = guest
        h = guest.hello
        self.npages = h.size // h.page_size
        self.page_size = h.page_size
        self.lanes = lanes
        self.refused_auth = 0
        self.own = Ownership(switchover_timeout)
        self.events: queue.SimpleQueue[str] = queue.SimpleQueue()  # for the run loop to say
        self.completed = threading.Event()
        self.acked = threading.Event()  # the destination has the reply to its Complete
        self._lock = threading.Lock()
        # opened now, before any pause: nothing can fail for want of it between
        # the pause and "paused" (e.g. a process out of file descriptors)
        self._reader = self._open_reader()
        self.shared = sh.create(self.npages)
        self._manifest: pb.Manifest | None = None
        self.workers: list[Worker] = []
        self.ports: list[int] = []  # control, urgent, lanes...
        self._worker_events: queue.SimpleQueue[tuple[str, dict[str, Any]]] = queue.SimpleQueue()
        self.refusals = RefusalLog()
        self._seen = time.monotonic()  # when a stream of the migration was last open
        self._lost_reported = False
        self._rate = _RateSampler(guest)
        self.paused_ns = 0
        self._precopy: Precopy | None = None
        self._precopy_idle = 0.0  # monotonic: when the pre-copy's progress stream closed (0 = open)
        self._untrack: Precopy | None = None  # its tracker stays open until the pause's epoch ends

    def _open_reader(self) -> RamReader:
        """The guest's pagemap (which pages were never touched) and its RAM's descriptor."""
        h = self.guest.hello
        return RamReader(h.pid, h.addr, h.size, h.page_size)

    @property
    def phase(self) -> str:
        return self.own.phase.value

    @property
    def epoch(self) -> int:
        return self.own.epoch

    @property
    def stats(self) -> SourceStats:
        t = sh.totals(self.shared, len(self.workers))
        return SourceStats(**{k: t[k] for k in ("demand_requests", "demand_pages", "bulk_pages", "resent_pages",
                                                 "bytes_sent", "rejected", "discarded_pages")}, refused_auth=self.refused_auth)  # fmt: skip

    # -- workers ------------------------------------------------------------------------
    def start_workers(self, host: str, base_port: int, secret: str | None, tls: TlsFiles | None) -> None:
        """The urgent worker at ``base_port + 1`` and the lanes after it (raises OSError
        if one cannot listen there: the caller picks another block)."""
        h = self.guest.hello
        ram_fd = h.ram_fd if h.ram_fd is not None else -1  # mapped by the workers: no copy to read a page
        common = {"host": host, "npages": self.npages, "page_size": self.page_size, "addr": h.addr, "pid": h.pid,
                  "shm_fd": self.shared.fd, "mem_fd": self._reader.mem_fd, "ram_fd": ram_fd, "secret": secret,
                  "tls": {"cert": tls.cert, "key": tls.key, "ca": tls.ca} if tls is not None and tls.enabled else None}  # fmt: skip
        roles = [("urgent", "src-urgent", URGENT_NICE)] + [("lane", f"src-lane{i}", 0) for i in range(self.lanes)]
        fds = [self.shared.fd, self._reader.mem_fd] + ([ram_fd] if ram_fd >= 0 else [])
        started: list[Worker] = []
        try:
            for slot, (role, name, nice) in enumerate(roles):
                cfg = {**common, "role": role, "slot": slot, "port": base_port + 1 + slot}
                started.append(Worker("migrator.source.worker", name, cfg, fds, self._worker_events, nice=nice))
            ports = self._await_ready(started)
        except BaseException:
            for w in started:
                w.close(timeout=2)
            raise
        self.workers = started
        self.ports = [base_port, *ports]

    def _await_ready(self, workers: list[Worker]) -> list[int]:
        ports: dict[str, int] = {}
        deadline = time.monotonic() + 60
        while len(ports) < len(workers):
            try:
                name, ev = self._worker_events.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise WorkerError("the source's workers did not start within 60 s") from None
            if ev.get("event") == "ready":
                ports[name] = int(ev["port"])
            elif ev.get("event") in ("failed", "exited"):
                raise OSError(f"{name}: {ev.get('error', 'exited')}")
        return [ports[w.name] for w in workers]

    def _end_epoch(self, epoch: int, why: str) -> None:
        """Every worker stops serving ``epoch`` (and says so) before this returns.
        Caller does not hold the lock."""
        untrack, self._untrack = self._untrack, None
        if untrack is not None and why != PRECOPY_ENDED:
            untrack.release()  # the paused guest's tracker, kept through the downtime
        words = self.shared.words
        words[sh.ENDED_WHY] = sh.WHY.index(why) if why in sh.WHY else 0
        words[sh.ENDED_EPOCH] = epoch
        if words[sh.EPOCH] == epoch:
            words[sh.EPOCH] = 0
        pending = []
        for w in self.workers:
            try:
                pending.append((w, w.send("end", epoch=epoch, why=why)))
            except WorkerError:
                pass
        for w, cid in pending:
            try:
                w.wait(cid, END_ACK_S)
            except WorkerError as exc:
                # a worker that cannot say it stopped is stopped: it may serve nothing more
                log.error("%s; stopping it", exc)
                w.proc.kill()

    # -- describe and handshake -----------------------------------------------------
    def _check_version(self, version: int) -> None:
        if version != PROTOCOL_VERSION:
            raise Refused(
                "FAILED_PRECONDITION", f"protocol version {version} not supported (source speaks {PROTOCOL_VERSION})"
            )

    def _ports(self, m: pb.Manifest) -> pb.Manifest:
        base = self.ports[0]
        m.urgent_port_offset = self.ports[1] - base
        m.lane_port_offsets.extend(p - base for p in self.ports[2:])
        return m

    def describe(self, req: pb.DescribeRequest) -> pb.Manifest:
        self._check_version(req.protocol_version)
        h = self.guest.hello
        m = pb.Manifest(protocol_version=PROTOCOL_VERSION, ram_size=h.size, page_size=h.page_size, vcpus=h.vcpus, guest_pid=h.pid)
        return self._ports(m)

    def precopy(self, req: pb.PrecopyRequest) -> Iterator[pb.PrecopyProgress]:
        """Track the running guest's writes (and stream its pages on the lanes);
        yields each round's numbers, the last one ``done``.  See ``precopy.py``."""
        self._check_version(req.protocol_version)
        if len(req.session_token) != 16:
            raise Refused("INVALID_ARGUMENT", "session_token must be 16 bytes")
        if req.seconds < 0 or req.seconds > 3600:
            raise Refused("INVALID_ARGUMENT", f"pre-copy of {req.seconds} s (0 to 3600)")
        epoch = secrets.randbits(64) or 1
        with self._lock:
            self.own.begin_precopy(req.session_token, epoch)
        pc = Precopy(self.guest, self._reader, self.shared, epoch,
                     Request(req.seconds, req.auto, req.track_only, req.hot_first))  # fmt: skip
        try:
            pc.start()
        except BaseException as exc:
            with self._lock:
                self.own.end_precopy()
            self._end_epoch(epoch, PRECOPY_ENDED)
            if isinstance(exc, MigratorError):
                raise Refused("FAILED_PRECONDITION", f"the source cannot pre-copy: {exc}") from exc
            raise
        with self._lock:
            self._precopy, self._precopy_idle = pc, 0.0
        self.shared.words[sh.EPOCH] = epoch  # the lanes serve it from now on
        self._tell_map_ready(epoch)
        self.events.put("pre-copy: tracking the guest's writes" + ("" if req.track_only else " and sending its pages"))
        try:
            yield pb.PrecopyProgress(epoch=epoch, round=0)  # the lanes may open their streams
            while True:
                p = pc.progress.get()
                if p is None:
                    return
                if p.done:
                    self.events.put(f"pre-copy done after {len(pc.rounds)} rounds, {p.sent_pages} pages sent ({p.why})")
                stale = zstandard.ZstdCompressor(level=1).compress(p.stale) if p.stale else b""
                yield pb.PrecopyProgress(epoch=epoch, round=p.round, round_pages=p.round_pages, dirty_pages=p.dirty_pages,
                                         sent_pages=p.sent_pages, round_s=p.round_s, done=p.done, why=p.why,
                                         stale_map_zstd=stale)  # fmt: skip
        finally:
            with self._lock:
                self._precopy_idle = time.monotonic()

    def _end_precopy(self, why: str) -> None:
        """A pre-copy that no handshake followed: tracking stops, the guest runs on."""
        if self._stop_tracking(self.own.end_precopy, PRECOPY_ENDED):
            self.events.put(f"pre-copy ended without a switch-over ({why}); the guest runs on here")

    def _stop_tracking(self, end: Callable[[], int], why: str) -> int:
        """``end()`` (an Ownership transition, under the lock) and its epoch's end; any
        pre-copy's tracking stops.  Returns the epoch that ended, or 0."""
        with self._lock:
            epoch = end()
            pc, self._precopy = self._precopy, None
        if pc is not None:
            pc.abort()
        if epoch:
            self._end_epoch(epoch, why)
        return epoch

    def handshake(self, req: pb.HandshakeRequest) -> pb.Manifest:
        """Pause the guest and describe it; the same token gets the same answer again."""
        self._check_version(req.protocol_version)
        if len(req.session_token) != 16:
            raise Refused("INVALID_ARGUMENT", "session_token must be 16 bytes")
        with self._lock:
            pre_epoch = self.own.epoch if self.own.phase is Phase.PRECOPY else 0
            if not self.own.begin_pause(req.session_token):
                assert self._manifest is not None
                return self._manifest
            pc, self._precopy = (self._precopy, None) if pre_epoch else (None, None)
        if pre_epoch:
            self._end_epoch(pre_epoch, PRECOPY_ENDED)  # the lanes stop pre-copying (before the pause)
        self._untrack = pc
        try:
            manifest = self._pause(pc)
        except BaseException as exc:
            if pc is not None:
                pc.abort()
            self._pause_failed(exc)
            if isinstance(exc, (MigratorError, OSError, ValueError)):
                raise Refused("ABORTED", f"the source could not pause its guest ({exc}); it keeps running there") from exc
            raise
        read = self._maps_ready if pc is not None else self._read_untouched
        threading.Thread(target=read, args=(manifest.epoch,), name="pagemap", daemon=True).start()
        return manifest

    def _pause(self, pc: Precopy | None = None) -> pb.Manifest:
        h = self.guest.hello
        ops_before = self._rate.stop()
        reply = self.guest.call("pause", timeout=PAUSE_TIMEOUT_S)
        epoch = secrets.randbits(64) or 1
        m = self.shared.regions
        zeros = bytes(self.npages)
        self.shared.words[sh.READY] = 0
        stale = b""
        if pc is not None:
            # the tracker's maps stand (untouched, need = still to send, hot): a last scan
            t = time.perf_counter()
            stale = pc.freeze()
            log.debug("pre-copy freeze %.1f ms", (time.perf_counter() - t) * 1e3)
            m["sent"][:] = zeros
        else:
            self.shared.words[sh.HOT] = 0
            for name in ("untouched", "need", "sent"):  # until the map is read: nothing known to be untouched
                m[name][:] = zeros
        manifest = self._ports(pb.Manifest(
            protocol_version=PROTOCOL_VERSION, epoch=epoch, ram_size=h.size, page_size=h.page_size,
            vcpu_state=json.dumps(reply["state"]).encode(), paused_unix_ns=int(reply["paused_ns"]), vcpus=h.vcpus,
            ops_per_s_before=ops_before, guest_pid=h.pid,
            switchover_timeout_ms=int(self.own.switchover_timeout_s * 1000),
        ))  # fmt: skip
        if pc is not None and not pc.req.track_only:
            manifest.stale_map_zstd = zstandard.ZstdCompressor(level=1).compress(stale)
            manifest.precopy_pages, manifest.precopy_rounds = pc.sent_pages, len(pc.rounds)
        with self._lock:
            self.paused_ns = int(reply["paused_ns"])
            self._manifest = manifest
            self.shared.words[sh.EPOCH] = epoch  # the workers serve it from now on
            self.own.pause_done(epoch, time.monotonic())
            self._seen = time.monotonic()
            self._lost_reported = False
        return manifest

    def _pause_failed(self, exc: BaseException) -> None:
        """Anything failed between the pause and "paused": the guest runs here again."""
        with self._lock:
            self.own.pause_failed()
        try:
            self.guest.call("resume", timeout=2)
        except GuestError:
            pass  # a stalled guest takes the queued resume when it wakes up
        self._rate = _RateSampler(self.guest)
        self.events.put(f"could not pause the guest for a destination ({exc}); it keeps running here")

    def _maps_ready(self, epoch: int) -> None:
        """After a pre-copy the tracker's maps are already right: say so."""
        with self._lock:
            if self.own.epoch != epoch or self.own.phase not in (Phase.PAUSED, Phase.SWITCHED):
                return
            self.shared.words[sh.READY] = epoch
        self._tell_map_ready(epoch)

    def _tell_map_ready(self, epoch: int) -> None:
        for w in self.workers:
            try:
                w.send("map-ready", epoch=epoch)
            except WorkerError:
                pass

    def _read_untouched(self, epoch: int) -> None:
        """Reading pagemap costs ~10 ms per GiB: done after the reply, outside the downtime."""
        try:
            untouched = self._reader.untouched_map()
        except MigratorError as exc:
            log.error("cannot read the guest's pagemap: %s", exc)
            untouched = bytes(self.npages)
        m = self.shared.regions
        with self._lock:
            if self.own.epoch != epoch or self.own.phase not in (Phase.PAUSED, Phase.SWITCHED):
                return
            m["untouched"][:] = untouched
            m["need"][:] = or_bytes(m["need"], untouched)
            self.shared.words[sh.READY] = epoch
        self._tell_map_ready(epoch)

    # -- the switch-over and its endings ------------------------------------------------
    def switchover(self, req: pb.SwitchoverRequest) -> pb.SwitchoverReply:
        with self._lock:
            newly = self.own.switchover(req.epoch)
        if newly:
            self.events.put("the destination took the guest (switch-over); serving its pages until it has every one")
        return pb.SwitchoverReply()

    def cancel(self, req: pb.CancelRequest) -> pb.CancelReply:
        with self._lock:
            self.own.cancel(req.epoch)
        self._resume_here(req.epoch, "cancelled",
                          f"the destination cancelled the migration ({req.reason[:200]}): the guest runs here again")  # fmt: skip
        return pb.CancelReply()

    def rollback(self, force: bool) -> str:
        """The user takes the guest back (SIGUSR1, or `migrator rollback [--force]`)."""
        with self._lock:
            epoch = self.own.epoch
            resume, message = self.own.rollback(force)
            why = self.own.ended.get(epoch, "")
        if resume:
            self._resume_here(epoch, why, message)
        else:
            self.events.put(message)
        return message

    def complete(self, req: pb.CompleteRequest) -> pb.CompleteReply:
        with self._lock:
            newly = self.own.complete(req.epoch)
        if newly:
            self._end_epoch(req.epoch, "completed")
            self.completed.set()
        if req.ack:
            self.acked.set()
        st = self.stats
        return pb.CompleteReply(pages_served=st.demand_pages + st.bulk_pages, bytes_sent=st.bytes_sent)

    def tick(self) -> None:
        """Called every ~0.2 s by the run loop: the switch-over timeout, a lost destination,
        a pre-copy nobody follows up."""
        now = time.monotonic()
        with self._lock:
            idle = self._precopy is not None and self._precopy_idle and now - self._precopy_idle > self.own.switchover_timeout_s
        if idle:
            self._end_precopy("no handshake followed it")
        open_streams = sum(self.shared.words[sh.FIRST_SLOT + sh.SLOT_WORDS * k + sh.OPEN] for k in range(len(self.workers)))
        with self._lock:
            epoch = self.own.epoch
            expired = self.own.expire(now)
            active = self.own.phase in (Phase.PAUSED, Phase.SWITCHED)
            if open_streams or not active:
                self._seen = now
                back = self._lost_reported and active
                if back:
                    self._lost_reported = False
            else:
                back = False
            lost = active and not self._lost_reported and now - self._seen > LOST_GRACE_S
            self._lost_reported |= lost
            may_run = self.own.destination_may_run
        if expired:
            self._resume_here(epoch, "timed-out", f"the destination did not take the guest within "
                              f"{self.own.switchover_timeout_s:g} s of the handshake: the guest runs here again "
                              f"(migration {epoch:016x} abandoned)")  # fmt: skip
        elif lost:
            self.events.put("lost-switched" if may_run else "lost-paused")
        elif back:
            self.events.put("the destination reconnected")

    def guest_died(self) -> bool:
        """The source's guest died mid-migration: end its epoch so that the destination,
        asking, learns it at once (rather than at its reconnect deadline).  True if one ended."""
        return bool(self._stop_tracking(self.own.source_failed, "source-failed"))

    def _resume_here(self, epoch: int, why: str, message: str) -> None:
        self._end_epoch(epoch, why)
        try:
            self.guest.call("resume", timeout=10)
        except GuestError as exc:
            message += f" (the guest has not confirmed its resume yet: {exc})"
        self._rate = _RateSampler(self.guest)
        self.events.put(message)

    # -- the rest ----------------------------------------------------------------------------
    def note_refused(self, why: str) -> None:
        """A call without the right secret was refused (before any handler ran); logged rate-limited."""
        self.refused_auth += 1  # one writer: gRPC's polling thread
        self.refusals.note(why)

    def close(self) -> None:
        self._rate.stop()
        for pc in (self._precopy, self._untrack):
            if pc is not None:
                pc.abort()
        for w in self.workers:
            w.stop(timeout=3)
        self._reader.close()
        self.shared.close()


def free_port_block(host: str, n: int, tries: int = 20) -> int:
    """A port p such that p .. p+n-1 look free on ``host`` (bound and released)."""
    for _ in range(tries):
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        ok = True
        for p in range(base, base + n):
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
                try:
                    s.bind((host, p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise OSError(f"no block of {n} free ports on {host}")


class _RateSampler:
    """Guest ops/s on the source, measured over the last seconds before the pause.

    A guest that does not answer a sample in time (stalled, stopped) is
    skipped, not an error.
    """

    def __init__(self, guest: GuestProcess, period: float = 0.25, window: int = 8) -> None:
        self._guest = guest
        self._samples: list[tuple[int, int]] = []
        self._stop = threading.Event()
        self._period, self._window = period, window
        self._thread = threading.Thread(target=self._run, name="source-rate", daemon=True)
        self._thread.start()

    def _sample(self, timeout: float) -> None:
        try:
            st = self._guest.call("stats", timeout=timeout)
        except MigratorError:
            return
        self._samples.append((st["mono_ns"], sum(v["ops"] for v in st["vcpus"])))
        del self._samples[: -self._window]

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            self._sample(timeout=2)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sample(timeout=0.5)
        if len(self._samples) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        return (n1 - n0) / ((t1 - t0) / 1e9) if t1 > t0 else 0.0

