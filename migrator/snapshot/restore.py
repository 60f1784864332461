"""`migrator restore DIR`: the destination pipeline, with an image for a source.

The guest starts with empty RAM; the fault process resolves its faults from
the image (local reads, each page checked against its checksum), the lanes
prefetch the rest, holes are mapped as zero pages and never read.  Nothing
here is a second pipeline: it is ``DestinationSession`` with a
:class:`ImageControl` (``dest/local_source.py``'s seam), so every number of
the summary means what it means after a migration.  Restore-only numbers:

* start-up: the command's start -> the handshake (the guest process, the
  fault process and the lanes started, the image opened and checked);
* downtime: handshake -> vCPUs running (the restore latency to the first
  instruction: with ``--replay-ws before`` it includes loading the working
  set, with ``--eager`` the whole image);
* first access: vCPUs running -> the guest's first memory access done
  (guest_sim's own clock);
* steady state: vCPUs running -> the guest runs as if it had never been
  restored: a paced guest (``--rate``) is never again more than 5 ms behind
  its schedule; an unpaced one runs every 100 ms window at >= 75 % of its
  rate once the restore is complete (:func:`steady_state_ms`);
* image check: after the run, with the guest paused, the XXH3-64 of every
  page of its RAM (read from /proc/PID/mem) against the image's: done when
  the guest ran read-only, so its memory must still be the image.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from migrator.config import DestConfig
from migrator.dest import workingset
from migrator.dest.local_source import LocalControl
from migrator.dest.session import DestinationSession, Outcome, Progress
from migrator.report import build_summary
from migrator.snapshot.image import Image, open_image, page_hash, verify_pages
from migrator.errors import MigratorError
from migrator.stats import Summary

STEADY_BIN_NS, STEADY_SHARE, STEADY_LAG_NS = 100_000_000, 0.75, 5_000_000


class ImageControl(LocalControl):
    """An image as the session's source: its workers read the image folder itself."""

    def __init__(self, image: Image, vcpu_state: dict[str, Any], vcpus: int) -> None:
        super().__init__(image.ram_path, image.page_size, vcpu_state, vcpus)
        self.image = image

    def worker_source(self, state_fd: int = -1) -> dict[str, Any]:
        return {**super().worker_source(state_fd), "image": self.image.path}


@dataclass(frozen=True)
class RestoreOptions:
    image: str
    run_for: float = 1.0  # seconds the guest runs after the last page
    record_ws: str | None = None  # write the working set here
    ws_seconds: float = 2.0  # recording window: lanes held back, every touched page faults
    verify_image: bool = False  # check every page's checksum before the guest starts
    write_ratio: float | None = None  # override the image's; raw images always run read-only


@dataclass
class Restored:
    summary: Summary
    image: Image
    mode: str
    startup_ms: float
    first_access_ms: float
    steady_ms: float
    image_checked: int = 0  # pages compared with the image (0: the guest wrote, not compared)
    image_mismatch: list[int] = field(default_factory=list)
    ws_pages: int = 0  # recorded or replayed
    ws_path: str = ""

    @property
    def ok(self) -> bool:
        return self.summary.ok and not self.image_mismatch

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.summary.__dict__)
        d.update(mode=self.mode, image=self.image.path, image_id=self.image.id, startup_ms=self.startup_ms,
                 first_access_ms=self.first_access_ms, steady_ms=self.steady_ms, image_checked=self.image_checked,
                 image_mismatch=self.image_mismatch[:20], ws_pages=self.ws_pages, ws_path=self.ws_path, ok=self.ok)  # fmt: skip
        return d

    def to_text(self) -> str:
        s, im = self.summary, self.image
        lines = s.to_text().splitlines()
        lines[0] = (f"restored        {s.ram_bytes >> 20} MiB image {im.path} ({im.manifest.get('guest')}), {s.pages} pages "
                    f"of {s.page_size} B: {im.data_pages} data, {im.npages - im.data_pages} holes; {self.mode}")  # fmt: skip
        lines[1] = f"downtime        {s.downtime_ms:.1f} ms   (restore latency: handshake -> vCPUs running)"
        lines[2] = lines[2].replace("source paused", "handshake")
        extra = [
            f"start-up        {self.startup_ms:.0f} ms   (command start -> handshake: processes started, image checked)",
            f"first access    {self.first_access_ms:.2f} ms   (vCPUs running -> the guest's first access done)",
            f"steady state    {self.steady_ms:.0f} ms   (vCPUs running -> the guest runs as if never restored)",
        ]
        lines[2:2] = extra
        lines = [ln for ln in lines if not ln.startswith(("source copy", "wire "))]
        if self.ws_path:
            lines.append(f"working set     {self.ws_pages} pages {'recorded to' if 'record' in self.mode else 'replayed from'} "
                         f"{self.ws_path}")  # fmt: skip
        if self.image_checked:
            bad = len(self.image_mismatch)
            lines.append(f"image check     {self.image_checked - bad} of {self.image_checked} pages equal to the image "
                         f"(XXH3-64 of /proc/PID/mem)" + (f"  FAILED: pages {self.image_mismatch[:5]}" if bad else ""))  # fmt: skip
        return "\n".join(lines)


def raw_state(vcpus: int = 2) -> dict[str, Any]:
    """vCPU state for memory that is not guest_sim's: random reads, nothing checked, nothing written."""
    return {"config": {"workload": "random", "write_permille": 0, "zero_pct": 0, "text_pct": 0, "nvcpus": vcpus,
                       "rate": 0, "check": False},
            "vcpus": [{"rng": 0x9E3779B97F4A7C15 + 2 * i + 1, "cursor": 0, "ops": 0, "reads": 0, "writes": 0}
                      for i in range(vcpus)]}  # fmt: skip


def restore(opts: RestoreOptions, cfg: DestConfig, stop: threading.Event,
            on_progress: Callable[[Progress], None] | None = None,
            inspect: Callable[[Outcome], None] | None = None) -> Restored:  # fmt: skip
    """Restore the image ``opts.image`` lazily (or as ``cfg`` says: eager, replaying a working set).

    ``inspect(outcome)`` is called once every page is present and the guest
    has run ``opts.run_for`` s, while it still runs (tests read its memory).
    Raises ImageError before any process starts when the image (or the
    working-set file) cannot be used; then whatever a migration raises.
    """
    t0 = time.monotonic_ns()
    image = open_image(opts.image)
    if opts.verify_image:
        verify_pages(image)
    ws_pages = 0
    if cfg.replay_ws:
        ws_pages = len(workingset.load(cfg.replay_ws, image=image.id, npages=image.npages, page_size=image.page_size))
    raw = image.vcpu_state is None
    state = image.vcpu_state or raw_state()
    write_ratio = 0.0 if raw else opts.write_ratio
    cfg = replace(cfg, source="image", write_ratio=write_ratio, verify=cfg.verify and not raw)
    if opts.record_ws:
        cfg = replace(cfg, demand_window=1, prefetch_delay=opts.ws_seconds)
    mode = "eager" if cfg.eager else f"replayed working set ({cfg.replay_mode})" if cfg.replay_ws else "lazy"
    if opts.record_ws:
        mode = "lazy, recording the working set"
    read_only = write_ratio == 0.0 or (write_ratio is None and state["config"].get("write_permille") == 0)
    vcpus = int(state["config"].get("nvcpus", 2))
    session = DestinationSession(cfg, control=ImageControl(image, state, vcpus))
    try:
        try:
            out = session.migrate(on_progress)
        except MigratorError as exc:
            if isinstance(exc.__cause__, MigratorError):  # without the migration's advice (a source to roll back to)
                raise exc.__cause__ from None
            raise
        session.run_after(out, opts.run_for, stop, on_progress)
        if inspect is not None:
            inspect(out)
        trace = out.guest.call("stats", trace=True)["vcpus"]
        checked, bad = _check_image(out, image) if read_only else (0, [])
        session.finish(out)
    finally:
        session.close()
    if opts.record_ws:
        ws_pages = workingset.save_recorded(opts.record_ws, out, opts.ws_seconds, image=image.id)
    summary = build_summary(out)
    firsts = [v["first_op_ns"] for v in trace if v.get("first_op_ns")]
    done_mono = out.resumed_mono_ns + (out.done_ns - out.resumed_ns)
    rate = int(state["config"].get("rate", 0))
    steady = steady_state_ms([v.get("trace", []) for v in trace], out.resumed_mono_ns, done_mono, rate,
                             int(trace[0].get("trace_every", 32)) if trace else 32)  # fmt: skip
    return Restored(
        summary, image, mode, startup_ms=(_handshake_mono(out) - t0) / 1e6,
        first_access_ms=(min(firsts) - out.resumed_mono_ns) / 1e6 if firsts else float("nan"),
        steady_ms=steady, image_checked=checked, image_mismatch=bad, ws_pages=ws_pages,
        ws_path=opts.record_ws or cfg.replay_ws or "",
    )  # fmt: skip


def _handshake_mono(out: Outcome) -> int:
    """The handshake on the monotonic clock (the manifest has it in wall-clock ns)."""
    return out.resumed_mono_ns - (out.resumed_ns - out.paused_ns)


def _check_image(out: Outcome, image: Image) -> tuple[int, list[int]]:
    """Pause the guest, compare every page of its RAM (/proc/PID/mem) with the image's checksum."""
    g = out.guest
    g.call("pause", timeout=30)
    try:
        ps, sums = image.page_size, image.sums
        bad: list[int] = []
        chunk = 256
        with open(f"/proc/{g.hello.pid}/mem", "rb", buffering=0) as mem:
            for first in range(0, image.npages, chunk):
                n = min(chunk, image.npages - first)
                mem.seek(g.hello.addr + first * ps)
                data = memoryview(mem.read(n * ps))
                bad.extend(first + k for k in range(n) if page_hash(data[k * ps : (k + 1) * ps]) != sums[first + k])
        return image.npages, bad
    finally:
        g.call("resume")


def steady_state_ms(traces: list[list[int]], t0: int, t_done: int, rate: int = 0, every: int = 32) -> float:
    """ms from ``t0`` (the resume, monotonic ns) until the guest runs as if it had never
    been restored.  ``traces``: per vCPU, the time of every ``every``-th op.

    A paced guest (``rate`` ops/s per vCPU; it runs flat out while behind its
    schedule): the last time a vCPU was more than STEADY_LAG_NS behind its
    schedule.  Otherwise: the start of the first STEADY_BIN_NS window from
    which on every window does >= STEADY_SHARE of the median window after
    ``t_done`` (all pages present).  NaN if the run was too short to tell.
    """
    if rate:
        last_behind = t0
        for tr in traces:
            for k, t in enumerate(tr, 1):
                if (t - t0) * rate / 1e9 - k * every > STEADY_LAG_NS * rate / 1e9:
                    last_behind = max(last_behind, t)
        return (last_behind - t0) / 1e6
    marks = sorted(t for tr in traces for t in tr if t >= t0)
    if not marks:
        return float("nan")
    nbins = (marks[-1] - t0) // STEADY_BIN_NS  # whole windows only
    if nbins < 2:
        return float("nan")
    counts = [0] * nbins
    for t in marks:
        b = (t - t0) // STEADY_BIN_NS
        if b < nbins:
            counts[b] += 1
    after = counts[max(0, (t_done - t0) // STEADY_BIN_NS + 1) :] or counts[-3:]
    ref = statistics.median(after)
    first = nbins
    while first > 0 and counts[first - 1] >= STEADY_SHARE * ref:
        first -= 1
    return first * STEADY_BIN_NS / 1e6


def default_ws_path(image: str) -> str:
    return os.path.join(image, "ws.json")
