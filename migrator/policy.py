"""Policy as pure functions: windows, seeking, runs (tested without threads or syscalls)."""

from __future__ import annotations

from collections.abc import Iterator

# Demand window: pages fetched with a faulted page (the faulted one first).
DEFAULT_DEMAND_WINDOW = 4
# Move the bulk stream only if the fault is this far from where it streams
# and the last move is this old: random faults would otherwise thrash it.
SEEK_MIN_DISTANCE = 512
SEEK_MIN_INTERVAL_S = 0.02


def should_seek(target: int, current: int, since_last_s: float) -> bool:
    if since_last_s < SEEK_MIN_INTERVAL_S:
        return False
    return current < 0 or abs(target - current) >= SEEK_MIN_DISTANCE


def runs_of(flags: bytes | bytearray, value: int, max_run: int) -> Iterator[tuple[int, int]]:
    """Yield (first, count) of maximal runs where flags[i] == value, split at max_run."""
    n = len(flags)
    needle = bytes([value])
    i = flags.find(needle)
    while 0 <= i < n:
        j = i
        while j < n and flags[j] == value and j - i < max_run:
            j += 1
        yield i, j - i
        i = flags.find(needle, j)


def choose_codec(requested: str, peer_is_loopback: bool) -> str:
    """'auto' compresses only when the link is likely slower than the compressor."""
    if requested != "auto":
        return requested
    return "none" if peer_is_loopback else "zstd"
