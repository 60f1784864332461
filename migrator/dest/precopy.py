"""Pre-copy on the destination: pages of a running source guest, before the switch.

Design (the simplest correct one we found; QEMU's, minus its RAM copy):

* the incoming guest is registered (MISSING) and paused; it has not run and
  will not run before the switch-over, so nothing here races a vCPU;
* a lane's pre-copy stream carries rounds of pages; a page not present yet is
  installed with ``UFFDIO_COPY``/``ZEROPAGE`` (the installer, marking it
  PRESENT); a page already installed by an earlier round is *overwritten in
  place* through ``/proc/PID/mem`` (``UFFDIO_COPY`` never replaces a page).
  No staging buffer: the guest's RAM is the buffer;
* a done pre-copy's streams end with a ``last`` batch: the source claims no
  page after it is done, so every page it counts as sent is installed here
  before the handshake (a lane that does not see ``last`` is "unclean": all
  its pages count as stale);
* at the handshake the source's stale map names every page written after it
  was last sent (or never sent); :func:`discard_runs` picks those that are
  PRESENT here, the session marks them MISSING and the guest drops them
  (MADV_DONTNEED, in its ``resume``, before any vCPU runs): they fault and
  arrive again after the switch (QEMU's discard list).  The lanes then ask
  for every page not present (their missing map), which covers batches that
  were in flight when the pre-copy stopped.

So after the switch every page is installed exactly once (the post-copy
machinery, unchanged), and no page the guest wrote since it was sent is
left stale: the source's last scan is made with its guest paused.

Pre-copy installs are counted in their own counter slot (``slot``), outside
the post-copy totals the session watches.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from migrator import policy
from migrator.config import DestConfig
from migrator.dest.install import Decoded, Installer
from migrator.dest.pagestate import DROPPING, PRESENT, PageState
from migrator.dest.source_client import BulkStream, PageSource
from migrator.errors import GuestError, MigrationEnded, MigratorError, ProtocolError, SourceFailed
from migrator.pagemaps import FLAG_DATA, FLAG_OMITTED, decompress_map
from migrator.source.serving import lane_range
from migrator.wire import migration_pb2 as pb
from migrator.workers import set_thread_name

if TYPE_CHECKING:
    from migrator.dest.crew import Crew
    from migrator.guest import GuestProcess

log = logging.getLogger("migrator.dest")

FINISH_S = 30.0  # a done pre-copy's streams end within this (the source sends `last`)
_PRESENT_ONLY = bytes(1 if b == PRESENT else 0 for b in range(256))


class PrecopyReceiver:
    """One lane's pre-copy stream (a thread), into the paused incoming guest."""

    def __init__(self, installer: Installer, ps: PageState, source: PageSource, lane: int, lanes: int,
                 start_page: int, batch_pages: int, guest_pid: int, event: Callable[..., None]) -> None:  # fmt: skip
        self.inst, self.ps, self.source = installer, ps, source
        self.lane, self.lanes, self.start_page, self.batch_pages = lane, lanes, start_page, batch_pages
        self.event = event
        self.psize = installer.psize
        try:
            self._mem = os.open(f"/proc/{guest_pid}/mem", os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise GuestError(f"cannot open the incoming guest's memory: {exc.strerror}", pid=guest_pid) from exc
        self.installed = self.rewritten = self.batches = self.wire_bytes = 0
        self.rounds = 0
        self.finished = False
        self._stream: BulkStream | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self, epoch: int) -> None:
        self._thread = threading.Thread(target=self._run, args=(epoch,), name=f"lane{self.lane}-pre", daemon=True)
        self._thread.start()

    def _run(self, epoch: int) -> None:
        set_thread_name(f"lane{self.lane}-pre")
        try:
            self._stream = self.source.open_bulk(epoch, self.lane, self.lanes, pb.CODEC_NONE, self.batch_pages,
                                                 self.start_page, precopy=True)  # fmt: skip
            for raw in self._stream.responses():
                if self._stopping:
                    return
                d = self.inst.decode(raw, epoch)
                if d.batch.last:
                    self.finished = True  # every batch the source claimed is installed
                    return
                self.apply(d)
        except MigratorError as exc:
            # not fatal: whatever did not arrive comes after the switch-over
            if not self._stopping:
                self.event("precopy-lost", lane=self.lane, error=str(exc))

    def apply(self, d: Decoded) -> None:
        """Install a validated pre-copy batch: new pages by UFFDIO_COPY, pages an
        earlier round installed overwritten in place."""
        b = d.batch
        first, n = b.first_page, b.count
        present = bytes(self.ps.state[first : first + n]).translate(_PRESENT_ONLY)
        if present.count(1):
            self._rewrite(d, present)
        self.installed += self.inst.install(d, "precopy")  # skips the present ones
        self.batches += 1
        self.wire_bytes += len(b.data)
        self.rounds = max(self.rounds, b.round)

    def _rewrite(self, d: Decoded, present: bytes) -> None:
        b, ps = d.batch, self.psize
        flags = b.flags
        data = b.data if b.codec == pb.CODEC_NONE else memoryview(d.data)
        zero = bytes(ps)
        base = self.inst.base
        di = 0  # index among the batch's data pages
        for i in range(b.count):
            f = flags[i]
            if f == FLAG_OMITTED:
                continue
            if present[i]:
                page = data[di * ps : (di + 1) * ps] if f == FLAG_DATA else zero
                if os.pwrite(self._mem, page, base + (b.first_page + i) * ps) != ps:
                    raise GuestError("short write to the incoming guest's memory", page=b.first_page + i)
                self.rewritten += 1
            if f == FLAG_DATA:
                di += 1

    def stop(self, timeout: float = FINISH_S) -> dict[str, Any]:
        """Wait for the source's ``last`` batch (it ends a done pre-copy's streams), then
        stop.  ``clean`` False: it did not come, so batches the source counts as sent
        may be lost here; the session then treats this lane's pages as stale.
        Returns this lane's pre-copy counts."""
        if self._thread is not None:
            self._thread.join(timeout)
        self._stopping = True
        if self._stream is not None:
            self._stream.close()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout=10)
        os.close(self._mem)
        return {"installed": self.installed, "rewritten": self.rewritten, "batches": self.batches,
                "wire_bytes": self.wire_bytes, "rounds": self.rounds, "clean": self.finished}  # fmt: skip


def discard_runs(ps: PageState, stale: bytes) -> list[tuple[int, int]]:
    """The runs [first, count] of pages that are PRESENT here and stale at the source;
    marks them DROPPING: the guest must drop them before it runs, and the fault
    process, reading the EVENT_REMOVE of that drop, makes them MISSING (not
    DISCARDED: they come again from the source).  ``stale``: one 0/1 byte per page."""
    state = bytes(ps.state)
    both_int = int.from_bytes(state.translate(_PRESENT_ONLY), "little") & int.from_bytes(stale, "little")
    # PRESENT (3) -> DROPPING (2) where both: one byte-wise AND (no carries: 0/1 masks); nothing
    # else writes the state before the guest runs
    assert DROPPING == 2 and PRESENT == 3
    ps.state[:] = (int.from_bytes(state, "little") & ~both_int).to_bytes(len(state), "little")
    return list(policy.runs_of(both_int.to_bytes(len(stale), "little"), 1, max_run=1 << 30))


class PrecopyPhase:
    """The session's step 2b (``session.py``): the source's pre-copy, or only its
    hot-page tracking, until it says "switch now"; then, at the switch, which
    pages installed here must go.  A source that cannot pre-copy is said once
    (``say``) and the migration goes on as pure post-copy.

    After :meth:`at_switch`: ``base_present`` pages installed by the pre-copy are
    still valid (the post-copy installs the others), and ``resync`` says that the
    lanes must tell the source what is missing here (its map of what it sent is
    not ours).
    """

    def __init__(self, cfg: DestConfig, control: Any, token: bytes, say: Callable[[str], None],
                 check: Callable[[], None]) -> None:  # fmt: skip
        self.cfg, self.control, self.token, self.say, self.check = cfg, control, token, say, check
        self.track_only = not (cfg.precopy or cfg.precopy_auto)
        self.wanted = bool(cfg.precopy or cfg.precopy_auto or cfg.hot_first)
        self.base_present = 0
        self.resync = False
        self.done: dict[str, Any] = {}  # what run() did
        self._tracking: Iterator[pb.PrecopyProgress] | None = None

    def track_early(self) -> None:
        """``--hot-first`` without pre-copy: start the source's tracking now, so that its
        second of learning overlaps this side's start (the guest, the workers); the
        progress is read on a thread and replayed by :meth:`run`."""
        precopy = getattr(self.control, "precopy", None)
        if not (self.wanted and self.track_only) or precopy is None:
            return
        q: queue.SimpleQueue[pb.PrecopyProgress | BaseException | None] = queue.SimpleQueue()

        def read() -> None:
            try:
                for p in precopy(self.token, seconds=0.0, auto=False, track_only=True, hot_first=True):
                    q.put(p)
                    if p.done:
                        break
                q.put(None)
            except BaseException as exc:  # noqa: BLE001 - replayed on the session's thread
                q.put(exc)

        threading.Thread(target=read, name="track", daemon=True).start()

        def replay() -> Iterator[pb.PrecopyProgress]:
            while (item := q.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item

        self._tracking = replay()

    def run(self, crew: Crew, ps: PageState, guest: GuestProcess) -> dict[str, Any]:
        """Until the source says "switch now"; the lanes install its rounds.  Returns
        what it did (the summary's ``precopy``; empty: nothing)."""
        cfg, track_only = self.cfg, self.track_only
        precopy = getattr(self.control, "precopy", None)
        if not self.wanted:
            return {}
        if precopy is None:
            self.say("this source cannot pre-copy (a local image): pure post-copy")
            return {}
        t0 = time.monotonic()
        out: dict[str, Any] = {"mode": "hot-first tracking" if track_only else "pre-copy", "rounds": 0}
        started = False
        early_stale = b""
        try:
            progress = self._tracking or precopy(self.token, seconds=cfg.precopy, auto=cfg.precopy_auto,
                                                 track_only=track_only, hot_first=cfg.hot_first)  # fmt: skip
            for p in progress:
                if not started:  # round 0: the pre-copy's epoch, for the lanes
                    started = True
                    if not track_only:
                        crew.start_precopy(p.epoch, guest.hello.pid)
                    continue
                self.check()
                if p.round_pages:
                    out["rounds"] = p.round
                    log.info("pre-copy round %d: %d pages in %.0f ms, %d written meanwhile", p.round, p.round_pages,
                             p.round_s * 1e3, p.dirty_pages)  # fmt: skip
                if p.done:
                    out.update(why=p.why, source_sent=p.sent_pages, last_dirty=p.dirty_pages)
                    early_stale = p.stale_map_zstd
                    break
        except (MigrationEnded, ProtocolError, SourceFailed) as exc:
            if started and not track_only:
                crew.stop_precopy()
            self.say(f"the source cannot pre-copy ({exc}): pure post-copy")
            return {}
        if not track_only:
            out.update(crew.stop_precopy())
            if early_stale and not out["unclean"]:
                # what went stale before "done" is dropped now, outside the downtime: the
                # switch drops only what the guest writes after
                runs = discard_runs(ps, stale_map(early_stale, ps.npages))
                if runs:
                    guest.call("drop", timeout=60, runs=runs)
                out["discarded_early"] = sum(n for _, n in runs)
        out["seconds"] = time.monotonic() - t0
        self.done = out
        return out

    def at_switch(self, manifest: pb.Manifest, ps: PageState, lanes: int) -> list[tuple[int, int]]:
        """After the handshake: the pages installed here that the guest wrote on the
        source since, marked missing again; returns their runs, for the guest to drop
        (in its resume)."""
        pre = self.done
        # after a pre-copy the source's map of what it sent is not ours: the lanes say what is missing
        self.resync = bool(manifest.stale_map_zstd or pre.get("installed"))
        if not manifest.stale_map_zstd:
            if not pre.get("installed"):
                return []
            # the source ended its pre-copy before our handshake (we were too slow): it
            # knows nothing of what we have, so nothing pre-copied is trusted
            stale = b"\x01" * ps.npages
            pre["why"] = f"{pre.get('why', '')}; the source forgot it: every pre-copied page dropped"
        else:
            stale = stale_map(manifest.stale_map_zstd, ps.npages)
        unclean = pre.get("unclean") or []
        if unclean:  # batches of these lanes may be lost: none of their pages is trusted
            st = bytearray(stale)
            for i in unclean:
                a, b = lane_range(i, lanes, ps.npages)
                st[a:b] = b"\x01" * (b - a)
            stale = bytes(st)
        runs = discard_runs(ps, stale)
        pre["discarded"] = sum(n for _, n in runs)
        self.base_present = bytes(ps.state).count(PRESENT)
        pre["present_at_switch"] = self.base_present
        return runs


def stale_map(stale_zstd: bytes, npages: int) -> bytes:
    """A peer's zstd stale map, checked: one 0/1 byte per page; raises ProtocolError."""
    try:
        return decompress_map(stale_zstd, npages, "stale map")
    except ValueError as exc:
        raise ProtocolError(str(exc)) from None
