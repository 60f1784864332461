"""Pre-copy and hot pages, on the source: the running guest's writes, tracked.

One :class:`Precopy` per Precopy call, in the session process (it owns the
guest's control channel and, from ``start``, its dirty tracker:
``migrator/uffd/dirty.py``).  The lanes do the sending (``serving.py``, a
Stream with ``precopy`` set): they send every page whose ``need`` byte is 0
and set it to 1 *before* reading the page.  This driver thread:

1. before tracking, reads which pages were never touched (pagemap: once the
   tracker protects them, holes look like swap entries), starts the tracker,
   and drops from that map the pages populated in between;
2. round 1 is every page (``need`` all 0); when no page is left to send, it
   scans: every page written since the last scan gets ``need`` 0 again (so
   ``need`` 0 = "the destination's copy is stale"), the round's numbers go to
   the destination, and ``policy.precopy_done`` decides whether to go on;
3. once done, it keeps scanning every ``SCAN_S`` (marking stale pages, and
   remembering which were written when: the hot pages) until the handshake
   calls :meth:`Precopy.freeze`, which, with the guest paused, scans a last
   time; the tracker is closed when that migration's epoch ends
   (:meth:`Precopy.release`: closing costs ~25 ms of kernel time per GiB, which
   the downtime should not pay).

Why this is never stale: a page's content on the destination is at least as
new as its last read by a lane; that read came after ``need`` was set to 1,
and any write completed after the scan that preceded it is in a later scan,
which sets ``need`` to 0 again.  At the pause the last scan makes the set
exact: after it, ``need`` 0 is every page whose newest content the
destination may lack (the manifest's stale map).

Hot pages (``hot_first``): the pages written during the last ``HOT_WINDOW_S``
before the pause (the union of the recent scans and the last one), which the
lanes send first after the switch.  ``track_only`` tracks without sending:
pure post-copy, hot-first.

Lock order: ``Precopy._lock`` only, never held while scanning or talking to
the guest; the session's lock is never taken here.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass

from migrator import policy
from migrator.guest import GuestProcess
from migrator.pagemaps import FLIP01
from migrator.shm import Shared
from migrator.source import shared as sh
from migrator.source.ram_reader import RamReader
from migrator.uffd import abi
from migrator.uffd.dirty import DirtyTracker

log = logging.getLogger("migrator.source")

SCAN_S = 0.1  # after the rounds (and track-only): how often the hot/stale maps are refreshed
MIN_ROUND_S = 0.02  # a round is at least this long (a tiny dirty set would spin otherwise)
HOT_WINDOW_S = 1.0  # "hot": written during this long before the pause
TRACK_ONLY_S = 1.0  # track-only: learn the hot pages this long, then say done


@dataclass(frozen=True)
class Request:
    seconds: float = 0.0
    auto: bool = False
    track_only: bool = False
    hot_first: bool = False


@dataclass
class Progress:
    """One message for the destination (``PrecopyProgress``)."""

    round: int
    round_pages: int
    dirty_pages: int
    sent_pages: int
    round_s: float
    done: bool = False
    why: str = ""
    stale: bytes = b""  # with done: the stale map then (1 = stale)


class Precopy:
    def __init__(self, guest: GuestProcess, reader: RamReader, shared: Shared, epoch: int, req: Request) -> None:
        h = guest.hello
        self.guest, self.reader, self.sh, self.epoch, self.req = guest, reader, shared, epoch, req
        self.npages = h.size // h.page_size
        self.progress: queue.SimpleQueue[Progress | None] = queue.SimpleQueue()  # None: the end
        self.rounds: list[tuple[int, int, float]] = []
        self.sent_pages = 0
        self._tracker: DirtyTracker | None = None
        self._frozen: DirtyTracker | None = None  # after the pause: closed by release()
        self._recent: deque[tuple[float, int]] = deque()  # (monotonic, pages written by that scan, as an int)
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the tracker: one scan at a time, and none after freeze
        self._thread: threading.Thread | None = None
        self.done_why = ""
        self._broken = False  # a scan failed: what changed is unknown

    # -- start -------------------------------------------------------------------------
    def start(self) -> None:
        """Track the guest's writes and set the maps for round 1 (raises
        UnsupportedHost without WP_ASYNC, GuestError if the guest cannot help)."""
        h = self.guest.hello
        untouched = self.reader.untouched_map()  # before the tracker's markers hide the holes
        _reply, fd = self.guest.call_fd("track", timeout=10)
        tracker = DirtyTracker(fd, h.pid, h.addr, h.size, h.page_size)
        try:
            tracker.start()
            populated = bytearray(self.npages)
            tracker.scan(populated, protect=False, category=abi.PAGE_IS_PRESENT)
        except BaseException:
            tracker.close()
            raise
        self._tracker = tracker
        m = self.sh.regions
        m["untouched"][:] = policy.and_not(untouched, populated)
        m["sent"][:] = bytes(self.npages)
        m["hot"][:] = bytes(self.npages)
        # track-only: nothing to send before the pause
        m["need"][:] = b"\x01" * self.npages if self.req.track_only else bytes(self.npages)
        w = self.sh.words
        w[sh.ROUND] = 1
        w[sh.HOT] = 0
        w[sh.PRE_DONE] = 0
        w[sh.READY] = self.epoch
        self._thread = threading.Thread(target=self._run, name="precopy", daemon=True)
        self._thread.start()

    # -- rounds ------------------------------------------------------------------------
    def _scan(self) -> bytes | None:
        """Pages written since the last scan, now stale (``need`` 0); None once frozen."""
        dirty = bytearray(self.npages)
        with self._lock:
            if self._tracker is None:
                return None
            try:
                self._tracker.scan(dirty)
            except BaseException:
                # a scan that failed part way may have protected pages it never reported
                self._broken = True
                raise
            d = bytes(dirty)
            m = self.sh.regions
            need, untouched = m["need"], m["untouched"]
            # need 0 (stale) for the written pages; only their bytes are written: the
            # lanes set need to 1 concurrently, and a whole-map write would race them
            for a, k in policy.runs_of(d, 1, max_run=self.npages):
                need[a : a + k] = bytes(k)
                untouched[a : a + k] = bytes(k)
            now = time.monotonic()
            self._recent.append((now, int.from_bytes(d, "little")))  # OR-ed at C speed at the pause
            while self._recent and now - self._recent[0][0] > HOT_WINDOW_S:
                self._recent.popleft()
        return d

    def _stale_map(self) -> bytes:
        """One byte per page, 1 = stale now (need 0); lanes are done claiming when it is asked."""
        return bytes(self.sh.regions["need"]).translate(FLIP01)

    def _stale(self) -> int:
        return bytes(self.sh.regions["need"]).count(0)

    def _run(self) -> None:
        try:
            self._rounds()
            while not self._stop.wait(SCAN_S):  # until the pause: hot pages, stale pages
                if self._scan() is None:
                    return
        except Exception as exc:  # noqa: BLE001 - the destination hears why and may go on without
            log.error("pre-copy: %s", exc)
            if not self.done_why:
                self._finish(f"tracking failed: {exc}")

    def _rounds(self) -> None:
        t0 = time.monotonic()
        if self.req.track_only:
            self._stop.wait(TRACK_ONLY_S)
            self._finish("hot pages known")
            return
        off = self.sh.offsets["need"]
        size = self.npages
        while not self._stop.is_set():
            r0 = time.monotonic()
            while self.sh.map.find(b"\x00", off, off + self.npages) >= 0:  # the lanes send what is stale
                why = policy.precopy_done(self.rounds, time.monotonic() - t0, self.req.seconds, self.req.auto)
                if why or self._stop.wait(0.005):
                    self.sent_pages += size - self._stale()
                    self._finish(why or "stopped")
                    return
            self._stop.wait(max(0.0, MIN_ROUND_S - (time.monotonic() - r0)))
            self.sent_pages += size
            d = self._scan()
            if d is None:
                return
            dirty = d.count(1)
            took = time.monotonic() - r0
            self.rounds.append((size, dirty, took))
            self.sh.words[sh.ROUND] = len(self.rounds) + 1
            why = policy.precopy_done(self.rounds, time.monotonic() - t0, self.req.seconds, self.req.auto)
            if why:
                self.done_why = why
                self.sh.words[sh.PRE_DONE] = self.epoch  # first: the lanes end before the destination asks
            self.progress.put(Progress(len(self.rounds), size, dirty, self.sent_pages, took, done=bool(why), why=why,
                                       stale=self._stale_map() if why else b""))  # fmt: skip
            if why:
                self.progress.put(None)
                return
            size = self._stale()

    def _finish(self, why: str) -> None:
        self.done_why = why
        self.sh.words[sh.PRE_DONE] = self.epoch  # the lanes finish their batch and end
        self.progress.put(Progress(len(self.rounds), 0, self._stale(), self.sent_pages, 0.0, done=True, why=why,
                                   stale=b"" if self.req.track_only else self._stale_map()))  # fmt: skip
        self.progress.put(None)

    # -- the end -------------------------------------------------------------------------
    def freeze(self) -> bytes:
        """The guest is paused: a last scan, then tracking stops.  Returns the stale
        map (one byte per page, 1 = the destination's copy may be stale) and sets
        the hot map if asked for."""
        self._stop.set()
        try:
            self._scan()
        except Exception as exc:  # noqa: BLE001 - reported below
            log.error("pre-copy: the last scan failed: %s", exc)
        if self._broken:  # not knowing what changed: everything is stale
            log.error("pre-copy: a scan failed: every page counts as stale")
            self.sh.regions["need"][:] = bytes(self.npages)
            self.sh.regions["untouched"][:] = bytes(self.npages)  # and none is known to be zero
        with self._lock:
            # kept open: closing it makes the kernel drop the protection of every page
            # (~25 ms per GiB here, and a CPU of this two-core machine): :meth:`release`
            # does it once the epoch ends; the guest is paused, so no scan is needed
            self._frozen, self._tracker = self._tracker, None
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        m = self.sh.regions
        if self.req.track_only:
            m["need"][:] = bytes(m["untouched"])  # pure post-copy: every touched page is still to send
        if self.req.hot_first:
            hot = 0  # the last scan is in _recent too
            for _t, recent in self._recent:
                hot |= recent
            hot &= ~int.from_bytes(m["need"], "little")  # hot and still to send (need 0)
            m["hot"][:] = hot.to_bytes(self.npages, "little")
            self.sh.words[sh.HOT] = 1
        return self._stale_map()

    def release(self) -> None:
        """After the pause's epoch ended (completed, cancelled, rolled back): stop tracking,
        in the background."""
        with self._lock:
            tracker, self._frozen = self._frozen, None
        if tracker is not None:
            threading.Thread(target=tracker.close, name="untrack", daemon=True).start()

    def abort(self) -> None:
        """The pre-copy ends without a pause: tracking stops (the guest runs on here)."""
        self._stop.set()
        with self._lock:
            trackers = [t for t in (self._tracker, self._frozen) if t is not None]
            self._tracker = self._frozen = None
        for t in trackers:
            t.close()
        self.progress.put(None)
