"""Serving pages in a worker process: the urgent worker's Demand streams and a
lane worker's bulk Streams, from the paused guest's RAM and the shared maps.

Fences (the session's epoch rules, per process):

* every request names its epoch, checked against the shared EPOCH word and
  this worker's set of ended epochs before it is served;
* a batch read from RAM is checked again before it is sent.  The session ends
  an epoch by clearing EPOCH and telling every worker (``end_epoch``), and
  resumes the guest only once every worker has acknowledged; a worker marks
  the epoch ended under its lock before acknowledging, so a batch that passes
  the second check (under the same lock) was read while the guest was paused;
* ending an epoch cancels its open streams at once.

Bounds: at most ``MAX_STREAMS[kind]`` streams per epoch in this worker.
Lock order: ``PageServer._lock`` only; never held while reading RAM or
sending.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import zstandard

from migrator import policy
from migrator.pagemaps import FLIP01, or_bytes
from migrator.shm import Shared
from migrator.source import shared as sh
from migrator.source.batches import BatchBuilder, PageReader
from migrator.source.guard import decompress_map
from migrator.source.ownership import ENDED_TEXT, Refused
from migrator.wire import migration_pb2 as pb

MAX_DEMAND_PAGES = 256
MAX_BATCH_PAGES = 1024
# a bulk batch covers at most this many pages (its flags, one byte each), whatever it sends of them
MAX_SPAN = 16384
DEFAULT_BATCH_PAGES = 512
# open streams of one migration per worker, per kind: a destination uses one
# demand stream and one stream per lane (more only while a reconnection tears
# the old ones down)
MAX_STREAMS = {"demand": 4, "bulk": 8}
MAP_WAIT_S = 60.0


def lane_range(lane: int, lanes: int, npages: int) -> tuple[int, int]:
    """The pages [start, end) lane ``lane`` of ``lanes`` serves."""
    return lane * npages // lanes, (lane + 1) * npages // lanes


class PageServer:
    def __init__(self, shared: Shared, reader: PageReader, npages: int, counters: sh.Counters) -> None:
        self.sh = shared
        self.reader = reader
        self.npages = npages
        self.c = counters
        self.untouched = shared.regions["untouched"]
        self.need = shared.regions["need"]
        self.sent = shared.regions["sent"]
        self._lock = threading.Lock()
        self._ended: dict[int, str] = {}  # epoch -> why
        self._streams: dict[int, dict[int, tuple[str, Callable[[], object]]]] = {}
        self._ids = iter(range(1, 1 << 62))
        self._ready = threading.Condition(self._lock)
        self._ready_epoch = 0

    # -- the session's commands --------------------------------------------------------
    def end_epoch(self, epoch: int, why: str) -> None:
        with self._lock:
            self._ended[epoch] = why
            cancels = [c for _k, c in self._streams.pop(epoch, {}).values()]
            self._ready.notify_all()
        for cancel in cancels:
            cancel()

    def map_ready(self, epoch: int) -> None:
        with self._lock:
            self._ready_epoch = epoch
            self._ready.notify_all()

    # -- checks --------------------------------------------------------------------------
    def _check_locked(self, epoch: int) -> None:
        why = self._ended.get(epoch)
        if why is None and epoch and epoch == self.sh.words[sh.ENDED_EPOCH]:
            why = sh.WHY[self.sh.words[sh.ENDED_WHY]]  # the session's "end" is on its way
        if why is not None:
            raise Refused("FAILED_PRECONDITION", f"migration {epoch:016x} ended: {ENDED_TEXT[why]}", ended=why)
        current = self.sh.words[sh.EPOCH]
        if not epoch or epoch != current:
            what = "no migration in progress" if not current else f"not the migration in progress (epoch {epoch:016x})"
            raise Refused("FAILED_PRECONDITION", what)

    def check(self, epoch: int) -> None:
        with self._lock:
            self._check_locked(epoch)

    def _register(self, epoch: int, kind: str, cancel: Callable[[], object]) -> int:
        with self._lock:
            self._check_locked(epoch)
            streams = self._streams.setdefault(epoch, {})
            if sum(k == kind for k, _ in streams.values()) >= MAX_STREAMS[kind]:
                self.c.add("rejected", 1)
                raise Refused("RESOURCE_EXHAUSTED", f"{MAX_STREAMS[kind]} {kind} streams already open for this migration")
            sid = next(self._ids)
            streams[sid] = (kind, cancel)
            self.c.add("open_streams", 1)
            return sid

    def _unregister(self, epoch: int, sid: int) -> None:
        with self._lock:
            self._streams.get(epoch, {}).pop(sid, None)
            self.c.add("open_streams", -1)

    # -- urgent: Demand ----------------------------------------------------------------------
    def demand(self, requests: Iterator[pb.DemandRequest], cancel: Callable[[], object]) -> Iterator[bytes]:
        builder = BatchBuilder(self.reader, self.untouched, MAX_DEMAND_PAGES)
        sid = epoch = 0
        try:
            for req in requests:
                if not sid:
                    epoch, sid = req.epoch, self._register(req.epoch, "demand", cancel)
                elif req.epoch != epoch:
                    raise Refused("INVALID_ARGUMENT", "a stream serves one migration")
                else:
                    self.check(epoch)
                if req.request_id == 0 and req.count == 0:
                    continue  # the stream's opening message: binds it to the migration, asks nothing
                first, count = req.first_page, req.count
                if req.discarded:  # the guest gave these pages up there: no stream sends them
                    if count == 0 or first >= self.npages or first + count > self.npages:
                        self.c.add("rejected", 1)
                        raise Refused("OUT_OF_RANGE", f"discarded pages {first}+{count} outside guest RAM")
                    self.need[first : first + count] = b"\x01" * count
                    self.c.add("discarded_pages", count)
                    continue
                if count == 0 or count > MAX_DEMAND_PAGES:
                    self.c.add("rejected", 1)
                    raise Refused("INVALID_ARGUMENT", f"demand count {count} not in 1..{MAX_DEMAND_PAGES}")
                if first >= self.npages or first + count > self.npages:
                    self.c.add("rejected", 1)
                    raise Refused("OUT_OF_RANGE", f"pages {first}+{count} outside guest RAM of {self.npages} pages")
                sl = slice(first, first + count)
                self.c.add("resent_pages", bytes(self.sent[sl]).count(1))
                self.sent[sl] = b"\x01" * count
                self.need[sl] = b"\x01" * count
                built = builder.build(first, count, None, pb.CODEC_NONE, request_id=req.request_id, epoch=epoch)
                self.check(epoch)  # read while paused: still this epoch after the read
                self.c.add("demand_requests", 1)
                self.c.add("demand_pages", count)
                self.c.add("bytes_sent", built.wire_data)
                yield built.message
        finally:
            if sid:
                self._unregister(epoch, sid)

    # -- a bulk lane: Stream -----------------------------------------------------------------
    def stream(self, controls: Iterator[pb.StreamControl], cancel: Callable[[], object]) -> Iterator[bytes]:
        first_ctl = next(controls, None)
        if first_ctl is None:
            return
        epoch = first_ctl.epoch
        sid = self._register(epoch, "bulk", cancel)
        try:
            yield from self._stream(first_ctl, controls, epoch)
        finally:
            self._unregister(epoch, sid)

    def _stream(self, ctl0: pb.StreamControl, controls: Iterator[pb.StreamControl], epoch: int) -> Iterator[bytes]:
        if ctl0.lanes == 0 or ctl0.lane >= ctl0.lanes or ctl0.lanes > 64:
            raise Refused("INVALID_ARGUMENT", f"lane {ctl0.lane} of {ctl0.lanes} (1 to 64 lanes)")
        start, end = lane_range(ctl0.lane, ctl0.lanes, self.npages)
        batch_pages = ctl0.batch_pages or DEFAULT_BATCH_PAGES
        if batch_pages > MAX_BATCH_PAGES:
            raise Refused("INVALID_ARGUMENT", f"batch of {batch_pages} pages > {MAX_BATCH_PAGES}")
        state = {"codec": pb.CODEC_NONE, "pos": start}

        def apply(ctl: pb.StreamControl) -> None:
            if ctl.epoch != epoch:
                raise Refused("INVALID_ARGUMENT", "a stream serves one migration")
            if ctl.HasField("codec"):
                if ctl.codec not in (pb.CODEC_NONE, pb.CODEC_ZSTD):
                    raise Refused("INVALID_ARGUMENT", f"unknown codec {ctl.codec}")
                state["codec"] = ctl.codec
            if ctl.HasField("seek_page"):
                if ctl.seek_page >= self.npages:
                    raise Refused("OUT_OF_RANGE", f"seek to page {ctl.seek_page} of {self.npages}")
                if start <= ctl.seek_page < end:  # a hint: outside this lane it means nothing here
                    state["pos"] = ctl.seek_page

        apply(ctl0)
        self._wait_map(epoch)
        precopy = ctl0.precopy
        if ctl0.missing_map_zstd and not precopy:
            self._resume_from(ctl0.missing_map_zstd, start, end)
        bad: list[BaseException] = []

        def follow() -> None:
            try:
                for ctl in controls:
                    apply(ctl)
            except Refused as exc:
                bad.append(exc)
            except Exception:  # noqa: BLE001 - the stream ended (RpcError); the generator sees it too
                pass

        threading.Thread(target=follow, name="bulk-control", daemon=True).start()
        builder = BatchBuilder(self.reader, self.untouched, batch_pages, running=precopy, max_span=MAX_SPAN)
        first_lane = ctl0.lane == 0 and not precopy
        zero_map = zstandard.ZstdCompressor(level=3).compress(bytes(self.untouched)) if first_lane else b""
        need = self.need
        hot = None if precopy or not self.sh.words[sh.HOT] else self.sh.regions["hot"]  # a lane clears its share
        while True:
            if bad:
                raise bad[0]
            self.check(epoch)
            if precopy and self.sh.words[sh.PRE_DONE] == epoch:
                break  # done: every batch claimed so far is sent; `last` tells the destination
            p = -1
            if hot is not None:  # hot-first: the pages written just before the pause, then the rest
                p = self._find("hot", b"\x01", start, start, end)
                if p < 0:
                    hot = None
            if p < 0:
                p = self._find("need", b"\x00", state["pos"], start, end)
            if p < 0 and precopy:
                time.sleep(0.005)  # this round is sent: wait for the next (or the pre-copy's end)
                continue
            if p < 0:
                break
            stop, include = self._window(p, end, batch_pages, hot)
            if hot is not None:
                hot[p:stop] = bytes(stop - p)
                if not include.count(1):  # all sent already (on demand)
                    continue
            # claimed before the read (pre-copy: see shared.py); only the bytes of pages it
            # takes: a whole-slice write could undo a 0 the session just set (a page re-dirtied)
            for a, k in policy.runs_of(include, 1, max_run=batch_pages):
                need[p + a : p + a + k] = b"\x01" * k
            self.sent[p:stop] = or_bytes(include, self.sent[p:stop])  # bulk only takes pages never sent
            state["pos"] = stop
            built = builder.build(p, stop - p, include, state["codec"], epoch=epoch, zero_map_zstd=zero_map,
                                  round_=self.sh.words[sh.ROUND] if precopy else 0)  # fmt: skip
            zero_map = b""
            self.check(epoch)  # read while paused: still this epoch after the read
            self.c.add("bulk_pages", built.data_pages + built.zero_pages)
            self.c.add("bytes_sent", built.wire_data)
            yield built.message
        last = pb.PageBatch(epoch=epoch, last=True, sent_unix_ns=time.time_ns(), zero_map_zstd=zero_map)
        yield last.SerializeToString()

    def _window(self, p: int, end: int, batch_pages: int, hot: memoryview | None) -> tuple[int, bytes]:
        """The next batch from page ``p``: (its end, one include byte per page).  It holds
        up to ``batch_pages`` pages to send (those still needed, and hot if ``hot``) and
        spans at most ``MAX_SPAN`` pages: scattered pages (hot ones, stale ones after a
        pre-copy) share a batch instead of making one each."""
        stop = min(p + batch_pages, end)
        include = bytes(self.need[p:stop]).translate(FLIP01)
        if hot is None and include.count(1) == stop - p:
            return stop, include  # dense: the common case, as before
        stop = min(p + MAX_SPAN, end)
        include = bytes(self.need[p:stop]).translate(FLIP01)
        if hot is not None:
            include = (int.from_bytes(include, "little") & int.from_bytes(hot[p:stop], "little")).to_bytes(stop - p, "little")
        if include.count(1) > batch_pages:  # end the batch just after its batch_pages-th page
            k = -1
            for _ in range(batch_pages):
                k = include.find(1, k + 1)
            stop, include = p + k + 1, include[: k + 1]
        return stop, include

    def _find(self, region: str, value: bytes, pos: int, start: int, end: int) -> int:
        """First page from ``pos`` (then from ``start``) to ``end`` whose byte in the
        shared map ``region`` is ``value``, or -1 (at C speed)."""
        off = self.sh.offsets[region]
        p = self.sh.map.find(value, off + pos, off + end)
        if p < 0 and pos > start:
            p = self.sh.map.find(value, off + start, off + end)
        return p - off if p >= 0 else -1

    def _wait_map(self, epoch: int) -> None:
        deadline = time.monotonic() + MAP_WAIT_S
        with self._lock:
            while self._ready_epoch != epoch:
                self._check_locked(epoch)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Refused("UNAVAILABLE", "the guest's page map is not ready")
                self._ready.wait(min(left, 0.5))

    def _resume_from(self, missing_zstd: bytes, start: int, end: int) -> None:
        """A reconnected destination says which pages it still lacks: this lane sends them again."""
        missing = decompress_map(missing_zstd, self.npages, "missing map")
        # need 0 (send it) = missing and touched: not (missing and not untouched)
        part = or_bytes(missing[start:end].translate(FLIP01), self.untouched[start:end])
        self.need[start:end] = part
