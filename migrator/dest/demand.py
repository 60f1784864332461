"""The urgent channel, in the fault process: demand requests out, replies installed.

Fault threads call :meth:`DemandChannel.request` (a queue put to the gRPC
stream: the only hand-off on the way out); one ``demand-rx`` thread reads the
stream and installs each reply itself, so the reply path has no further
hand-off.  The stream is opened (and bound to the migration by its first
message) before the guest resumes; requests made before it is open are kept
and sent when it is.

A lost connection: the vCPUs that wait simply stay blocked in the kernel; the
thread says so (event ``lost``), reopens the stream with backoff, sends every
unanswered request again (same ids, so replies still match) and says
``back``.  The session enforces the deadline.  A reply for pages not asked
for, or anything else a source should never send, is fatal (event ``fatal``).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

from migrator.dest.install import Installer
from migrator.dest.pagestate import OUTSTANDING, Counters, PageState
from migrator.dest.source_client import DemandStream, PageSource
from migrator.errors import AuthError, MigratorError, ProtocolError, TransportError
from migrator.workers import set_thread_name

BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 1.0


class DemandChannel:
    def __init__(
        self,
        source: PageSource,
        installer: Installer,
        ps: PageState,
        counters: Counters,
        event: Callable[..., None],
    ) -> None:
        self.source, self.installer, self.ps, self.c = source, installer, ps, counters
        self.event = event  # event(name, **fields) to the session
        self._ids = itertools.count(1)
        # request id -> (first page, count) not yet answered; written under _lock
        self._outstanding: dict[int, tuple[int, int]] = {}
        self._lock = threading.Lock()
        self._stream: DemandStream | None = None
        self._epoch = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.timeline: list[tuple[int, str, int]] = []  # (monotonic ns, "demand", pages)

    def start(self, epoch: int) -> None:
        """Open the stream for ``epoch`` and send what was asked before it was open."""
        self._epoch = epoch
        self._open()
        self._thread = threading.Thread(target=self._run, name="demand-rx", daemon=True)
        self._thread.start()

    def _open(self) -> None:
        with self._lock:
            self._stream = self.source.open_demand(self._epoch)
            for rid, (first, count) in list(self._outstanding.items()):
                self._stream.request(rid, first, count)

    def request(self, first: int, count: int) -> None:
        rid = next(self._ids)
        with self._lock:
            self._outstanding[rid] = (first, count)  # before sending: the reply may be fast
            self.ps.words[OUTSTANDING] = len(self._outstanding)
            if self._stream is not None:
                self._stream.request(rid, first, count)
        self.c.add("demand_requests")

    def discarded(self, first: int, count: int) -> None:
        """Tell the source the guest gave these pages up (it need not send them).
        Best effort: a notice lost with a connection only costs wire (the page
        state keeps them from being installed; a reconnected lane's missing map
        leaves them out)."""
        with self._lock:
            if self._stream is not None:
                self._stream.discarded(first, count)

    def _run(self) -> None:
        set_thread_name("demand-rx")
        backoff = BACKOFF_FIRST_S
        lost = False
        while not self._stopping:
            try:
                stream = self._stream
                assert stream is not None
                for raw in stream.responses():
                    if lost:
                        self.event("back", what="demand")
                        lost, backoff = False, BACKOFF_FIRST_S
                    self._install(raw)
                if self._stopping:
                    return
                raise TransportError("the source ended the demand stream")
            except TransportError as exc:
                if self._stopping:
                    return
                if isinstance(exc, AuthError):
                    self._fatal(exc)
                    return
                if not lost:
                    self.event("lost", what="demand", error=str(exc))
                    lost = True
                time.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                try:
                    self._open()
                except TransportError:
                    pass  # still unreachable: the next turn waits longer
                except BaseException as err:  # noqa: BLE001 - e.g. the channel closed by stop()
                    if not self._stopping:
                        self._fatal(err)
                    return
            except BaseException as exc:  # noqa: BLE001 - the session ends the migration
                if not self._stopping:
                    self._fatal(exc)
                return

    def _install(self, raw: bytes) -> None:
        d = self.installer.decode(raw, self._epoch)
        b = d.batch
        with self._lock:
            asked = self._outstanding.pop(b.request_id, None)
            self.ps.words[OUTSTANDING] = len(self._outstanding)
        if asked != (b.first_page, b.count):
            raise ProtocolError("demand reply for pages that were not asked for", request_id=b.request_id,
                                first=b.first_page, count=b.count, asked=asked)  # fmt: skip
        self.c.add("wire_bytes", len(b.data))
        self.c.add("raw_bytes", b.raw_size)
        n = self.installer.install(d, "demand")
        self.timeline.append((time.monotonic_ns(), "demand", n))

    def _fatal(self, exc: BaseException) -> None:
        self.event("fatal", **describe_error(exc))

    def stop(self) -> None:
        self._stopping = True
        with self._lock:
            if self._stream is not None:
                self._stream.close()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout=5)


def describe_error(exc: BaseException) -> dict[str, Any]:
    """An exception as an event's fields (the session raises it again as itself)."""
    if isinstance(exc, MigratorError):
        return {"error": exc.message, "kind": type(exc).__name__, "fields": {k: str(v) for k, v in exc.fields.items()}}
    return {"error": f"{type(exc).__name__}: {exc}", "kind": "MigratorError", "fields": {}}
