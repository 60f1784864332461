"""The destination's two streams to the source, and their recovery after a lost connection.

Post-copy splits the guest's memory between two hosts until the last page
arrives, so a lost connection must never lose the guest.  When either stream
fails with a transport error (not an authentication or protocol error):

* the vCPUs that fault simply stay blocked in the kernel: their pages are
  REQUESTED in the page table, and nothing is installed until data arrives;
* the session calls :meth:`Channels.recover`, which says once, at once, that
  the source is unreachable and that it waits, then retries with backoff
  until the reconnect deadline;
* on success it opens a new demand stream and sends every unanswered request
  again (same request ids, so replies still match), and a new bulk stream whose
  first message carries the map of pages still missing, which the source sends
  again whatever it had sent before.

A page can therefore arrive twice (once before the cut, once after); the page
table installs exactly one copy and counts the other.  Nothing is installed
that fails its checksum or was not asked for.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

import zstandard

from migrator.config import DestConfig
from migrator.dest.install import Installer
from migrator.dest.pagetable import PRESENT, PageTable
from migrator.dest.prefetch import DemandChannel, Prefetcher
from migrator.dest.source_client import PageSource
from migrator.errors import AuthError, GuestDied, SourceUnreachable, TransportError
from migrator.guest import GuestProcess
from migrator.stats import DestStats

BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 2.0


class Channels:
    def __init__(
        self,
        src: PageSource,
        installer: Installer,
        table: PageTable,
        zero_map: bytes,
        stats: DestStats,
        cfg: DestConfig,
        loopback: bool,
        on_fatal: Callable[[BaseException], None],
        say: Callable[[str], None],
    ) -> None:
        self.src, self.installer, self.table, self.zero_map, self.stats = src, installer, table, zero_map, stats
        self.cfg, self.loopback, self.on_fatal, self.say = cfg, loopback, on_fatal, say
        self.outstanding: dict[int, tuple[int, int]] = {}
        self.ids = itertools.count(1)
        self.lost = threading.Event()
        self.lost_exc: BaseException | None = None
        self.reconnects = 0
        self.handler: Any = None  # the FaultHandler, whose zero map we keep current
        self.demand = self._new_demand()
        self.prefetcher = self._new_prefetcher(b"", cfg.prefetch_delay)

    def _new_demand(self) -> DemandChannel:
        return DemandChannel(self.src, self.installer, self.stats, self.on_error, self.outstanding, self.ids)

    def _new_prefetcher(self, missing_zstd: bytes, delay: float = 0.0) -> Prefetcher:
        cfg = self.cfg
        p = Prefetcher(
            self.src, self.installer, self.table, self.zero_map, self.stats, cfg.compress, self.loopback,
            cfg.batch_pages, self.on_error, delay, missing_zstd,
        )  # fmt: skip
        p.on_zero_map = self._zero_map_arrived
        return p

    def _zero_map_arrived(self, zero_map: bytes) -> None:
        """The map of never-touched pages came with the first bulk batch: the fault
        handler resolves faults on them locally from now on."""
        self.zero_map = zero_map
        if self.handler is not None:
            self.handler.zero_map = zero_map

    # -- called from the fault threads and the stream threads ---------------------------
    def request(self, page: int, count: int) -> None:
        self.demand.request(page, count)
        self.prefetcher.after_fault(page, count)

    def on_error(self, exc: BaseException) -> None:
        if isinstance(exc, TransportError) and not isinstance(exc, AuthError):
            if self.lost_exc is None:
                self.lost_exc = exc
            self.lost.set()
        else:
            self.on_fatal(exc)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self.demand.start()
        self.prefetcher.start()

    def stop(self) -> None:
        self.prefetcher.stop()
        self.demand.stop()

    @property
    def compression(self) -> str:
        return self.prefetcher.compression

    def _probe(self, t_end: float) -> tuple[bool, TransportError | None]:
        """Switchover is idempotent: it answers "this migration is still on", or raises
        MigrationEnded if the source took the guest back meanwhile."""
        try:
            self.src.switchover(timeout=max(0.2, min(2.0, t_end - time.monotonic())))
        except AuthError:
            raise
        except TransportError as err:
            return False, err
        return True, None

    def recover(self, guest: GuestProcess) -> None:
        """Reconnect after a lost stream, or raise at the deadline (or if the source
        ended the migration meanwhile: MigrationEnded)."""
        exc = self.lost_exc
        self.stop()
        deadline_s = self.cfg.reconnect_deadline
        t_end = time.monotonic() + deadline_s
        backoff = BACKOFF_FIRST_S
        said = False  # (a source that ended the migration raises in the first probe: nothing to say)
        while True:
            if not guest.alive():
                raise GuestDied("the destination guest died while the source was unreachable", exit=guest.proc.returncode)
            ok, err = self._probe(t_end)
            if not said:
                self.say(f"source unreachable ({exc}); the guest waits for its pages; reconnecting for up to "
                         f"{deadline_s:g} s")  # fmt: skip
                said = True
            if ok:
                break
            remaining = t_end - time.monotonic()
            if remaining <= 0:
                raise SourceUnreachable(
                    f"source unreachable for {deadline_s:g} s, giving up; the guest's memory is split "
                    f"between the two hosts and this side cannot finish ({err})"
                ) from None
            time.sleep(min(backoff, remaining))
            backoff = min(backoff * 2, BACKOFF_MAX_S)
        self.reconnects += 1
        self.lost_exc = None
        self.lost.clear()
        missing = bytes(1 if s != PRESENT else 0 for s in self.table.state)
        self.demand = self._new_demand()
        self.prefetcher = self._new_prefetcher(zstandard.ZstdCompressor(level=1).compress(missing))
        again = len(self.outstanding)
        self.start()  # the new demand stream sends every unanswered request again
        self.say(f"reconnected to the source (reconnection {self.reconnects}); asked again for {again} requests, "
                 f"{missing.count(1)} pages still missing")  # fmt: skip
