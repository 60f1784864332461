"""Receivers: the demand channel's installer thread and the bulk prefetcher.

``DemandChannel``: fault threads call :meth:`request` (a queue put: the only
hand-off on the way out); one ``demand-rx`` thread reads the urgent stream and
installs each reply itself, so the reply path has no further hand-off.

``Prefetcher``: first maps every page the manifest says was never touched (zero
runs, one UFFDIO_ZEROPAGE per run, no data on the wire), then installs the bulk
stream's batches in contiguous runs, skipping pages another channel already
installed.  After a fault it may move the bulk stream's position past the
faulted page (policy.should_seek), so the stream follows the guest's locality.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator

import zstandard

from migrator import policy
from migrator.dest.install import Installer
from migrator.dest.pagetable import PageTable
from migrator.dest.source_client import BulkStream, DemandStream, PageSource
from migrator.errors import ProtocolError
from migrator.pagemaps import decompress_exact, is_01
from migrator.stats import DestStats
from migrator.wire import migration_pb2 as pb


ZERO_RUNS_PER_BATCH = 16


def _zstd_rate(sample: bytes) -> float:
    """Bytes/s zstd level 1 compresses ``sample`` at, here."""
    cctx = zstandard.ZstdCompressor(level=1)
    t = time.perf_counter()
    cctx.compress(sample)
    return len(sample) / max(time.perf_counter() - t, 1e-9)


class DemandChannel:
    def __init__(
        self,
        source: PageSource,
        installer: Installer,
        stats: DestStats,
        on_error: Callable[[BaseException], None],
        outstanding: dict[int, tuple[int, int]] | None = None,
        ids: Iterator[int] | None = None,
    ) -> None:
        self.installer = installer
        self.stats = stats
        self.on_error = on_error
        self._ids = ids if ids is not None else itertools.count(1)
        # request id -> (first page, count) of requests not yet answered; dict
        # operations are atomic, and each id is written by one thread, read by
        # one.  Shared with the channel that replaces this one after a
        # reconnection, which sends them again.
        self._outstanding: dict[int, tuple[int, int]] = outstanding if outstanding is not None else {}
        self._source = source
        # The stream opens at start(), which may come after the guest resumed
        # (keeping it out of the downtime): requests made before are recorded
        # and sent by start().  The lock makes "recorded and sent" exactly once.
        self._lock = threading.Lock()
        self._stream: DemandStream | None = None
        self._thread = threading.Thread(target=self._run, name="demand-rx", daemon=True)
        self._stopping = False

    def start(self) -> None:
        """Open the stream and send every request not yet answered (after a
        reconnection: those the lost stream carried)."""
        with self._lock:
            self._stream = self._source.open_demand()
            for rid, (first, count) in list(self._outstanding.items()):
                self._stream.request(rid, first, count)
        self._thread.start()

    def request(self, first: int, count: int) -> None:
        rid = next(self._ids)
        with self._lock:
            self._outstanding[rid] = (first, count)  # before sending: the reply may be fast
            if self._stream is not None:
                self._stream.request(rid, first, count)
        self.stats.add(demand_requests=1)

    def _run(self) -> None:
        try:
            inst = self.installer
            assert self._stream is not None
            for batch in self._stream.responses():
                asked = self._outstanding.pop(batch.request_id, None)
                if asked != (batch.first_page, batch.count):
                    raise ProtocolError(
                        "demand reply for pages that were not asked for",
                        request_id=batch.request_id, first=batch.first_page, count=batch.count, asked=asked,
                    )  # fmt: skip
                wire, data = inst.decode(batch)
                with self.stats.lock:
                    self.stats.wire_bytes += wire
                    self.stats.raw_bytes += batch.raw_size
                inst.install(batch.first_page, batch.flags, data, "demand")
        except BaseException as exc:  # noqa: BLE001
            if not self._stopping:
                self.on_error(exc)

    def stop(self) -> None:
        self._stopping = True
        with self._lock:
            if self._stream is not None:
                self._stream.close()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


class Prefetcher:
    def __init__(
        self,
        source: PageSource,
        installer: Installer,
        table: PageTable,
        zero_map: bytes,
        stats: DestStats,
        compress: str,
        peer_is_loopback: bool,
        batch_pages: int,
        on_error: Callable[[BaseException], None],
        delay_s: float = 0.0,
        missing_zstd: bytes = b"",
    ) -> None:
        self.source = source
        self.delay_s = delay_s
        self.missing_zstd = missing_zstd  # after a reconnection: what the source must send again
        self.on_zero_map: Callable[[bytes], None] | None = None
        self._stop_evt = threading.Event()
        self.installer = installer
        self.table = table
        self.zero_map = zero_map
        self.stats = stats
        self.compress = compress
        self.peer_is_loopback = peer_is_loopback
        self.codec = pb.CODEC_ZSTD if policy.initial_codec(compress) == "zstd" else pb.CODEC_NONE
        self.compression = policy.initial_codec(compress)  # what the summary reports
        self.batch_pages = batch_pages
        self.on_error = on_error
        self._stream: BulkStream | None = None
        self._stopping = False
        self._last_seek = 0.0
        self._seek_pos = -1
        self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)

    def start(self) -> None:
        if self.delay_s <= 0:
            self._stream = self.source.open_bulk(self.codec, self.batch_pages, 0, self.missing_zstd)
        self._thread.start()

    def after_fault(self, page: int, count: int) -> None:
        """Called by a fault thread after it requested [page, page+count)."""
        now = time.monotonic()
        target = (page + count) % self.table.npages  # past the last page: wrap (the source refuses a seek beyond)
        if self._stream is not None and policy.should_seek(target, self._seek_pos, now - self._last_seek):
            self._last_seek = now
            self._seek_pos = target
            self._stream.seek(target)

    def _install_zero_runs(self, limit: int) -> None:
        """Map up to ``limit`` runs of never-touched pages (all if limit < 0).

        Interleaved with the bulk batches so data starts flowing at once; until
        mapped, a fault on such a page is resolved locally by the fault thread.
        """
        for first, count in self._zero_runs:
            if self._stopping:
                return
            self.installer.install_zero_range(first, count)
            limit -= 1
            if limit == 0:
                return

    def _run(self) -> None:
        try:
            self._zero_runs = policy.runs_of(self.zero_map, 1, max_run=4096)
            inst = self.installer
            if self._stream is None:
                # bulk held back (fault-latency measurements with an idle bulk channel)
                if self._stop_evt.wait(self.delay_s):
                    return
                self._stream = self.source.open_bulk(self.codec, self.batch_pages, 0, self.missing_zstd)
            probe_t0 = 0.0
            probe_bytes = 0
            for batch in self._stream.responses():
                if batch.zero_map_zstd:
                    self._take_zero_map(batch.zero_map_zstd)
                if batch.last:
                    break
                wire, data = inst.decode(batch)
                with self.stats.lock:
                    self.stats.wire_bytes += wire
                    self.stats.raw_bytes += batch.raw_size
                    self.stats.bulk_batches += 1
                    if not self.stats.bulk_started_ns:
                        self.stats.bulk_started_ns = time.perf_counter_ns()
                inst.install(batch.first_page, batch.flags, data, "prefetch")
                self._install_zero_runs(ZERO_RUNS_PER_BATCH)
                if self.compress == "auto" and probe_bytes >= 0:
                    if probe_t0 == 0.0:
                        probe_t0 = time.monotonic()  # rate measured from the first batch's arrival
                    else:
                        probe_bytes += wire
                    elapsed = time.monotonic() - probe_t0
                    if probe_bytes >= policy.AUTO_PROBE_BYTES or (elapsed >= policy.AUTO_PROBE_SECONDS and probe_bytes):
                        self._decide_codec(probe_bytes / elapsed, data)
                        probe_bytes = -1
            self._install_zero_runs(-1)
            self.stats.bulk_finished_ns = time.perf_counter_ns()
        except BaseException as exc:  # noqa: BLE001
            if not self._stopping:
                self.on_error(exc)

    def _take_zero_map(self, zstd_map: bytes) -> None:
        """The source's map of never-touched pages (first bulk batch): validate, then use it."""
        npages = self.table.npages
        try:
            zero_map = decompress_exact(zstd_map, npages)
        except ValueError as exc:
            raise ProtocolError(f"bad zero map: {exc}") from None
        if not is_01(zero_map):
            raise ProtocolError("zero map must be one 0/1 byte per page")
        self.zero_map = zero_map
        self._zero_runs = policy.runs_of(zero_map, 1, max_run=4096)
        if self.on_zero_map is not None:
            self.on_zero_map(zero_map)

    def _decide_codec(self, link_rate: float, sample: bytes) -> None:
        """compress=auto: compare the measured link with this machine's compressor."""
        zrate = _zstd_rate(sample) if sample else 0.0
        on = policy.auto_wants_zstd(self.peer_is_loopback, link_rate, zrate)
        where = "loopback" if self.peer_is_loopback else f"link {link_rate / 1e9:.3f} GB/s vs zstd {zrate / 1e9:.2f} GB/s"
        self.compression = f"auto: {'zstd' if on else 'none'} ({where})"
        if on and self._stream is not None:
            self._stream.set_codec(pb.CODEC_ZSTD)

    def stop(self) -> None:
        self._stopping = True
        self._stop_evt.set()
        if self._stream is not None:
            self._stream.close()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
