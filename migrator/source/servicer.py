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
from typing import Any, TypeVar

import grpc

from migrator.errors import MigratorError
from migrator.security import SecretInterceptor, TlsFiles
from migrator.source.ownership import ENDED_KEY, Refused
from migrator.source.session import SourceSession
from migrator.wire import migration_pb2_grpc as pb_grpc

log = logging.getLogger("migrator.source")
T = TypeVar("T")

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


class MigrationServicer(pb_grpc.MigrationServicer):
    def __init__(self, session: SourceSession) -> None:
        self.s = session

    def Describe(self, request, context):  # type: ignore[no-untyped-def]
        return _unary(context, lambda: self.s.describe(request))

    def Handshake(self, request, context):  # type: ignore[no-untyped-def]
        return _unary(context, lambda: self.s.handshake(request))

    def Switchover(self, request, context):  # type: ignore[no-untyped-def]
        return _unary(context, lambda: self.s.switchover(request))

    def Demand(self, request_iterator, context):  # type: ignore[no-untyped-def]
        yield from _streaming(context, lambda: self.s.demand(request_iterator, context.cancel))

    def Stream(self, request_iterator, context):  # type: ignore[no-untyped-def]
        yield from _streaming(context, lambda: self.s.stream(request_iterator, context.cancel))

    def Complete(self, request, context):  # type: ignore[no-untyped-def]
        return _unary(context, lambda: self.s.complete(request))

    def Cancel(self, request, context):  # type: ignore[no-untyped-def]
        return _unary(context, lambda: self.s.cancel(request))

    def Rollback(self, request, context):  # type: ignore[no-untyped-def]
        from migrator.wire import migration_pb2 as pb

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


def _streaming(context: grpc.ServicerContext, fn: Callable[[], Iterator[Any]]) -> Iterator[Any]:
    try:
        yield from fn()
    except (Refused, MigratorError) as exc:
        _abort(context, exc)
    except grpc.RpcError:
        return  # the call was cancelled (its epoch ended) or the peer went away


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
