"""A bulk lane process: one stream from the source, installing one share of guest RAM.

Lane i of n owns the pages [i·N/n, (i+1)·N/n) of guest RAM's N pages
(``source/serving.py:lane_range``): its stream brings their data, and it maps
their never-touched pages itself (runs of UFFDIO_ZEROPAGE from the zero map,
interleaved with the batches; lane 0's first batch carries that map for
everyone).  It installs straight from the received message (no copy), one
ioctl per contiguous run; a page another process installed first is settled
by the kernel (EEXIST: see ``pagestate.py``).

Locality: when the fault process leaves a hint (a fault in this lane's share),
the stream is moved to continue just past it (QEMU's spatial hint).

A lost stream is reopened with backoff, with the map of pages still missing,
which the source sends again; the session enforces the deadline.
Run as ``python -m migrator.dest.lane``::

    config  {"lane", "lanes", "npages", "page_size", "base", "batch_pages", "compress",
             "loopback", "source": {"address", "secret", "tls"}, "uffd_fd", "shm_fd", "slot"}
    precopy {"epoch", "guest_pid"}  before the switch: the pre-copy stream (``precopy.py``)
    precopy-stop        end it; answer with its counts
    start   {"epoch", "resync"}  open the stream and install (events: done, lost, back, fatal);
                        resync: ask for every page not present (after a pre-copy)
    stop                answer with the timeline and the compression used
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any

import zstandard

from migrator import policy
from migrator.dest.demand import describe_error
from migrator.dest.gate import Gate
from migrator.dest.install import Installer
from migrator.dest.pagestate import HINTS, ZERO_READY, PageState
from migrator.dest.precopy import PrecopyReceiver
from migrator.dest.local_source import open_page_source
from migrator.dest.source_client import BulkStream
from migrator.errors import AuthError, MigratorError, ProtocolError, TransportError
from migrator.pagemaps import decompress_map
from migrator.source.serving import lane_range
from migrator.uffd.fd import Userfaultfd
from migrator.wire import migration_pb2 as pb
from migrator.workers import WorkerSide, set_thread_name

ZERO_RUNS_PER_BATCH = 16
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 1.0


def _zstd_rate(sample: bytes) -> float:
    """Bytes/s zstd level 1 compresses ``sample`` at, here."""
    cctx = zstandard.ZstdCompressor(level=1)
    t = time.perf_counter()
    cctx.compress(sample)
    return len(sample) / max(time.perf_counter() - t, 1e-9)


class Lane:
    def __init__(self, cfg: dict[str, Any], side: WorkerSide) -> None:
        self.side = side
        self.lane, self.lanes = int(cfg["lane"]), int(cfg["lanes"])
        self.npages, self.psize = int(cfg["npages"]), int(cfg["page_size"])
        self.start_page, self.end_page = lane_range(self.lane, self.lanes, self.npages)
        self.ps = PageState.attach(int(cfg["shm_fd"]), self.npages)
        self.c = self.ps.counters(int(cfg["slot"]))
        gate = Gate(int(cfg["shm_fd"]), self.ps.words)
        self.installer = Installer(Userfaultfd(int(cfg["uffd_fd"])), self.ps, int(cfg["base"]), self.psize, self.c,
                                   gate, int(cfg["slot"]))  # fmt: skip
        self.source = open_page_source(cfg["source"])
        self.batch_pages = int(cfg["batch_pages"])
        self.compress = cfg["compress"]
        self.loopback = bool(cfg["loopback"])
        self.codec = pb.CODEC_ZSTD if policy.initial_codec(self.compress) == "zstd" else pb.CODEC_NONE
        self.compression = policy.initial_codec(self.compress)
        self.epoch = 0
        self.timeline: list[tuple[int, str, int]] = []  # (monotonic ns, "prefetch"|"zero", pages)
        self._stream: BulkStream | None = None
        self._stopping = False
        self._zero_runs: list[tuple[int, int]] | None = None
        self._last_hint = 0
        self._lost = False  # the stream broke and has not delivered since
        self._thread: threading.Thread | None = None
        self.precopy: PrecopyReceiver | None = None
        self._resync = False

    # -- commands ----------------------------------------------------------------------
    def start_precopy(self, epoch: int, guest_pid: int) -> None:
        # pre-copy installs are counted apart (a slot after every lane's): not post-copy pages
        counters = self.ps.counters(1 + self.lanes + self.lane)
        installer = Installer(self.installer.uffd, self.ps, self.installer.base, self.psize, counters)
        self.precopy = PrecopyReceiver(installer, self.ps, self.source, self.lane, self.lanes, self.start_page,
                                       self.batch_pages, guest_pid, self.side.event)  # fmt: skip
        self.precopy.start(epoch)

    def stop_precopy(self) -> dict[str, Any]:
        if self.precopy is None:
            return {}
        out = self.precopy.stop()
        self.precopy = None
        return out

    def start(self, epoch: int, resync: bool = False) -> None:
        self.epoch = epoch
        self._resync = resync
        self._thread = threading.Thread(target=self._run, name=f"lane{self.lane}-rx", daemon=True)
        self._thread.start()

    def stop(self) -> dict[str, Any]:
        self._stopping = True
        if self._stream is not None:
            self._stream.close()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout=5)
        self.source.close()
        return {"timeline": self.timeline, "compression": self.compression}

    # -- the stream ----------------------------------------------------------------------
    def _run(self) -> None:
        set_thread_name(f"lane{self.lane}-rx")
        backoff, missing = BACKOFF_FIRST_S, b""
        if self._resync:  # after a pre-copy: the source sends every page not present here
            missing = zstandard.ZstdCompressor(level=1).compress(self.ps.missing_map())
        while not self._stopping:
            try:
                self._stream = self.source.open_bulk(self.epoch, self.lane, self.lanes, self.codec, self.batch_pages,
                                                     self.start_page, missing)  # fmt: skip
                if self._receive(self._stream):
                    self._finish()
                    return
                if self._stopping:
                    return
                raise TransportError("the source ended the bulk stream early")
            except TransportError as exc:
                if self._stopping:
                    return
                if isinstance(exc, AuthError):
                    self.side.event("fatal", **describe_error(exc))
                    return
                if not self._lost:
                    self.side.event("lost", what=f"lane {self.lane}", error=str(exc))
                    self._lost, backoff = True, BACKOFF_FIRST_S
                else:
                    backoff = min(backoff * 2, BACKOFF_MAX_S)
                missing = zstandard.ZstdCompressor(level=1).compress(self.ps.missing_map())
            except BaseException as exc:  # noqa: BLE001 - the session ends the migration
                if not self._stopping:
                    self.side.event("fatal", **describe_error(exc))
                return

    def _receive(self, stream: BulkStream) -> bool:
        """Install the stream's batches; True once it said it has nothing more."""
        inst, c = self.installer, self.c
        probe_t0, probe_bytes = 0.0, 0
        for raw in stream.responses():
            if self._lost:
                self.side.event("back", what=f"lane {self.lane}")
                self._lost = False
            d = inst.decode(raw, self.epoch)
            b = d.batch
            if b.zero_map_zstd:
                self._take_zero_map(b.zero_map_zstd)
            if b.last:
                return True
            c.add("wire_bytes", len(b.data))
            c.add("raw_bytes", b.raw_size)
            c.add("batches")
            n = inst.install(d, "prefetch")
            self.timeline.append((time.monotonic_ns(), "prefetch", n))
            self._zero_some(ZERO_RUNS_PER_BATCH)
            self._follow_hint(stream)
            if self.compress == "auto" and probe_bytes >= 0:
                if probe_t0 == 0.0:
                    probe_t0 = time.monotonic()  # rate measured from the first batch's arrival
                else:
                    probe_bytes += len(b.data)
                elapsed = time.monotonic() - probe_t0
                if probe_bytes >= policy.AUTO_PROBE_BYTES or (elapsed >= policy.AUTO_PROBE_SECONDS and probe_bytes):
                    self._decide_codec(stream, probe_bytes / elapsed, bytes(b.data[: 1 << 20]))
                    probe_bytes = -1
        return False

    def _finish(self) -> None:
        """The stream is done: map the rest of this share's never-touched pages."""
        deadline = time.monotonic() + 30
        while not self.ps.words[ZERO_READY] and not self._stopping:
            if time.monotonic() > deadline:
                raise ProtocolError("no zero map arrived (lane 0's first batch carries it)")
            time.sleep(0.005)
        self._zero_some(-1)
        self.side.event("done", lane=self.lane)

    def _take_zero_map(self, zstd_map: bytes) -> None:
        """The source's map of never-touched pages (lane 0's first batch): validate, share."""
        try:
            zero_map = decompress_map(zstd_map, self.npages, "zero map")
        except ValueError as exc:
            raise ProtocolError(str(exc)) from None
        self.ps.zero[:] = zero_map
        self.ps.words[ZERO_READY] = 1

    def _zero_some(self, limit: int) -> None:
        """Map up to ``limit`` runs of this share's never-touched pages (all if < 0)."""
        if self._zero_runs is None:
            if not self.ps.words[ZERO_READY]:
                return
            share = bytes(self.ps.zero[self.start_page : self.end_page])
            self._zero_runs = [(self.start_page + i, n) for i, n in policy.runs_of(share, 1, max_run=4096)]
            self._zero_runs.reverse()  # pop() from the end: lowest pages first
        runs = self._zero_runs
        while runs and limit != 0 and not self._stopping:
            first, count = runs.pop()
            n = self.installer.install_zero_range(first, count)
            self.timeline.append((time.monotonic_ns(), "zero", n))
            limit -= 1

    def _follow_hint(self, stream: BulkStream) -> None:
        hint = self.ps.words[HINTS + self.lane]
        if hint and hint != self._last_hint:
            self._last_hint = hint
            stream.seek(hint - 1)

    def _decide_codec(self, stream: BulkStream, link_rate: float, sample: bytes) -> None:
        """compress=auto: compare the measured link with this machine's compressor."""
        zrate = _zstd_rate(sample) if sample else 0.0
        on = policy.auto_wants_zstd(self.loopback, link_rate, zrate)
        where = "loopback" if self.loopback else f"link {link_rate / 1e9:.3f} GB/s vs zstd {zrate / 1e9:.2f} GB/s"
        self.compression = f"auto: {'zstd' if on else 'none'} ({where})"
        if on:
            stream.set_codec(pb.CODEC_ZSTD)


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    side = WorkerSide()
    try:
        lane = Lane(side.config, side)
    except MigratorError as exc:
        side.event("fatal", **describe_error(exc))
        return 4
    try:
        lane.source.ready(timeout=float(side.config.get("connect_timeout", 10)))
    except MigratorError as exc:
        side.event("fatal", **describe_error(exc))
        return 4
    side.event("ready")

    def start(msg: dict[str, Any]) -> None:
        lane.start(int(msg["epoch"]), bool(msg.get("resync")))

    def precopy(msg: dict[str, Any]) -> None:
        lane.start_precopy(int(msg["epoch"]), int(msg["guest_pid"]))

    def precopy_stop(_msg: dict[str, Any]) -> dict[str, Any]:
        return lane.stop_precopy()

    side.serve({"start": start, "precopy": precopy, "precopy-stop": precopy_stop}, on_stop=lane.stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
