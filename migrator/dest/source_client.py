"""The destination's view of the source: the session's control calls, and the
streams its worker processes open.

The transport seam (httpx's MockTransport): the session talks to a
:class:`Control`, the fault process and the lanes to a :class:`PageSource`;
the gRPC forms are real, and ``local_source.py`` serves a RAM image without a
network.

Connections, one per flow: the session's control channel (the address the
user gave), the fault process's urgent channel and each lane's channel, at
the port offsets the source's manifest gives, so a page a vCPU waits for
never queues behind bulk data nor shares a process with it.  Every RpcError
is mapped once, in :func:`map_rpc_error`.  Stream responses are serialized
PageBatch bytes, decoded without copying by the installer (``fastbatch``).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Iterator
from typing import Protocol

import grpc

from migrator import PROTOCOL_VERSION
from migrator.errors import (
    AuthError,
    MigrationEnded,
    MigratorError,
    ProtocolError,
    SourceBusy,
    SourceFailed,
    SourceUnreachable,
    TransportError,
)
from migrator.security import TlsFiles, call_metadata
from migrator.wire import migration_pb2 as pb
from migrator.wire import migration_pb2_grpc as pb_grpc

UNARY_TIMEOUT = 15.0
BUSY_RETRY_S = 30.0  # a busy source (RESOURCE_EXHAUSTED) frees its waiting slots within 5 s (source/guard.py)
STREAM_TIMEOUT = 24 * 3600.0
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
    # a dead peer or a vanished link is noticed within seconds, not minutes
    ("grpc.keepalive_time_ms", 1000),
    ("grpc.keepalive_timeout_ms", 2000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # separate connections for the two channels
    ("grpc.use_local_subchannel_pool", 1),
    # after a lost connection, try again soon (the default backoff grows to 2 min)
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
] + [(k, int(v)) for k, v in (kv.split("=") for kv in os.environ.get("MIGRATOR_XOPTS", "").split(",") if kv)]


ENDED_KEY = "migrator-epoch-ended"  # trailing metadata of a refusal naming an ended epoch
EPOCH_KEY = "x-migrator-epoch"  # header naming the migration a call belongs to


def map_rpc_error(exc: grpc.RpcError, what: str) -> MigratorError:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    trailing = dict(exc.trailing_metadata() or ()) if hasattr(exc, "trailing_metadata") else {}
    if ENDED_KEY in trailing:
        return MigrationEnded(f"the source ended this migration ({details})", why=trailing[ENDED_KEY])
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return AuthError(f"the source refused us during {what}: {details}", status=code.name)
    if code == grpc.StatusCode.ABORTED:
        return SourceFailed(f"{what}: {details}", status=code.name)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return SourceUnreachable(f"source unreachable during {what}: {details}", status=code.name)
    if code == grpc.StatusCode.ALREADY_EXISTS:
        return SourceBusy(f"the source is migrating its guest to another destination ({details})")
    if code in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.UNIMPLEMENTED,
    ):
        return ProtocolError(f"source refused {what}: {details}", status=code.name)
    name = code.name if code is not None else "UNKNOWN"
    return TransportError(f"{what} failed: {details}", status=name)


class DemandStream(Protocol):
    def request(self, request_id: int, first: int, count: int) -> None: ...
    def discarded(self, first: int, count: int) -> None: ...
    def responses(self) -> Iterator[bytes]: ...
    def close(self) -> None: ...


class BulkStream(Protocol):
    def seek(self, page: int) -> None: ...
    def set_codec(self, codec: int) -> None: ...
    def responses(self) -> Iterator[bytes]: ...
    def close(self) -> None: ...


class PageSource(Protocol):
    """Where a worker process fetches pages from (one per process)."""

    def open_demand(self, epoch: int) -> DemandStream: ...
    def open_bulk(self, epoch: int, lane: int, lanes: int, codec: int, batch_pages: int, seek: int,
                  missing_zstd: bytes = b"", precopy: bool = False) -> BulkStream: ...  # fmt: skip
    def close(self) -> None: ...


class Control(Protocol):
    """The session's calls (see the proto for each step); ``handshake`` starts a
    migration, whose epoch every later call carries."""

    epoch: int

    def describe(self) -> pb.Manifest: ...
    def handshake(self, token: bytes) -> pb.Manifest: ...
    def switchover(self, timeout: float = ...) -> None: ...
    def complete(self, installed: int, ack: bool = False) -> pb.CompleteReply: ...
    def cancel(self, reason: str) -> None: ...
    def rollback(self, force: bool) -> str: ...
    def close(self) -> None: ...


class _QueueIter:
    """A request iterator fed from another thread; None ends it."""

    def __init__(self) -> None:
        self.q: queue.SimpleQueue[object] = queue.SimpleQueue()

    def __iter__(self) -> "_QueueIter":
        return self

    def __next__(self) -> object:
        item = self.q.get()
        if item is None:
            raise StopIteration
        return item


class _GrpcStream:
    def __init__(self, call_fn, first: object | None, what: str, metadata: tuple[tuple[str, str], ...] = ()) -> None:  # type: ignore[no-untyped-def]
        self._reqs = _QueueIter()
        if first is not None:
            self._reqs.q.put(first)
        self._what = what
        self._call = call_fn(self._reqs, timeout=STREAM_TIMEOUT, metadata=metadata)
        self._closed = threading.Event()

    def _put(self, msg: object) -> None:
        self._reqs.q.put(msg)

    def responses(self) -> Iterator[bytes]:
        try:
            yield from self._call
        except grpc.RpcError as exc:
            if self._closed.is_set() and exc.code() == grpc.StatusCode.CANCELLED:
                return
            raise map_rpc_error(exc, self._what) from None

    def close(self) -> None:
        self._closed.set()
        self._reqs.q.put(None)
        self._call.cancel()


class GrpcDemandStream(_GrpcStream):
    def __init__(self, call_fn, epoch: int, metadata: tuple[tuple[str, str], ...]) -> None:  # type: ignore[no-untyped-def]
        self.epoch = epoch
        # the opening message (request 0, no pages) binds the stream to the migration at once
        super().__init__(call_fn, pb.DemandRequest(epoch=epoch), "demand fetch", metadata)

    def request(self, request_id: int, first: int, count: int) -> None:
        self._put(pb.DemandRequest(epoch=self.epoch, request_id=request_id, first_page=first, count=count))

    def discarded(self, first: int, count: int) -> None:
        self._put(pb.DemandRequest(epoch=self.epoch, first_page=first, count=count, discarded=True))


class GrpcBulkStream(_GrpcStream):
    def __init__(self, call_fn, first: pb.StreamControl, metadata: tuple[tuple[str, str], ...]) -> None:  # type: ignore[no-untyped-def]
        self.epoch = first.epoch
        super().__init__(call_fn, first, "bulk stream", metadata)

    def seek(self, page: int) -> None:
        self._put(pb.StreamControl(epoch=self.epoch, seek_page=page))

    def set_codec(self, codec: int) -> None:
        self._put(pb.StreamControl(epoch=self.epoch, codec=pb.Codec.Name(codec)))


def _channel(address: str, tls: TlsFiles | None, name: str) -> grpc.Channel:
    opts = CHANNEL_OPTIONS + [("migrator.channel", name)]
    if tls is not None and tls.enabled:
        return grpc.secure_channel(address, tls.channel_credentials(), options=opts)
    return grpc.insecure_channel(address, options=opts)


def port_address(address: str, offset: int) -> str:
    """``address`` with its port moved by ``offset`` (the source's port block)."""
    host, _, port = address.rpartition(":")
    return f"{host}:{int(port) + offset}"


class GrpcPageSource:
    """A worker's streams: the urgent one (fault process) or its lane's."""

    def __init__(self, address: str, *, secret: str | None, tls: TlsFiles | None, epoch_headers: int = 0) -> None:
        self.address = address
        md = call_metadata(secret)
        if epoch_headers:
            md += ((EPOCH_KEY, f"{epoch_headers:016x}"),)
        self._md = md
        self._ch = _channel(address, tls, "stream")
        # responses stay serialized bytes: the installer decodes them without copying
        self._demand = self._ch.stream_stream("/migrator.wire.Migration/Demand",
                                              request_serializer=pb.DemandRequest.SerializeToString)  # fmt: skip
        self._stream = self._ch.stream_stream("/migrator.wire.Migration/Stream",
                                              request_serializer=pb.StreamControl.SerializeToString)  # fmt: skip

    def ready(self, timeout: float) -> None:
        """Bring the connection up now (before the downtime); raises SourceUnreachable."""
        try:
            grpc.channel_ready_future(self._ch).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise SourceUnreachable("cannot connect to the source's page server", address=self.address) from None

    def open_demand(self, epoch: int) -> GrpcDemandStream:
        return GrpcDemandStream(self._demand, epoch, self._with_epoch(epoch))

    def open_bulk(self, epoch: int, lane: int, lanes: int, codec: int, batch_pages: int, seek: int,
                  missing_zstd: bytes = b"", precopy: bool = False) -> GrpcBulkStream:  # fmt: skip
        first = pb.StreamControl(
            epoch=epoch, seek_page=seek, codec=pb.Codec.Name(codec), batch_pages=batch_pages,
            missing_map_zstd=missing_zstd, lane=lane, lanes=lanes, precopy=precopy,
        )  # fmt: skip
        return GrpcBulkStream(self._stream, first, self._with_epoch(epoch))

    def _with_epoch(self, epoch: int) -> tuple[tuple[str, str], ...]:
        if any(k == EPOCH_KEY for k, _ in self._md):
            return self._md
        return self._md + ((EPOCH_KEY, f"{epoch:016x}"),)

    def close(self) -> None:
        self._ch.close()


class GrpcControl:
    """The session's control channel."""

    def __init__(
        self, address: str, *, secret: str | None = None, tls: TlsFiles | None = None, connect_timeout: float = 5.0
    ) -> None:
        self.address = address
        self._secret = secret
        self._md = call_metadata(secret)
        self.epoch = 0  # set by the handshake; every later message carries it
        self._ch = _channel(address, tls, "control")
        self._stub = pb_grpc.MigrationStub(self._ch)
        self._connect_timeout = connect_timeout

    def _first_call(self, req: pb.DescribeRequest) -> pb.Manifest:
        """The first call retries while the connection comes up (and while the
        source is busy with other peers' calls: RESOURCE_EXHAUSTED, which its
        guard clears within seconds), and keeps the transport's own reason
        (refused, TLS handshake, ...) for the error."""
        deadline = time.monotonic() + self._connect_timeout
        busy_deadline = deadline + BUSY_RETRY_S
        while True:
            try:
                return self._stub.Describe(req, timeout=max(0.5, deadline - time.monotonic()), metadata=self._md)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < busy_deadline:
                    time.sleep(0.2)
                    continue
                final = "handshake" in (exc.details() or "").lower()  # TLS: retrying will not help
                if exc.code() != grpc.StatusCode.UNAVAILABLE or final or time.monotonic() >= deadline:
                    if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                        raise SourceUnreachable(
                            f"cannot connect to the source at {self.address}: {exc.details()}",
                            timeout=f"{self._connect_timeout:g}s",
                        ) from None
                    raise map_rpc_error(exc, "describe") from None
                time.sleep(0.2)

    def _unary(self, fn, req, what: str, timeout: float = UNARY_TIMEOUT):  # type: ignore[no-untyped-def]
        try:
            return fn(req, timeout=timeout, metadata=self._md)
        except grpc.RpcError as exc:
            raise map_rpc_error(exc, what) from None

    def describe(self) -> pb.Manifest:
        return self._first_call(pb.DescribeRequest(protocol_version=PROTOCOL_VERSION))

    def handshake(self, token: bytes) -> pb.Manifest:
        req = pb.HandshakeRequest(protocol_version=PROTOCOL_VERSION, session_token=token)
        m = self._unary(self._stub.Handshake, req, "handshake")
        self.epoch = m.epoch
        # every later call names the migration in its headers too: the source
        # serves its owner first (see source/guard.py)
        self._md = call_metadata(self._secret) + ((EPOCH_KEY, f"{m.epoch:016x}"),)
        return m

    def precopy(self, token: bytes, *, seconds: float, auto: bool, track_only: bool,
                hot_first: bool) -> Iterator[pb.PrecopyProgress]:  # fmt: skip
        """Start the source's pre-copy (or, ``track_only``, its hot-page tracking);
        yields its progress, the first message (round 0) at once with the pre-copy's
        epoch, the last one ``done``.  Raises a mapped MigratorError."""
        req = pb.PrecopyRequest(protocol_version=PROTOCOL_VERSION, session_token=token, seconds=seconds, auto=auto,
                                track_only=track_only, hot_first=hot_first)  # fmt: skip
        try:
            yield from self._stub.Precopy(req, timeout=STREAM_TIMEOUT, metadata=self._md)
        except grpc.RpcError as exc:
            raise map_rpc_error(exc, "pre-copy") from None

    def switchover(self, timeout: float = UNARY_TIMEOUT) -> None:
        self._unary(self._stub.Switchover, pb.SwitchoverRequest(epoch=self.epoch), "switch-over", timeout=timeout)

    def complete(self, installed: int, ack: bool = False) -> pb.CompleteReply:
        req = pb.CompleteRequest(epoch=self.epoch, pages_installed=installed, ack=ack)
        return self._unary(self._stub.Complete, req, "completion", timeout=5.0)

    def cancel(self, reason: str) -> None:
        self._unary(self._stub.Cancel, pb.CancelRequest(epoch=self.epoch, reason=reason), "cancel", timeout=5.0)

    def rollback(self, force: bool) -> str:
        """Ask the source to take its guest back (`migrator rollback`); returns what it said."""
        reply = self._unary(self._stub.Rollback, pb.RollbackRequest(force=force), "roll-back")
        return str(reply.message)

    def close(self) -> None:
        self._ch.close()
