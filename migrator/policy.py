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
    if max_run < 1:
        raise ValueError("max_run must be at least 1")
    n = len(flags)
    needle = bytes([value])
    i = flags.find(needle)
    while 0 <= i < n:
        j = i
        while j < n and flags[j] == value and j - i < max_run:
            j += 1
        yield i, j - i
        i = flags.find(needle, j)


# compression 'auto': measure the link uncompressed over this much data first
AUTO_PROBE_BYTES = 8 << 20
AUTO_PROBE_SECONDS = 0.5


def initial_codec(requested: str) -> str:
    """Codec the bulk stream starts with; 'auto' starts uncompressed and measures."""
    return "zstd" if requested == "zstd" else "none"


def auto_wants_zstd(peer_is_loopback: bool, link_bytes_per_s: float, zstd_bytes_per_s: float) -> bool:
    """Compress only when the link is slower than the compressor, never on loopback.

    On loopback the bottleneck is CPU, and compressing only adds CPU work; on a
    link slower than the compressor, every byte saved is time saved.
    """
    if peer_is_loopback:
        return False
    return link_bytes_per_s < 0.8 * zstd_bytes_per_s


_OTHERS = {v: tuple(bytes([o]) for o in range(3) if o != v) for v in range(3)}


def value_runs(kind: bytes | bytearray) -> Iterator[tuple[int, int, int]]:
    """Yield (value, start, end) for maximal runs of equal bytes in ``kind`` (values 0-2).

    Run ends are found with bytes.find, so a long run costs one C-level scan,
    not a Python step per page.
    """
    n = len(kind)
    i = 0
    while i < n:
        v = kind[i]
        end = n
        for other in _OTHERS[v]:
            j = kind.find(other, i)
            if 0 <= j < end:
                end = j
        yield v, i, end
        i = end


# Pre-copy (source/precopy.py): when to stop the rounds and switch.
PRECOPY_MAX_ROUNDS = 30
PRECOPY_SMALL_PAGES = 64  # a dirty set this small: nothing more to gain before the switch
PRECOPY_SHRINK = 0.9  # a round "shrinks" if it leaves at most this fraction of the last one's dirty pages


def precopy_done(rounds: list[tuple[int, int, float]], elapsed_s: float, seconds: float, auto: bool) -> str:
    """Why the pre-copy should stop now, or "" to go on.

    ``rounds``: the finished rounds, (pages sent, pages written meanwhile, seconds).
    ``seconds``: a time limit (0 = none); ``auto``: stop when a round no longer
    shrinks the dirty set, or when the guest writes pages faster than the link
    sends them (QEMU's "dirty rate > bandwidth": more rounds cannot converge).
    The first round (every page) is always finished unless the time limit says
    otherwise.
    """
    if seconds > 0 and elapsed_s >= seconds:
        return f"time limit ({seconds:g} s)"
    if not rounds:
        return ""
    sent, dirty, _took = rounds[-1]
    if dirty <= PRECOPY_SMALL_PAGES:
        return f"converged ({dirty} pages written during the last round)"
    if len(rounds) >= PRECOPY_MAX_ROUNDS:
        return f"{PRECOPY_MAX_ROUNDS} rounds"
    if not auto:
        return ""
    if dirty >= sent:  # as many pages written as sent in the same time: rounds cannot converge
        return "the guest writes pages faster than the link sends them"
    if len(rounds) >= 2 and dirty > PRECOPY_SHRINK * rounds[-2][1]:
        return "the dirty set no longer shrinks"
    return ""


def and_not(a: bytes | bytearray | memoryview, b: bytes | bytearray | memoryview) -> bytes:
    """Bytewise ``a and not b`` of two equal-length 0/1 maps, at C speed."""
    return (int.from_bytes(a, "little") & ~int.from_bytes(b, "little")).to_bytes(len(a), "little")
