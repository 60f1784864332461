"""Working sets, the REAP way: record which pages a restored guest touches first, and in
what order; on the next restore of the same image, fetch that set first.

Recording (``--record-ws``): the fault process keeps every fault it reads
(page, time); the first fault on each page is its first touch.  For the set
to be complete the guest must fault on every page it touches: the demand
window is one page and the bulk lanes are held back for the recording window
(``restore.py`` sets both), so nothing arrives before the guest asks for it.

Replaying (``--replay-ws``): the fault process marks the set's pages
REQUESTED and asks for them on the urgent channel in runs of consecutive
pages (one request per run, at most MAX_DEMAND_PAGES; a run may take a few
pages between two of the set's: one request costs as much as several pages):
in page order before the guest runs; while it runs, the earliest-touched
pages first, in chunks each in page order (:func:`replay_runs`); the
bulk lanes then bring the rest.  ``before``: the guest resumes only once
every page of the set is installed (REAP's prefetch); ``while``: at once,
with the set's requests queued ahead of its first faults.  The source of the
pages does not matter: a local image or a `migrator serve` / `migrator
source` over gRPC.

Eager (the baseline): every page installed by the lanes before the resume.

File format: JSON ``{"format": "migrator-ws", "version": 1, "image", "npages",
"page_size", "window_s", "pages": [first-touch order]}``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

from migrator.dest.pagestate import MISSING, PRESENT, REQUESTED, ZERO_READY, PageState
from migrator.errors import ImageError, MigratorError

FORMAT, VERSION = "migrator-ws", 1
GAP_PAGES = 4  # a request also takes up to 4 pages between two of the set's
WHILE_CHUNK = 512  # while the guest runs: the set in chunks of this many first touches


def first_touches(records: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    """(page, monotonic ns) of the first fault on each page, in order, from the fault records."""
    seen: dict[int, int] = {}
    for page, t, _tid in records:
        seen.setdefault(page, t)
    return list(seen.items())


def request_runs(pages: list[int], limit: int, gap: int = 0) -> list[tuple[int, int]]:
    """``pages`` in their order as (first, count) runs of at most ``limit`` pages; a run
    also takes up to ``gap`` pages between two of them (one request is worth a few pages)."""
    out: list[tuple[int, int]] = []
    for p in pages:
        if out:
            first, count = out[-1]
            end = first + count
            if end <= p <= end + gap and p - first < limit:
                out[-1] = (first, p - first + 1)
                continue
        out.append((p, 1))
    return out


def replay_runs(pages: list[int], limit: int, *, before: bool) -> list[tuple[int, int]]:
    """The requests that replay ``pages`` (first-touch order): before the resume, in page
    order; while the guest runs, the earliest-touched WHILE_CHUNK pages first, each chunk
    in page order (coarse order kept, few requests).  Runs take up to GAP_PAGES between two."""
    if before:
        return request_runs(sorted(set(pages)), limit, GAP_PAGES)
    out: list[tuple[int, int]] = []
    for i in range(0, len(pages), WHILE_CHUNK):
        out += request_runs(sorted(set(pages[i : i + WHILE_CHUNK])), limit, GAP_PAGES)
    return out


def save(path: str, pages: list[int], *, image: str, npages: int, page_size: int, window_s: float) -> None:
    data = {"format": FORMAT, "version": VERSION, "image": image, "npages": npages, "page_size": page_size,
            "window_s": window_s, "pages": pages}  # fmt: skip
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def save_recorded(path: str, out: Any, window_s: float, *, image: str) -> int:
    """Save the pages a destination's guest touched first within ``window_s`` of its resume
    (``out``: the session's Outcome); returns how many."""
    until = out.resumed_mono_ns + int(window_s * 1e9)
    pages = [p for p, t in out.touched if t <= until]
    m = out.manifest
    save(path, pages, image=image, npages=m.ram_size // m.page_size, page_size=m.page_size, window_s=window_s)
    return len(pages)


def load(path: str, *, image: str, npages: int | None, page_size: int | None) -> list[int]:
    """The pages of the working set at ``path``, checked against the image it is replayed on
    (``npages`` None: only the file itself, before the image is known).

    Raises ImageError (missing, unreadable, or recorded on another image).
    """
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ImageError("working-set file not found", path=path) from None
    except (OSError, ValueError) as exc:
        raise ImageError(f"cannot read the working-set file: {exc}", path=path) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
        raise ImageError("not a working-set file", path=path)
    if image and data.get("image") and data["image"] != image:
        raise ImageError(f"working set recorded on another image ({data['image']}, this one is {image})", path=path)
    if npages is not None and (data.get("npages") != npages or data.get("page_size") != page_size):
        raise ImageError("working set recorded for another RAM size", path=path, npages=data.get("npages"))
    pages, limit = data.get("pages"), data.get("npages")
    if not isinstance(pages, list) or not isinstance(limit, int) or not all(isinstance(p, int) and 0 <= p < limit for p in pages):
        raise ImageError("corrupt working-set file: pages outside guest RAM", path=path)
    return pages


# -- in the fault process ------------------------------------------------------------------
def replay(ps: PageState, request: Callable[[int, int], None], pages: list[int], limit: int,
           wait_s: float) -> dict[str, Any]:  # fmt: skip
    """Ask for ``pages`` (recorded order) on the urgent channel; with ``wait_s`` > 0, return
    once every one is installed.  Fault process only (it alone moves pages to REQUESTED)."""
    st, zero = ps.state, ps.zero
    asked = 0
    # before the resume the order does not matter: in page order, runs are long (few requests)
    for first, count in replay_runs(pages, limit, before=wait_s > 0):
        i = first
        end = first + count
        while i < end:  # sub-runs of pages still missing (a fault may have asked for some)
            if st[i] != MISSING or (ps.words[ZERO_READY] and zero[i]):
                i += 1
                continue
            j = i
            while j < end and st[j] == MISSING:
                st[j] = REQUESTED
                j += 1
            request(i, j - i)
            asked += j - i
            i = j
    if wait_s > 0:
        deadline = time.monotonic() + wait_s
        for p in pages:
            while st[p] != PRESENT:
                if time.monotonic() > deadline:
                    raise MigratorError(f"the working set was not installed within {wait_s:g} s", page=p)
                time.sleep(0.0005)
    return {"asked": asked}


# -- in the session ------------------------------------------------------------------------
def before_resume(cfg: Any, crew: Any, ps: PageState, epoch: int, check: Callable[[], None]) -> bool:
    """What must be in place before the guest resumes; True if the lanes were started here."""
    if cfg.replay_ws and cfg.replay_mode == "before":
        crew.fault.call("replay", timeout=610, path=cfg.replay_ws, wait_s=600.0)
    elif cfg.replay_ws:  # while: the guest resumes as the fault process queues the set's requests
        crew.fault.send("replay", path=cfg.replay_ws, wait_s=0.0)
    if not cfg.eager:
        return False
    crew.start_lanes(epoch)
    while ps.total("installed", crew.nslots) < ps.npages:
        name, ev = crew.next_event(0.01)
        if ev.get("event") in ("fatal", "exited"):
            from migrator.dest.crew import event_error

            raise event_error(name, ev)
        check()
    return True
