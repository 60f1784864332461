"""The destination's view of the source: a page-source interface and its gRPC form.

The transport seam (httpx's MockTransport): the pipeline talks to a
:class:`PageSource`; :class:`GrpcPageSource` is the real one, and
``migrator.dest.local_source.LocalPageSource`` serves a RAM image in-process so
the fault path can be tested without a network.

Two gRPC channels, so two TCP connections: ``urgent`` carries only the Demand
stream, ``bulk`` everything else, so a page a vCPU waits for never queues
behind megabytes of bulk data.  Every RpcError is mapped once, in
:func:`map_rpc_error`.
"""

from __future__ import annotations

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
    SourceFailed,
    SourceUnreachable,
    TransportError,
)
from migrator.security import TlsFiles, call_metadata
from migrator.wire import migration_pb2 as pb
from migrator.wire import migration_pb2_grpc as pb_grpc

UNARY_TIMEOUT = 15.0
BUSY_RETRY_S = 6.0  # a busy source (RESOURCE_EXHAUSTED) frees its waiting slots within 5 s (source/guard.py)
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
]


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
    if code in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.UNIMPLEMENTED,
    ):
        return ProtocolError(f"source refused {what}: {details}", status=code.name)
    name = code.name if code is not None else "UNKNOWN"
    return TransportError(f"{what} failed: {details}", status=name)


class DemandStream(Protocol):
    def request(self, request_id: int, first: int, count: int) -> None: ...
    def responses(self) -> Iterator[pb.PageBatch]: ...
    def close(self) -> None: ...


class BulkStream(Protocol):
    def seek(self, page: int) -> None: ...
    def set_codec(self, codec: int) -> None: ...
    def responses(self) -> Iterator[pb.PageBatch]: ...
    def close(self) -> None: ...


class PageSource(Protocol):
    """The destination's view of a source.  ``handshake`` starts a migration
    (its epoch is then stamped on every later message); see the proto for the
    meaning of each step."""

    def describe(self) -> pb.Manifest: ...
    def handshake(self, token: bytes) -> pb.Manifest: ...
    def switchover(self, timeout: float = ...) -> None: ...
    def open_demand(self) -> DemandStream: ...
    def open_bulk(self, codec: int, batch_pages: int, seek: int, missing_zstd: bytes = b"") -> BulkStream: ...
    def ping(self, timeout: float) -> None: ...
    def complete(self, installed: int, ack: bool = False) -> pb.CompleteReply: ...
    def cancel(self, reason: str) -> None: ...
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

    def responses(self) -> Iterator[pb.PageBatch]:
        epoch = getattr(self, "epoch", 0)
        try:
            for batch in self._call:
                if batch.epoch != epoch:  # a fence on this side too
                    raise ProtocolError("a batch of another migration", epoch=f"{batch.epoch:x}", ours=f"{epoch:x}")
                yield batch
        except grpc.RpcError as exc:
            if self._closed.is_set() and exc.code() == grpc.StatusCode.CANCELLED:
                return
            raise map_rpc_error(exc, self._what) from None

    def close(self) -> None:
        self._closed.set()
        self._reqs.q.put(None)
        self._call.cancel()


class GrpcDemandStream(_GrpcStream):
    epoch = 0

    def request(self, request_id: int, first: int, count: int) -> None:
        self._put(pb.DemandRequest(epoch=self.epoch, request_id=request_id, first_page=first, count=count))


class GrpcBulkStream(_GrpcStream):
    epoch = 0

    def seek(self, page: int) -> None:
        self._put(pb.StreamControl(epoch=self.epoch, seek_page=page))

    def set_codec(self, codec: int) -> None:
        self._put(pb.StreamControl(epoch=self.epoch, codec=pb.Codec.Name(codec)))


class GrpcPageSource:
    def __init__(
        self, address: str, *, secret: str | None = None, tls: TlsFiles | None = None, connect_timeout: float = 5.0
    ) -> None:
        self.address = address
        self._secret = secret
        self._md = call_metadata(secret)
        self.epoch = 0  # set by the handshake; every later message carries it
        creds = tls.channel_credentials() if tls is not None and tls.enabled else None

        def channel(name: str) -> grpc.Channel:
            opts = CHANNEL_OPTIONS + [("migrator.channel", name)]
            return grpc.secure_channel(address, creds, options=opts) if creds else grpc.insecure_channel(address, options=opts)

        self._urgent = channel("urgent")
        self._bulk = channel("bulk")
        self._urgent_stub = pb_grpc.MigrationStub(self._urgent)
        self._bulk_stub = pb_grpc.MigrationStub(self._bulk)
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
                return self._bulk_stub.Describe(req, timeout=max(0.5, deadline - time.monotonic()), metadata=self._md)
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
        m = self._first_call(pb.DescribeRequest(protocol_version=PROTOCOL_VERSION))
        # bring the urgent connection up too, before the downtime starts
        try:
            grpc.channel_ready_future(self._urgent).result(timeout=self._connect_timeout)
        except grpc.FutureTimeoutError:
            raise SourceUnreachable("the source's urgent channel did not come up", address=self.address) from None
        return m

    def handshake(self, token: bytes) -> pb.Manifest:
        req = pb.HandshakeRequest(protocol_version=PROTOCOL_VERSION, session_token=token)
        m = self._unary(self._bulk_stub.Handshake, req, "handshake")
        self.epoch = m.epoch
        # every later call names the migration in its headers too: the source
        # serves its owner first (see source/guard.py)
        self._md = call_metadata(self._secret) + ((EPOCH_KEY, f"{m.epoch:016x}"),)
        return m

    def switchover(self, timeout: float = UNARY_TIMEOUT) -> None:
        self._unary(self._bulk_stub.Switchover, pb.SwitchoverRequest(epoch=self.epoch), "switch-over", timeout=timeout)

    def open_demand(self) -> GrpcDemandStream:
        # the opening message (request 0, no pages) binds the stream to the migration at once
        hello = pb.DemandRequest(epoch=self.epoch)
        stream = GrpcDemandStream(self._urgent_stub.Demand, hello, "demand fetch", self._md)
        stream.epoch = self.epoch
        return stream

    def ping(self, timeout: float) -> None:
        """One quick call: raises TransportError while the source cannot be reached."""
        req = pb.DescribeRequest(protocol_version=PROTOCOL_VERSION)
        try:
            self._bulk_stub.Describe(req, timeout=timeout, metadata=self._md)
        except grpc.RpcError as exc:
            raise map_rpc_error(exc, "reconnect") from None

    def open_bulk(self, codec: int, batch_pages: int, seek: int, missing_zstd: bytes = b"") -> GrpcBulkStream:
        first = pb.StreamControl(
            epoch=self.epoch, seek_page=seek, codec=pb.Codec.Name(codec), batch_pages=batch_pages,
            missing_map_zstd=missing_zstd,
        )  # fmt: skip
        stream = GrpcBulkStream(self._bulk_stub.Stream, first, "bulk stream", self._md)
        stream.epoch = self.epoch
        return stream

    def complete(self, installed: int, ack: bool = False) -> pb.CompleteReply:
        req = pb.CompleteRequest(epoch=self.epoch, pages_installed=installed, ack=ack)
        return self._unary(self._bulk_stub.Complete, req, "completion", timeout=5.0)

    def cancel(self, reason: str) -> None:
        self._unary(self._bulk_stub.Cancel, pb.CancelRequest(epoch=self.epoch, reason=reason), "cancel", timeout=5.0)

    def rollback(self, force: bool) -> str:
        """Ask the source to take its guest back (`migrator rollback`); returns what it said."""
        reply = self._unary(self._bulk_stub.Rollback, pb.RollbackRequest(force=force), "roll-back")
        return str(reply.message)

    def close(self) -> None:
        self._urgent.close()
        self._bulk.close()
