"""The source's page server: a paused guest's RAM behind the Migration service.

Ownership: :class:`SourceSession` owns the guest and the ``sent`` map; the
servicer methods are a few lines each and delegate to it.  Lock order: only
``SourceSession._lock`` exists; it guards ``_sent``/``_need``, the phase and the
counters, and is never held while reading RAM or talking to the network.

The source never drops the guest's memory before the destination's Complete:
until then the guest stays paused, whatever happens to the connection.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc
import zstandard

from migrator import PROTOCOL_VERSION
from migrator.errors import MigratorError
from migrator.guest import GuestProcess
from migrator.security import SecretInterceptor, TlsFiles
from migrator.source.batches import BatchBuilder
from migrator.source.ram_reader import RamReader
from migrator.wire import migration_pb2 as pb
from migrator.wire import migration_pb2_grpc as pb_grpc

log = logging.getLogger("migrator.source")

MAX_DEMAND_PAGES = 256
MIGRATION_ID_KEY = "x-migration-id"  # metadata on Demand/Stream calls
MAX_BATCH_PAGES = 1024
DEFAULT_BATCH_PAGES = 512
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
    # notice a vanished destination (a send blocked on a dead link would
    # otherwise keep the process from exiting), and accept the destination's
    # 1 s keepalive pings instead of answering them with GOAWAY
    ("grpc.keepalive_time_ms", 1000),
    ("grpc.keepalive_timeout_ms", 2000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 500),
    ("grpc.http2.max_ping_strikes", 0),
]


FLIP01 = bytes([1, 0]) + bytes(254)  # translate table: 0 <-> 1 (maps are 0/1 bytes)


def or_bytes(a: bytes | bytearray, b: bytes | bytearray) -> bytes:
    """Bytewise OR of two equal-length 0/1 maps, at C speed."""
    return (int.from_bytes(a, "little") | int.from_bytes(b, "little")).to_bytes(len(a), "little")


class PhaseError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


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
    """One guest, served to at most one destination."""

    def __init__(self, guest: GuestProcess) -> None:
        self.guest = guest
        h = guest.hello
        self.npages = h.size // h.page_size
        self.page_size = h.page_size
        self.migration_id = ""
        self.phase = "running"  # running -> paused -> completed | cancelled
        self.stats = SourceStats()
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._reader: RamReader | None = None
        self._untouched = b""
        self._untouched_zstd = b""
        self._map_ready = threading.Event()
        self._need = bytearray()  # 0 = not yet sent and touched; bulk sends these
        self._sent = bytearray()  # 1 = sent at least once (for the duplicate count)
        self._rate = _RateSampler(guest)
        self.paused_ns = 0
        self._streams = 0  # open Demand/Stream calls
        self._lost_reported = False
        self.events: queue.SimpleQueue[str] = queue.SimpleQueue()  # for the run loop to report

    # -- handshake -------------------------------------------------------------
    def handshake(self, req: pb.HandshakeRequest) -> pb.Manifest:
        if req.protocol_version != PROTOCOL_VERSION:
            raise PhaseError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"protocol version {req.protocol_version} not supported (source speaks {PROTOCOL_VERSION})",
            )
        h = self.guest.hello
        if req.prepare_only:
            return pb.Manifest(
                protocol_version=PROTOCOL_VERSION, ram_size=h.size, page_size=h.page_size, vcpus=h.vcpus, guest_pid=h.pid
            )
        with self._lock:
            if self.phase != "running":
                raise PhaseError(grpc.StatusCode.ALREADY_EXISTS, f"a migration is already {self.phase}")
            self.phase = "pausing"
        ops_before = self._rate.stop()
        reply = self.guest.call("pause")
        self.paused_ns = int(reply["paused_ns"])
        self._reader = RamReader(h.pid, h.addr, h.size, h.page_size)
        with self._lock:
            self._untouched = bytes(self.npages)  # until the map is read: nothing known to be untouched
            self._need = bytearray(self.npages)
            self._sent = bytearray(self.npages)
            self._map_ready.clear()
            self.migration_id = uuid.uuid4().hex
            self.phase = "paused"
        # Reading pagemap costs ~10 ms per GiB: do it after the reply, outside the downtime.
        threading.Thread(target=self._read_untouched, name="pagemap", daemon=True).start()
        return pb.Manifest(
            protocol_version=PROTOCOL_VERSION,
            migration_id=self.migration_id,
            ram_size=h.size,
            page_size=h.page_size,
            vcpu_state=json.dumps(reply["state"]).encode(),
            paused_unix_ns=self.paused_ns,
            vcpus=h.vcpus,
            ops_per_s_before=ops_before,
            guest_pid=h.pid,
        )

    def _read_untouched(self) -> None:
        reader = self._reader
        assert reader is not None
        try:
            untouched = reader.untouched_map()
        except Exception as exc:  # noqa: BLE001 - the guest died; streams report it
            log.error("cannot read the guest's pagemap: %s", exc)
            untouched = bytes(self.npages)
        with self._lock:
            self._untouched = untouched
            self._untouched_zstd = zstandard.ZstdCompressor(level=3).compress(untouched)
            need = self._need
            need[:] = or_bytes(need, untouched)
        self._map_ready.set()

    def _check_serving(self, migration_id: str) -> RamReader:
        if self.phase != "paused" or self._reader is None:
            raise PhaseError(grpc.StatusCode.FAILED_PRECONDITION, f"no migration in progress (phase {self.phase})")
        if migration_id != self.migration_id:
            # e.g. a destination from before a roll-back: its pages are not this guest's any more
            raise PhaseError(grpc.StatusCode.FAILED_PRECONDITION, "not the migration in progress")
        return self._reader

    def stream_opened(self) -> None:
        with self._lock:
            self._streams += 1
            back = self._lost_reported and self.phase == "paused"
            self._lost_reported = False
        if back:
            self.events.put("the destination reconnected")

    def stream_closed(self) -> None:
        """When the last stream of a paused migration ends, the destination is gone (for now)."""
        with self._lock:
            self._streams -= 1
            lost = self._streams == 0 and self.phase == "paused" and not self._lost_reported
            self._lost_reported = self._lost_reported or lost
        if lost:
            self.events.put("lost")

    def rollback(self) -> bool:
        """Resume the paused guest here, as it was at the pause (only when the user asks)."""
        with self._lock:
            if self.phase != "paused":
                return False
            self.phase = "running"
            self.migration_id = ""
        self.guest.call("resume")
        self._rate = _RateSampler(self.guest)
        return True

    # -- urgent channel ----------------------------------------------------------
    def demand(self, requests: Iterator[pb.DemandRequest], migration_id: str = "") -> Iterator[pb.PageBatch]:
        # The destination opens this stream before the handshake (so the urgent
        # connection is up before the downtime starts); check at the first request.
        builder: BatchBuilder | None = None
        for req in requests:
            if builder is None:
                builder = BatchBuilder(self._check_serving(migration_id), self._untouched, MAX_DEMAND_PAGES)
            if req.count == 0 or req.count > MAX_DEMAND_PAGES:
                self.stats.rejected += 1
                raise PhaseError(grpc.StatusCode.INVALID_ARGUMENT, f"demand count {req.count} not in 1..{MAX_DEMAND_PAGES}")
            if req.first_page >= self.npages or req.first_page + req.count > self.npages:
                self.stats.rejected += 1
                raise PhaseError(
                    grpc.StatusCode.OUT_OF_RANGE,
                    f"pages {req.first_page}+{req.count} outside guest RAM of {self.npages} pages",
                )
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
            self.stats.bytes_sent += len(batch.data)
            yield batch

    # -- bulk channel ----------------------------------------------------------------
    def stream(self, controls: Iterator[pb.StreamControl], migration_id: str = "") -> Iterator[pb.PageBatch]:
        reader = self._check_serving(migration_id)
        first_ctl = next(controls, None)
        if first_ctl is None:
            return
        codec = [pb.CODEC_NONE]

        def apply(ctl: pb.StreamControl) -> None:
            if ctl.HasField("codec"):
                if ctl.codec not in (pb.CODEC_NONE, pb.CODEC_ZSTD):
                    raise PhaseError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown codec {ctl.codec}")
                codec[0] = ctl.codec
            if ctl.HasField("seek_page"):
                if ctl.seek_page >= self.npages:
                    raise PhaseError(grpc.StatusCode.OUT_OF_RANGE, f"seek to page {ctl.seek_page} of {self.npages}")
                pos[0] = ctl.seek_page

        batch_pages = first_ctl.batch_pages or DEFAULT_BATCH_PAGES
        if batch_pages > MAX_BATCH_PAGES:
            raise PhaseError(grpc.StatusCode.INVALID_ARGUMENT, f"batch of {batch_pages} pages > {MAX_BATCH_PAGES}")
        pos = [0]
        apply(first_ctl)
        if first_ctl.missing_map_zstd:
            self._resume_from(first_ctl.missing_map_zstd)
        bad: list[PhaseError] = []

        def follow() -> None:
            try:
                for ctl in controls:
                    apply(ctl)
            except PhaseError as exc:
                bad.append(exc)
            except grpc.RpcError:
                pass  # the stream ended; the generator below sees it too

        threading.Thread(target=follow, name="bulk-control", daemon=True).start()
        if not self._map_ready.wait(60):
            raise PhaseError(grpc.StatusCode.UNAVAILABLE, "the guest's page map is not ready")
        builder = BatchBuilder(reader, self._untouched, batch_pages)
        zero_map: bytes | None = self._untouched_zstd  # travels with the first batch
        while True:
            if bad:
                raise bad[0]
            with self._lock:
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
            self.stats.bulk_pages += batch.count - batch.flags.count(0)
            self.stats.bytes_sent += len(batch.data)
            if zero_map is not None:
                batch.zero_map_zstd, zero_map = zero_map, None
            yield batch
        yield pb.PageBatch(last=True, sent_unix_ns=time.time_ns(), zero_map_zstd=zero_map or b"")

    def _resume_from(self, missing_zstd: bytes) -> None:
        """A reconnected destination says which pages it still lacks: send them again."""
        try:
            missing = zstandard.ZstdDecompressor().decompress(missing_zstd, max_output_size=self.npages)
        except zstandard.ZstdError as exc:
            raise PhaseError(grpc.StatusCode.INVALID_ARGUMENT, f"bad missing map: {exc}") from None
        if len(missing) != self.npages or missing.translate(None, b"\x00\x01"):
            raise PhaseError(grpc.StatusCode.INVALID_ARGUMENT, "missing map must be one 0/1 byte per page")
        # need == 0 means "bulk sends it": missing pages that were touched on the source
        # need 0 (send it) = missing and touched: not (missing and not untouched)
        need = or_bytes(missing.translate(FLIP01), self._untouched)
        with self._lock:
            self._need[:] = need
        log.warning("destination reconnected; %d pages to send again", self.npages - need.count(1))

    # -- end ---------------------------------------------------------------------------
    def complete(self, req: pb.CompleteRequest) -> pb.CompleteReply:
        with self._lock:
            if self.phase != "paused" or req.migration_id != self.migration_id:
                raise PhaseError(grpc.StatusCode.FAILED_PRECONDITION, "no such migration in progress")
            self.phase = "completed"
        self.done.set()
        return pb.CompleteReply(pages_served=self.stats.demand_pages + self.stats.bulk_pages, bytes_sent=self.stats.bytes_sent)

    def cancel(self, req: pb.CancelRequest) -> pb.CancelReply:
        with self._lock:
            if self.phase != "paused" or req.migration_id != self.migration_id:
                raise PhaseError(grpc.StatusCode.FAILED_PRECONDITION, "no such migration in progress")
            self.phase = "running"
        log.warning("destination cancelled the migration (%s): resuming the guest here", req.reason)
        self.guest.call("resume")
        self._rate = _RateSampler(self.guest)
        return pb.CancelReply()

    def note_refused(self, why: str) -> None:
        """A call without the right secret was refused (before any handler ran)."""
        with self._lock:
            self.stats.refused_auth += 1
        log.warning("refused a call: %s", why)

    def close(self) -> None:
        self._rate.stop()
        if self._reader is not None:
            self._reader.close()


class _RateSampler:
    """Guest ops/s on the source, measured over the last seconds before the pause."""

    def __init__(self, guest: GuestProcess, period: float = 0.25, window: int = 8) -> None:
        self._guest = guest
        self._samples: list[tuple[int, int]] = []
        self._stop = threading.Event()
        self._period, self._window = period, window
        self._thread = threading.Thread(target=self._run, name="source-rate", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        try:
            st = self._guest.call("stats", timeout=5)
        except Exception:  # noqa: BLE001 - the guest's death is reported elsewhere
            return
        self._samples.append((st["mono_ns"], sum(v["ops"] for v in st["vcpus"])))
        del self._samples[: -self._window]

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            self._sample()

    def stop(self) -> float:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sample()
        if len(self._samples) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        return (n1 - n0) / ((t1 - t0) / 1e9) if t1 > t0 else 0.0


class MigrationServicer(pb_grpc.MigrationServicer):
    """Thin: each method delegates to the session and maps PhaseError to a status."""

    def __init__(self, session: SourceSession) -> None:
        self.s = session

    def Handshake(self, request, context):  # type: ignore[no-untyped-def]
        return _call(context, lambda: self.s.handshake(request))

    def Demand(self, request_iterator, context):  # type: ignore[no-untyped-def]
        yield from self._tracked(context, lambda mid: self.s.demand(request_iterator, mid))

    def Stream(self, request_iterator, context):  # type: ignore[no-untyped-def]
        yield from self._tracked(context, lambda mid: self.s.stream(request_iterator, mid))

    def _tracked(self, context, fn):  # type: ignore[no-untyped-def]
        mid = dict(context.invocation_metadata() or ()).get(MIGRATION_ID_KEY, "")
        self.s.stream_opened()
        try:
            yield from _stream(context, lambda: fn(mid))
        finally:
            self.s.stream_closed()

    def Complete(self, request, context):  # type: ignore[no-untyped-def]
        return _call(context, lambda: self.s.complete(request))

    def Cancel(self, request, context):  # type: ignore[no-untyped-def]
        return _call(context, lambda: self.s.cancel(request))


def _call(context: grpc.ServicerContext, fn):  # type: ignore[no-untyped-def]
    try:
        return fn()
    except PhaseError as exc:
        context.abort(exc.code, str(exc))
    except MigratorError as exc:
        # e.g. the source guest died: the peer gets one precise status, we log one line
        log.error("%s", exc)
        context.abort(grpc.StatusCode.ABORTED, f"source failed: {exc}")


def _stream(context: grpc.ServicerContext, fn):  # type: ignore[no-untyped-def]
    try:
        yield from fn()
    except PhaseError as exc:
        context.abort(exc.code, str(exc))
    except MigratorError as exc:
        log.error("%s", exc)
        context.abort(grpc.StatusCode.ABORTED, f"source failed: {exc}")


def serve(
    session: SourceSession, listen: str, *, secret: str | None, tls: TlsFiles | None = None, workers: int = 8
) -> tuple[grpc.Server, int]:
    """Start the page server; with a secret, every call without it is refused first."""
    interceptors = [SecretInterceptor(secret, on_refused=session.note_refused)] if secret else []
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="page-server"),
        options=GRPC_OPTIONS,
        interceptors=interceptors,
    )
    pb_grpc.add_MigrationServicer_to_server(MigrationServicer(session), server)
    if tls is not None and tls.enabled:
        port = server.add_secure_port(listen, tls.server_credentials())
    else:
        port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    server.start()
    return server, port
