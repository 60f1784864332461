"""The Migration service on the source: thin methods over :class:`SourceSession`.

Each method delegates to the session and maps its refusals to one precise
status (``Refused.status``); a refusal that names an ended epoch also carries
``migrator-epoch-ended: <why>`` in its trailing metadata, so a destination can
tell "your migration is over" from "you sent something wrong".
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from migrator.errors import MigratorError
from migrator.security import SecretInterceptor, TlsFiles
from migrator.source.guard import WAITING_MAX, CallGuard, RefusalLog, quiet_grpc_logs, raise_fd_limit, server_options
from migrator.source.ownership import ENDED_KEY, Refused
from migrator.source.serving import MAX_BATCH_PAGES
from migrator.wire import migration_pb2 as pb

if TYPE_CHECKING:
    from migrator.source.session import SourceSession

log = logging.getLogger("migrator.source")
T = TypeVar("T")



class MigrationServicer:
    """The control methods (the session's); Demand and Stream are served by the workers."""

    def __init__(self, session: SourceSession) -> None:
        self.s = session

    def Describe(self, request, context):  # type: ignore[no-untyped-def]
        return _unary(context, lambda: self.s.describe(request))

    def Handshake(self, request, context):  # type: ignore[no-untyped-def]
        return _unary(context, lambda: self.s.handshake(request))

    def Switchover(self, request, context):  # type: ignore[no-untyped-def]
        return _unary(context, lambda: self.s.switchover(request))

    def Precopy(self, request, context):  # type: ignore[no-untyped-def]
        yield from streaming(context, lambda: self.s.precopy(request))

    def Complete(self, request, context):  # type: ignore[no-untyped-def]
        return _unary(context, lambda: self.s.complete(request))

    def Cancel(self, request, context):  # type: ignore[no-untyped-def]
        return _unary(context, lambda: self.s.cancel(request))

    def Rollback(self, request, context):  # type: ignore[no-untyped-def]
        return _unary(context, lambda: pb.RollbackReply(message=self.s.rollback(request.force)))


def _abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    if isinstance(exc, Refused):
        if exc.ended:
            context.set_trailing_metadata(((ENDED_KEY, exc.ended),))
        context.abort(getattr(grpc.StatusCode, exc.status), str(exc))
    # e.g. the source guest died: the peer gets one precise status, we log one line
    log.error("%s", exc)
    context.abort(grpc.StatusCode.ABORTED, f"source failed: {exc}")


def _unary(context: grpc.ServicerContext, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except (Refused, MigratorError) as exc:
        _abort(context, exc)
        raise AssertionError("unreachable") from None


def streaming(context: grpc.ServicerContext, fn: Callable[[], Iterator[Any]]) -> Iterator[Any]:
    """A streaming method's body: refusals become their status, a cancelled call just ends."""
    try:
        yield from fn()
    except (Refused, MigratorError) as exc:
        _abort(context, exc)
    except grpc.RpcError:
        return  # the call was cancelled (its epoch ended) or the peer went away


def make_server(
    handlers: list[grpc.GenericRpcHandler], listen: str, *, npages: int, page_size: int, secret: str | None,
    tls: TlsFiles | None, current_epoch: Callable[[], int], streams: int, name: str,
    on_refused: Callable[[str], None] | None = None,
) -> tuple[grpc.Server, int]:  # fmt: skip
    """A gRPC server with the guard's layers (``guard.py``): the secret on the headers,
    then the call guard, and the transport bounded for this guest.

    One worker per call that may wait: the calls waiting for a first message,
    ``streams`` long-lived streams, and a few unary calls (microseconds each
    once their request is in).  Raises OSError if it cannot listen.
    """
    quiet_grpc_logs()
    raise_fd_limit()
    guard = CallGuard(current_epoch)
    interceptors: list[grpc.ServerInterceptor] = [guard]
    if secret:
        interceptors.insert(0, SecretInterceptor(secret, on_refused=on_refused or RefusalLog().note))
    workers = WAITING_MAX + streams + 8
    options = server_options(npages, page_size, MAX_BATCH_PAGES) + [("grpc.so_reuseport", 0)]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name),
        options=options,
        interceptors=interceptors,
        maximum_concurrent_rpcs=workers,  # beyond: RESOURCE_EXHAUSTED at once, never a queue
    )
    server.add_generic_rpc_handlers(handlers)
    try:
        if tls is not None and tls.enabled:
            port = server.add_secure_port(listen, tls.server_credentials())
        else:
            port = server.add_insecure_port(listen)
    except RuntimeError as exc:  # gRPC's "Failed to bind to address ..."
        port, why = 0, str(exc)
    else:
        why = "address in use or not resolvable"
    if port == 0:
        server.stop(0)
        raise OSError(f"cannot listen on {listen}: {why}")
    server.start()
    return server, port


def serve_control(session: SourceSession, listen: str, *, secret: str | None, tls: TlsFiles | None = None) -> tuple[grpc.Server, int]:
    """The session's control server (Describe, Handshake, Switchover, Complete, Cancel, Rollback)."""
    return make_server([_control_handlers(session)], listen, npages=session.npages, page_size=session.page_size, secret=secret, tls=tls,
                       current_epoch=lambda: session.epoch, streams=0, name="control",
                       on_refused=session.note_refused)  # fmt: skip


def _control_handlers(session: SourceSession) -> grpc.GenericRpcHandler:
    s = MigrationServicer(session)
    u = grpc.unary_unary_rpc_method_handler
    return grpc.method_handlers_generic_handler("migrator.wire.Migration", {
        "Describe": u(s.Describe, pb.DescribeRequest.FromString, pb.Manifest.SerializeToString),
        "Handshake": u(s.Handshake, pb.HandshakeRequest.FromString, pb.Manifest.SerializeToString),
        "Switchover": u(s.Switchover, pb.SwitchoverRequest.FromString, pb.SwitchoverReply.SerializeToString),
        "Precopy": grpc.unary_stream_rpc_method_handler(s.Precopy, pb.PrecopyRequest.FromString,
                                                        pb.PrecopyProgress.SerializeToString),
        "Complete": u(s.Complete, pb.CompleteRequest.FromString, pb.CompleteReply.SerializeToString),
        "Cancel": u(s.Cancel, pb.CancelRequest.FromString, pb.CancelReply.SerializeToString),
        "Rollback": u(s.Rollback, pb.RollbackRequest.FromString, pb.RollbackReply.SerializeToString),
    })  # fmt: skip
