"""What the source's session shares with its urgent and lane workers.

Header words, each with one writer:

=========  ==========  ==================================================
word       writer      meaning
=========  ==========  ==================================================
0 EPOCH    session     the migration served now; 0 = none.  Written after
                       the maps are reset and before the handshake's reply;
                       cleared when the epoch ends, before any worker is
                       told (and long before the guest resumes).
1 READY    session     == EPOCH once ``untouched`` is valid for it
2, 3       session     the last epoch that ended, and why (an index in WHY);
                       written before EPOCH is cleared
4 HOT      session     1 = after the switch, lanes send the ``hot`` pages
                       of their share first (hot-first)
5 ROUND    session     the pre-copy round being sent (batches carry it)
6 PRE_DONE session     == the pre-copy's epoch once it is done: its lanes
                       claim nothing more, finish their batch and end
                       their stream with a ``last`` batch, so that every
                       page they claimed reaches the destination
16 + 8k    worker k    its counters (``COUNTERS``, 8 words; the last is a
                       gauge of its open streams)
=========  ==========  ==================================================

Maps, one byte per page:

* ``untouched`` (session): 1 = never touched on the source, so zero: sent as
  a flag, never read;
* ``need`` (workers): 0 = the bulk still has to send it.  The urgent worker
  sets it for every page it sends, a lane for every page it sends: two
  writers of the same value, and a stale 0 read by a lane only costs a
  duplicate (counted, dropped by the destination);
* ``sent`` (workers): 1 = sent at least once (to count duplicates);
* ``hot`` (session; a lane clears what it sent): 1 = written by the guest
  shortly before the pause (``precopy.py``).

During a pre-copy (EPOCH = the pre-copy's epoch) ``need`` 0 also means "the
destination's copy is stale": the session sets it back to 0 for every page
the guest wrote since its last scan, and a lane sets it to 1 *before* it reads
the page, so a write after the read's scan is always caught by the next one.
"""

from __future__ import annotations

from migrator.shm import Shared

EPOCH, READY, ENDED_EPOCH, ENDED_WHY, HOT, ROUND, PRE_DONE = 0, 1, 2, 3, 4, 5, 6
# ENDED_WHY: an index into this (ownership.py's reasons), so that a worker can say why
# an epoch ended even before the session's "end" command has reached it
WHY = ("cancelled", "timed-out", "rolled-back", "rolled-back-forced", "completed", "pause-failed", "source-failed",
       "precopy-ended")  # fmt: skip
FIRST_SLOT, SLOT_WORDS, MAX_WORKERS = 16, 8, 32  # SLOT_WORDS >= len(COUNTERS)
COUNTERS = ("demand_requests", "demand_pages", "bulk_pages", "resent_pages", "bytes_sent", "rejected", "discarded_pages",
            "open_streams")  # fmt: skip
OPEN = COUNTERS.index("open_streams")  # a gauge: the worker's streams open now
HEADER_WORDS = FIRST_SLOT + SLOT_WORDS * MAX_WORKERS


def layout(npages: int) -> list[tuple[str, int]]:
    return [("untouched", npages), ("need", npages), ("sent", npages), ("hot", npages)]


def create(npages: int) -> Shared:
    return Shared.create("migrator-source", HEADER_WORDS, layout(npages))


def attach(fd: int, npages: int) -> Shared:
    return Shared(fd, HEADER_WORDS, layout(npages))


class Counters:
    """One worker's counters in the header (it alone writes them)."""

    def __init__(self, shared: Shared, slot: int) -> None:
        base = FIRST_SLOT + SLOT_WORDS * slot
        self._w = shared.words
        self._i = {name: base + k for k, name in enumerate(COUNTERS)}

    def add(self, name: str, n: int) -> None:
        i = self._i[name]
        self._w[i] += n


def totals(shared: Shared, nworkers: int) -> dict[str, int]:
    out = dict.fromkeys(COUNTERS, 0)
    for slot in range(nworkers):
        base = FIRST_SLOT + SLOT_WORDS * slot
        for k, name in enumerate(COUNTERS):
            out[name] += shared.words[base + k]
    return out
