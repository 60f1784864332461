"""What a peer can make the page server spend, before and after authentication.

A peer without the migration's secret gets nothing and costs almost nothing; a
peer with it is bounded.  The layers, outermost first:

1. **Transport** (:func:`server_options`): message sizes derived from what the
   protocol needs for this guest (the largest request is a bulk control
   carrying a compressed missing-page map: about one byte per page), a bound
   on connections, on streams per connection and on concurrent calls, a short
   HTTP/2 handshake time (a silent or byte-at-a-time connection is closed
   within seconds), and idle connections closed.
2. **The secret** (``security.SecretInterceptor``), checked on the call's
   headers in gRPC's own polling thread.  A refused call is answered by a
   handler that never reads its body, whatever the method's shape: no worker
   waits for a body that may never come, nothing is decoded or buffered
   beyond what the transport holds.  Refusals are logged rate-limited, with a
   count (:class:`RefusalLog`).
3. **Every authenticated call** (:class:`CallGuard`) is served in its
   streaming form, so that no worker waits for a request for long: at most
   ``WAITING_MAX`` calls wait for their first message at a time, each for at
   most ``FIRST_MESSAGE_TIMEOUT_S`` (the :class:`Watchdog` cancels it).  Calls
   that name the migration in progress (``x-migrator-epoch`` metadata: only
   its destination knows it) are exempt from the waiting bound, so the owner
   of the migration is never starved by other peers.  A message that does not
   decode is refused with INVALID_ARGUMENT.
4. **The session** bounds the streams of a migration per kind and checks every
   size a peer supplies before allocating (zstd frames by their declared size:
   :func:`decompress_map`).

Status codes: UNAUTHENTICATED (no or wrong secret), RESOURCE_EXHAUSTED (a
bound reached), INVALID_ARGUMENT (undecodable or malformed), CANCELLED (no
request in time: the watchdog cancels the call), and the session's own (see
``ownership.py``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from migrator import pagemaps
from migrator.source.ownership import Refused

log = logging.getLogger("migrator.source")

EPOCH_KEY = "x-migrator-epoch"  # metadata: the migration a call belongs to (hex)
WAITING_MAX = 8  # calls of peers other than the owner waiting for their first message
WAITING_PER_ADDRESS = 4  # ... of which one peer address may hold this many
FIRST_MESSAGE_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 512  # each process raises its descriptor limit to hold them (raise_fd_limit)
STREAMS_PER_CONNECTION = 16
HANDSHAKE_TIMEOUT_MS = 5_000
IDLE_CONNECTION_MS = 30_000


def server_options(npages: int, page_size: int, max_batch_pages: int) -> list[tuple[str, Any]]:
    """gRPC server options bounding what any peer can make the transport hold.

    Sizes: a request is at most a bulk control with a zstd missing-page map
    (zstd's worst case is the input plus 1/128 plus a header) and a reply at
    most a batch of ``max_batch_pages`` pages with its flags, CRCs and, on the
    first bulk batch, the zero map.
    """
    max_request = npages + npages // 128 + 16 * 1024
    max_reply = max_batch_pages * (page_size + 6) + npages + npages // 128 + 64 * 1024
    return [
        ("grpc.max_receive_message_length", max_request),
        ("grpc.max_send_message_length", max_reply),
        ("grpc.max_allowed_incoming_connections", MAX_CONNECTIONS),
        ("grpc.max_concurrent_streams", STREAMS_PER_CONNECTION),
        ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
        ("grpc.max_connection_idle_ms", IDLE_CONNECTION_MS),
        ("grpc.max_metadata_size", 4096),
        ("grpc.absolute_max_metadata_size", 8192),
        # notice a vanished destination (a send blocked on a dead link would
        # otherwise keep the process from exiting), and accept the destination's
        # 1 s keepalive pings instead of answering them with GOAWAY
        ("grpc.keepalive_time_ms", 1000),
        ("grpc.keepalive_timeout_ms", 2000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 100),
        # a peer pinging faster than that is struck, five times, then sent away (a ping flood)
        ("grpc.http2.max_ping_strikes", 5),
    ] + [(k, int(v)) for k, v in (kv.split("=") for kv in os.environ.get("MIGRATOR_XOPTS", "").split(",") if kv)]


def decompress_map(data: bytes, size: int, what: str) -> bytes:
    """A peer's zstd-compressed 0/1 map of ``size`` pages, or Refused (INVALID_ARGUMENT)."""
    try:
        return pagemaps.decompress_map(data, size, what)
    except ValueError as exc:
        raise Refused("INVALID_ARGUMENT", str(exc)) from None


class RefusalLog:
    """Logs the first refusal at once, then at most one line per ``period`` with a count."""

    def __init__(self, period: float = 10.0) -> None:
        self.period = period
        self.total = 0
        self._lock = threading.Lock()
        self._pending: dict[str, int] = {}
        self._last = 0.0

    def note(self, why: str) -> None:
        now = time.monotonic()
        with self._lock:
            self.total += 1
            self._pending[why] = self._pending.get(why, 0) + 1
            if now - self._last < self.period:
                return
            pending, self._pending, self._last = self._pending, {}, now
        n = sum(pending.values())
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(pending.items()))
        log.warning("refused %d call%s (%s)%s", n, "" if n == 1 else "s", reasons,
                    f"; at most one line per {self.period:g} s" if self.total == 1 else "")  # fmt: skip


class _RateLimitedRecords(logging.Filter):
    """gRPC's own log records about a peer's bytes (e.g. "Invalid encoding" of a metadata
    value, with a traceback, once per call): one line per period, with a count, no traceback."""

    def __init__(self, period: float = 10.0) -> None:
        super().__init__()
        self.period, self.last, self.dropped = period, 0.0, 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        if now - self.last < self.period:
            self.dropped += 1
            return False
        self.last = now
        record.exc_info, record.exc_text = None, None
        more = f" (and {self.dropped} more like it, not logged)" if self.dropped else ""
        record.msg, record.args, self.dropped = record.getMessage()[:200] + more, None, 0
        return True


def quiet_grpc_logs() -> None:
    """Rate-limit what gRPC logs about peers' input (a peer without the secret must not
    be able to fill the log)."""
    for name in ("grpc._cython.cygrpc", "grpc._server", "grpc._common"):
        logging.getLogger(name).addFilter(_RateLimitedRecords())


class Watchdog:
    """One thread that cancels calls whose deadline passed (no timer thread per call)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._armed: dict[int, tuple[float, Callable[[], Any]]] = {}
        self._next = 0
        self._thread = threading.Thread(target=self._run, name="call-watchdog", daemon=True)
        self._thread.start()

    def arm(self, cancel: Callable[[], Any], seconds: float) -> int:
        with self._cond:
            self._next += 1
            self._armed[self._next] = (time.monotonic() + seconds, cancel)
            self._cond.notify()
            return self._next

    def disarm(self, token: int) -> None:
        with self._cond:
            self._armed.pop(token, None)

    def _run(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                due = [t for t, (d, _) in self._armed.items() if d <= now]
                fire = [self._armed.pop(t)[1] for t in due]
                if not fire:
                    wait = min((d for d, _ in self._armed.values()), default=now + 60) - now
                    self._cond.wait(max(0.01, wait))
            for cancel in fire:
                try:
                    cancel()
                except Exception:  # noqa: BLE001 - the call may be gone already
                    pass


class Undecodable:
    """A request message that did not decode (what the guard's deserializer returns)."""

    def __init__(self, why: str) -> None:
        self.why = why


class CallGuard(grpc.ServerInterceptor):
    """Serve every method in its streaming form, with a bounded wait for the first message."""

    def __init__(self, current_epoch: Callable[[], int], watchdog: Watchdog | None = None) -> None:
        self._epoch = current_epoch
        self._watchdog = watchdog or Watchdog()
        self._lock = threading.Lock()
        self.waiting = 0
        self._by_address: dict[str, int] = {}
        self.refused_busy = 0

    def intercept_service(self, continuation, details):  # type: ignore[no-untyped-def]
        handler = continuation(details)
        if handler is None:
            return None
        owner = False
        for key, value in details.invocation_metadata or ():
            if key == EPOCH_KEY:
                current = self._epoch()
                owner = bool(current) and value == f"{current:016x}"
        return self._wrap(handler, owner)

    def _wrap(self, h: Any, owner: bool) -> Any:
        deser = h.request_deserializer

        def decode(raw: bytes) -> Any:
            try:
                return deser(raw) if deser is not None else raw
            except Exception as exc:  # noqa: BLE001 - any decode failure is the peer's
                return Undecodable(str(exc) or type(exc).__name__)

        kw = {"request_deserializer": decode, "response_serializer": h.response_serializer}
        first = self._first
        if h.request_streaming and h.response_streaming:

            def ss(it: Iterator[Any], ctx: grpc.ServicerContext) -> Iterator[Any]:
                msg = first(it, ctx, owner)
                yield from h.stream_stream(_chain(msg, it), ctx)

            return grpc.stream_stream_rpc_method_handler(ss, **kw)
        if h.request_streaming:
            return grpc.stream_unary_rpc_method_handler(
                lambda it, ctx: h.stream_unary(_chain(first(it, ctx, owner), it), ctx), **kw
            )
        if h.response_streaming:

            def us(it: Iterator[Any], ctx: grpc.ServicerContext) -> Iterator[Any]:
                yield from h.unary_stream(first(it, ctx, owner), ctx)

            return grpc.stream_stream_rpc_method_handler(us, **kw)
        return grpc.stream_unary_rpc_method_handler(lambda it, ctx: h.unary_unary(first(it, ctx, owner), ctx), **kw)

    def _first(self, it: Iterator[Any], ctx: grpc.ServicerContext, owner: bool) -> Any:
        """The call's first message, waited for at most FIRST_MESSAGE_TIMEOUT_S."""
        address = _address(ctx.peer()) if not owner else ""
        if not owner:
            with self._lock:
                mine = self._by_address.get(address, 0)
                if self.waiting >= WAITING_MAX or mine >= WAITING_PER_ADDRESS:
                    self.refused_busy += 1
                    busy = True
                else:
                    self.waiting += 1
                    self._by_address[address] = mine + 1
                    busy = False
            if busy:
                ctx.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many calls already wait for their request")
        token = self._watchdog.arm(ctx.cancel, FIRST_MESSAGE_TIMEOUT_S)
        cancelled = False
        try:
            msg = next(it, None)
        except grpc.RpcError:
            msg, cancelled = None, True
        finally:
            self._watchdog.disarm(token)
            if not owner:
                with self._lock:
                    self.waiting -= 1
                    left = self._by_address.pop(address, 1) - 1
                    if left:
                        self._by_address[address] = left
        if cancelled:
            ctx.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"no request within {FIRST_MESSAGE_TIMEOUT_S:g} s")
        if msg is None:
            ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call ended without a request")
        if isinstance(msg, Undecodable):
            ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, f"undecodable request: {msg.why}")
        return msg


def _address(peer: str) -> str:
    """The address part of gRPC's peer string ("ipv4:10.0.0.2:54321" -> "ipv4:10.0.0.2")."""
    return peer.rsplit(":", 1)[0] if peer.count(":") > 1 else peer


def raise_fd_limit() -> None:
    """The soft descriptor limit up to the hard one (a server holds one per connection)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 16
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    for msg in rest:
        if isinstance(msg, Undecodable):
            raise Refused("INVALID_ARGUMENT", f"undecodable request: {msg.why}")
        yield msg
