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
from migrator.source.guard import WAITING_MAX, CallGuard, server_options
from migrator.source.ownership import ENDED_KEY, Refused
from migrator.source.session import MAX_BATCH_PAGES, MAX_STREAMS, SourceSession
from migrator.wire import migration_pb2_grpc as pb_grpc

log = logging.getLogger("migrator.source")
T = TypeVar("T")

# One worker per call that may wait: the calls waiting for a first message
# (guard.WAITING_MAX), the streams of a migration (session.MAX_STREAMS), and
# unary calls, which take microseconds once their request is in.
WORKERS = WAITING_MAX + sum(MAX_STREAMS.values()) + 8


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
    session: SourceSession, listen: str, *, secret: str | None, tls: TlsFiles | None = None
) -> tuple[grpc.Server, int]:
    """Start the page server: every call passes the secret (when there is one),
    then the call guard; the transport is bounded for this guest (``guard.py``)."""
    guard = CallGuard(lambda: session.epoch)
    interceptors: list[grpc.ServerInterceptor] = [guard]
    if secret:
        interceptors.insert(0, SecretInterceptor(secret, on_refused=session.note_refused))
    workers = WORKERS
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="page-server"),
        options=server_options(session.npages, session.page_size, MAX_BATCH_PAGES),
        interceptors=interceptors,
        maximum_concurrent_rpcs=workers,  # beyond: RESOURCE_EXHAUSTED at once, never a queue
    )
    pb_grpc.add_MigrationServicer_to_server(MigrationServicer(session), server)
    if tls is not None and tls.enabled:
        port = server.add_secure_port(listen, tls.server_credentials())
    else:
        port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    server.start()
    session.guard = guard
    return server, port
