"""The source's side of a migration: one guest, served to one destination at a time.

Ownership: :class:`SourceSession` owns the guest's control channel, the
:class:`~migrator.source.ownership.Ownership` state machine and the page maps;
the gRPC servicer (``servicer.py``) is a few lines per method and delegates
here.  Lock order: only ``SourceSession._lock`` exists; it guards the state
machine, the maps, the counters and the stream registry, and is never held
while reading guest RAM, talking to the guest or to the network.

Fences: every request names its epoch and is checked against the state machine
before it is served, and a batch read from RAM is checked again before it is
sent (the guest is resumed only after its epoch ended under the lock, so a
batch that passes the second check was read while the guest was paused).  An
epoch that ends (roll-back, cancel, timeout, completion) cancels its open
streams at once.

The source never drops the guest's memory before the destination's Complete.
"""

from __future__ import annotations

import json
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import zstandard

from migrator import PROTOCOL_VERSION
from migrator.errors import GuestError, MigratorError
from migrator.guest import GuestProcess
from migrator.pagemaps import FLIP01, or_bytes
from migrator.source.batches import BatchBuilder
from migrator.source.guard import RefusalLog, decompress_map
from migrator.source.ownership import Ownership, Phase, Refused
from migrator.source.ram_reader import RamReader
from migrator.wire import migration_pb2 as pb

log = logging.getLogger("migrator.source")

MAX_DEMAND_PAGES = 256
MAX_BATCH_PAGES = 1024
DEFAULT_BATCH_PAGES = 512
PAUSE_TIMEOUT_S = 5.0  # the guest's vCPUs park within this, or the migration is refused
LOST_GRACE_S = 2.0  # no stream of the migration for this long: the destination went away
# open streams of one migration, per kind: a destination uses one or two of each
# (more only after a reconnection, while the old ones are torn down)
MAX_STREAMS = {"demand": 4, "bulk": 8}

@dataclass
class SourceStats:
    demand_requests: int = 0
    demand_pages: int = 0
    bulk_pages: int = 0
    resent_pages: int = 0
    bytes_sent: int = 0
    rejected: int = 0
    refused_auth: int = 0


class SourceSession:
    """One guest, served to at most one destination at a time."""

    def __init__(self, guest: GuestProcess, *, switchover_timeout: float = 5.0) -> None:
        self.guest = guest
        h = guest.hello
        self.npages = h.size // h.page_size
        self.page_size = h.page_size
        self.stats = SourceStats()
        self.own = Ownership(switchover_timeout)
        self.events: queue.SimpleQueue[str] = queue.SimpleQueue()  # for the run loop to say
        self.completed = threading.Event()
        self.acked = threading.Event()  # the destination has the reply to its Complete
        self._lock = threading.Lock()
        # opened now, before any pause: nothing can fail for want of it between
        # the pause and "paused" (e.g. a process out of file descriptors)
        self._reader = RamReader(h.pid, h.addr, h.size, h.page_size)
        self._untouched = bytes(self.npages)
        self._untouched_zstd = b""
        self._map_ready = threading.Event()
        self._need = bytearray()  # 0 = not yet sent and touched; bulk sends these
        self._sent = bytearray()  # 1 = sent at least once (for the duplicate count)
        self._manifest: pb.Manifest | None = None
        self._streams: dict[int, dict[int, tuple[str, Callable[[], None]]]] = {}  # epoch -> {id: (kind, cancel)}
        self.refusals = RefusalLog()
        self.guard: Any = None  # the server's CallGuard (its counters), once serving
        self._stream_ids = iter(range(1, 1 << 62))
        self._seen = time.monotonic()  # when a stream of the migration was last open
        self._lost_reported = False
        self._rate = _RateSampler(guest)
        self.paused_ns = 0

    @property
    def phase(self) -> str:
        return self.own.phase.value

    @property
    def epoch(self) -> int:
        return self.own.epoch

    # -- describe and handshake -----------------------------------------------------
    def _check_version(self, version: int) -> None:
        if version != PROTOCOL_VERSION:
            raise Refused(
                "FAILED_PRECONDITION", f"protocol version {version} not supported (source speaks {PROTOCOL_VERSION})"
            )

    def describe(self, req: pb.DescribeRequest) -> pb.Manifest:
        self._check_version(req.protocol_version)
        h = self.guest.hello
        return pb.Manifest(protocol_version=PROTOCOL_VERSION, ram_size=h.size, page_size=h.page_size, vcpus=h.vcpus, guest_pid=h.pid)

    def handshake(self, req: pb.HandshakeRequest) -> pb.Manifest:
        """Pause the guest and describe it; the same token gets the same answer again."""
        self._check_version(req.protocol_version)
        if len(req.session_token) != 16:
            raise Refused("INVALID_ARGUMENT", "session_token must be 16 bytes")
        with self._lock:
            if not self.own.begin_pause(req.session_token):
                assert self._manifest is not None
                return self._manifest
        try:
            manifest = self._pause()
        except BaseException as exc:
            self._pause_failed(exc)
            if isinstance(exc, (MigratorError, OSError, ValueError)):
                raise Refused("ABORTED", f"the source could not pause its guest ({exc}); it keeps running there") from exc
            raise
        threading.Thread(target=self._read_untouched, name="pagemap", daemon=True).start()
        return manifest

    def _pause(self) -> pb.Manifest:
        h = self.guest.hello
        ops_before = self._rate.stop()
        reply = self.guest.call("pause", timeout=PAUSE_TIMEOUT_S)
        epoch = secrets.randbits(64) or 1
        with self._lock:
            self.paused_ns = int(reply["paused_ns"])
            self._untouched = bytes(self.npages)  # until the map is read: nothing known to be untouched
            self._need = bytearray(self.npages)
            self._sent = bytearray(self.npages)
            self._map_ready.clear()
            self._manifest = pb.Manifest(
                protocol_version=PROTOCOL_VERSION, epoch=epoch, ram_size=h.size, page_size=h.page_size,
                vcpu_state=json.dumps(reply["state"]).encode(), paused_unix_ns=self.paused_ns, vcpus=h.vcpus,
                ops_per_s_before=ops_before, guest_pid=h.pid,
                switchover_timeout_ms=int(self.own.switchover_timeout_s * 1000),
            )  # fmt: skip
            self.own.pause_done(epoch, time.monotonic())
            self._seen = time.monotonic()
            self._lost_reported = False
            return self._manifest

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

    def _read_untouched(self) -> None:
        """Reading pagemap costs ~10 ms per GiB: done after the reply, outside the downtime."""
        try:
            untouched = self._reader.untouched_map()
        except MigratorError as exc:
            log.error("cannot read the guest's pagemap: %s", exc)
            untouched = bytes(self.npages)
        with self._lock:
            self._untouched = untouched
            self._untouched_zstd = zstandard.ZstdCompressor(level=3).compress(untouched)
            self._need[:] = or_bytes(self._need, untouched)
        self._map_ready.set()

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
            cancels = self._end_streams(req.epoch)
        self._resume_here(cancels, f"the destination cancelled the migration ({req.reason[:200]}): the guest runs here again")
        return pb.CancelReply()

    def rollback(self, force: bool) -> str:
        """The user takes the guest back (SIGUSR1, or `migrator rollback [--force]`)."""
        with self._lock:
            epoch = self.own.epoch
            resume, message = self.own.rollback(force)
            cancels = self._end_streams(epoch) if resume else []
        if resume:
            self._resume_here(cancels, message)
        else:
            self.events.put(message)
        return message

    def complete(self, req: pb.CompleteRequest) -> pb.CompleteReply:
        with self._lock:
            newly = self.own.complete(req.epoch)
            cancels = self._end_streams(req.epoch) if newly else []
        for cancel in cancels:
            cancel()
        if newly:
            self.completed.set()
        if req.ack:
            self.acked.set()
        return pb.CompleteReply(pages_served=self.stats.demand_pages + self.stats.bulk_pages, bytes_sent=self.stats.bytes_sent)

    def tick(self) -> None:
        """Called every ~0.2 s by the run loop: the switch-over timeout, a lost destination."""
        now = time.monotonic()
        with self._lock:
            epoch = self.own.epoch
            expired = self.own.expire(now)
            cancels = self._end_streams(epoch) if expired else []
            active = self.own.phase in (Phase.PAUSED, Phase.SWITCHED)
            if self._streams.get(epoch) or not active:
                self._seen = now
            lost = active and not self._lost_reported and now - self._seen > LOST_GRACE_S
            self._lost_reported |= lost
            may_run = self.own.destination_may_run
        if expired:
            self._resume_here(cancels, f"the destination did not take the guest within {self.own.switchover_timeout_s:g} s "
                                       f"of the handshake: the guest runs here again (migration {epoch:016x} abandoned)")  # fmt: skip
        elif lost:
            self.events.put("lost-switched" if may_run else "lost-paused")

    def _resume_here(self, cancels: list[Callable[[], None]], message: str) -> None:
        for cancel in cancels:
            cancel()
        try:
            self.guest.call("resume", timeout=10)
        except GuestError as exc:
            message += f" (the guest has not confirmed its resume yet: {exc})"
        self._rate = _RateSampler(self.guest)
        self.events.put(message)

    # -- streams -------------------------------------------------------------------------
    def _register(self, epoch: int, kind: str, cancel: Callable[[], None]) -> int:
        """Caller holds the lock and has checked the epoch; raises at the bound."""
        streams = self._streams.setdefault(epoch, {})
        if sum(k == kind for k, _ in streams.values()) >= MAX_STREAMS[kind]:
            self.stats.rejected += 1
            raise Refused("RESOURCE_EXHAUSTED", f"{MAX_STREAMS[kind]} {kind} streams already open for this migration")
        sid = next(self._stream_ids)
        streams[sid] = (kind, cancel)
        if self._lost_reported:
            self._lost_reported = False
            self.events.put("the destination reconnected")
        return sid

    def _unregister(self, epoch: int, sid: int) -> None:
        with self._lock:
            self._streams.get(epoch, {}).pop(sid, None)
            if epoch == self.own.epoch and not self._streams.get(epoch):
                self._seen = time.monotonic()

    def _end_streams(self, epoch: int) -> list[Callable[[], None]]:
        """Caller holds the lock; returns the cancels to call once it is released."""
        return [cancel for _kind, cancel in self._streams.pop(epoch, {}).values()]

    def _serve_check(self, epoch: int) -> None:
        with self._lock:
            self.own.check(epoch)

    # -- urgent channel ----------------------------------------------------------------
    def demand(self, requests: Iterator[pb.DemandRequest], cancel: Callable[[], None]) -> Iterator[pb.PageBatch]:
        builder: BatchBuilder | None = None
        sid = epoch = 0
        try:
            for req in requests:
                with self._lock:
                    self.own.check(req.epoch)
                    if not sid:
                        epoch, sid = req.epoch, self._register(req.epoch, "demand", cancel)
                    elif req.epoch != epoch:
                        raise Refused("INVALID_ARGUMENT", "a stream serves one migration")
                if req.request_id == 0 and req.count == 0:
                    continue  # the stream's opening message: binds it to the migration, asks nothing
                if req.count == 0 or req.count > MAX_DEMAND_PAGES:
                    self.stats.rejected += 1
                    raise Refused("INVALID_ARGUMENT", f"demand count {req.count} not in 1..{MAX_DEMAND_PAGES}")
                if req.first_page >= self.npages or req.first_page + req.count > self.npages:
                    self.stats.rejected += 1
                    raise Refused("OUT_OF_RANGE", f"pages {req.first_page}+{req.count} outside guest RAM of {self.npages} pages")
                if builder is None:
                    builder = BatchBuilder(self._reader, self._untouched, MAX_DEMAND_PAGES)
                builder.untouched = self._untouched  # known-zero flags once the map is read
                first, count = req.first_page, req.count
                with self._lock:
                    sl = slice(first, first + count)
                    self.stats.resent_pages += self._sent[sl].count(1)
                    self._sent[sl] = b"\x01" * count
                    self._need[sl] = b"\x01" * count
                    self.stats.demand_requests += 1
                    self.stats.demand_pages += count
                batch = builder.build(first, count, None, pb.CODEC_NONE, request_id=req.request_id)
                batch.epoch = epoch
                self._serve_check(epoch)  # read while paused: still this epoch after the read
                self.stats.bytes_sent += len(batch.data)
                yield batch
        finally:
            if sid:
                self._unregister(epoch, sid)

    # -- bulk channel --------------------------------------------------------------------
    def stream(self, controls: Iterator[pb.StreamControl], cancel: Callable[[], None]) -> Iterator[pb.PageBatch]:
        first_ctl = next(controls, None)
        if first_ctl is None:
            return
        epoch = first_ctl.epoch
        with self._lock:
            self.own.check(epoch)
            sid = self._register(epoch, "bulk", cancel)
        try:
            yield from self._stream(first_ctl, controls, epoch)
        finally:
            self._unregister(epoch, sid)

    def _stream(self, first_ctl: pb.StreamControl, controls: Iterator[pb.StreamControl], epoch: int) -> Iterator[pb.PageBatch]:
        codec = [pb.CODEC_NONE]
        pos = [0]

        def apply(ctl: pb.StreamControl) -> None:
            if ctl.epoch != epoch:
                raise Refused("INVALID_ARGUMENT", "a stream serves one migration")
            if ctl.HasField("codec"):
                if ctl.codec not in (pb.CODEC_NONE, pb.CODEC_ZSTD):
                    raise Refused("INVALID_ARGUMENT", f"unknown codec {ctl.codec}")
                codec[0] = ctl.codec
            if ctl.HasField("seek_page"):
                if ctl.seek_page >= self.npages:
                    raise Refused("OUT_OF_RANGE", f"seek to page {ctl.seek_page} of {self.npages}")
                pos[0] = ctl.seek_page

        batch_pages = first_ctl.batch_pages or DEFAULT_BATCH_PAGES
        if batch_pages > MAX_BATCH_PAGES:
            raise Refused("INVALID_ARGUMENT", f"batch of {batch_pages} pages > {MAX_BATCH_PAGES}")
        apply(first_ctl)
        if not self._map_ready.wait(60):
            raise Refused("UNAVAILABLE", "the guest's page map is not ready")
        if first_ctl.missing_map_zstd:
            self._resume_from(first_ctl.missing_map_zstd)
        bad: list[Refused] = []

        def follow() -> None:
            try:
                for ctl in controls:
                    apply(ctl)
            except Refused as exc:
                bad.append(exc)
            except Exception:  # noqa: BLE001 - the stream ended (RpcError); the generator sees it too
                pass

        threading.Thread(target=follow, name="bulk-control", daemon=True).start()
        builder = BatchBuilder(self._reader, self._untouched, batch_pages)
        zero_map: bytes | None = self._untouched_zstd  # travels with the first batch
        while True:
            if bad:
                raise bad[0]
            with self._lock:
                self.own.check(epoch)
                p = self._need.find(0, pos[0])
                if p < 0:
                    p = self._need.find(0)
                if p < 0:
                    break
                end = min(p + batch_pages, self.npages)
                include = self._need[p:end].translate(FLIP01)
                self._need[p:end] = b"\x01" * (end - p)
                # bulk only takes pages never sent, so only demand can re-send
                self._sent[p:end] = or_bytes(include, self._sent[p:end])
                pos[0] = end
            batch = builder.build(p, end - p, include, codec[0])
            batch.epoch = epoch
            self._serve_check(epoch)  # read while paused: still this epoch after the read
            self.stats.bulk_pages += batch.count - batch.flags.count(0)
            self.stats.bytes_sent += len(batch.data)
            if zero_map is not None:
                batch.zero_map_zstd, zero_map = zero_map, None
            yield batch
        yield pb.PageBatch(epoch=epoch, last=True, sent_unix_ns=time.time_ns(), zero_map_zstd=zero_map or b"")

    def _resume_from(self, missing_zstd: bytes) -> None:
        """A reconnected destination says which pages it still lacks: send them again."""
        missing = decompress_map(missing_zstd, self.npages, "missing map")
        # need 0 (send it) = missing and touched: not (missing and not untouched)
        need = or_bytes(missing.translate(FLIP01), self._untouched)
        with self._lock:
            self._need[:] = need
        log.warning("destination reconnected; %d pages to send again", self.npages - need.count(1))

    # -- the rest ----------------------------------------------------------------------------
    def note_refused(self, why: str) -> None:
        """A call without the right secret was refused (before any handler ran); logged rate-limited."""
        self.stats.refused_auth += 1  # one writer: gRPC's polling thread
        self.refusals.note(why)

    def close(self) -> None:
        self._rate.stop()
        self._reader.close()


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
