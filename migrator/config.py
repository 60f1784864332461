"""Frozen configuration objects built by the CLI (or by tests) and read by the library."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from migrator import policy
from migrator.security import ENV_SECRET, TlsFiles

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 1000, "m": 1 << 20, "mib": 1 << 20, "mb": 1000**2,
          "g": 1 << 30, "gib": 1 << 30, "gb": 1000**3}  # fmt: skip


def parse_size(text: str) -> int:
    """'256MiB' -> 268435456.  Raises ValueError with a readable message."""
    m = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (use e.g. 256MiB, 1GiB)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


@dataclass(frozen=True)
class GuestOptions:
    ram: int = 256 << 20
    vcpus: int = 2
    workload: str = "random"
    write_ratio: float = 0.5
    zero_pct: int = 40
    text_pct: int = 30
    seed: int = 1
    rate: int = 0  # operations per second per vCPU (0 = flat out)


@dataclass(frozen=True)
class SourceConfig:
    listen: str = "127.0.0.1:7000"
    guest: GuestOptions = GuestOptions()
    ready_file: str | None = None
    keep_guest: bool = False  # after completion keep the paused guest until stopped (tests, roll-back)
    json: bool = False
    secret_file: str | None = None  # else $MIGRATOR_SECRET, else a new one is printed
    tls: TlsFiles = TlsFiles()
    # resume the guest here if the destination has not switched over this long after the pause
    switchover_timeout: float = 5.0
    lanes: int = 2  # bulk lane worker processes (ports P+2 ...)


@dataclass(frozen=True)
class DestConfig:
    source: str = "127.0.0.1:7000"
    fault_threads: int = 1  # bench wakeups: a second thread only adds wake-ups (the fault path never blocks)
    lanes: int = 2  # bulk lane processes
    demand_window: int = policy.DEFAULT_DEMAND_WINDOW
    compress: str = "auto"  # auto | none | zstd
    batch_pages: int = 512
    run_for: float | None = None  # seconds after completion; None = until Ctrl-C
    write_ratio: float | None = None  # override the guest's write ratio on the destination
    connect_timeout: float = 5.0
    progress: bool = True
    verify: bool = True  # pause the guest after completion and let it check every page
    prefetch_delay: float = 0.0  # seconds before the bulk stream starts (0 = at once)
    balloon_pages: int = 0  # the guest discards this many pages (its last ones) right after the resume
    # nice value of the guest's vCPUs while pages are missing (0 = leave alone); restored after
    guest_nice: int = 10
    secret: str | None = field(default_factory=lambda: os.environ.get(ENV_SECRET) or None, repr=False)
    reconnect_deadline: float = 300.0  # seconds to wait for a lost source before giving up
    tls: TlsFiles = TlsFiles()
    # pre-copy before the switch: at most this many seconds (0 = none: pure post-copy), or
    # precopy_auto: until a round no longer shrinks or the link cannot keep up
    precopy: float = 0.0
    precopy_auto: bool = False
    hot_first: bool = False  # after the switch, the pages the guest wrote last come first
    # restores (dest/workingset.py): a recorded working set fetched first, "before" or "while" the
    # guest runs; eager: every page installed before the resume
    replay_ws: str | None = None
    replay_mode: str = "before"
    eager: bool = False


def parse_precopy(text: str) -> tuple[float, bool]:
    """``--precopy`` value: 'auto' -> (0, True); '1.5' -> (1.5, False); '0' -> (0, False).
    Raises ValueError with a readable message."""
    t = text.strip().lower()
    if t == "auto":
        return 0.0, True
    try:
        seconds = float(t)
    except ValueError:
        raise ValueError(f"--precopy takes SECONDS, auto or 0, not {text!r}") from None
    if not 0 <= seconds <= 3600:
        raise ValueError(f"--precopy {text}: seconds from 0 to 3600")
    return seconds, False
