"""Self-checking page format and the layout of guest RAM.

RAM layout (page size P, N pages)::

    [0, T)   version table: one little-endian u32 per page, T = ceil(4N / P)
    [T, N)   data pages

A data page whose table entry is 0 has never been written and must be all
zeros.  A written page starts with a 32-byte header::

    0   u32 magic "MGPG"
    4   u32 crc32 of bytes [8, P)
    8   u64 page index
    16  u64 version         (equals its table entry)
    24  u32 kind            (TEXT or RANDOM: how the payload was made)
    28  u32 writer vCPU

followed by the payload.  A page from the wrong index, an older version, a zero
page where data was expected, or a flipped bit each fail :func:`check_page`
with a message naming which.
"""

from __future__ import annotations

import random
import struct
import zlib

MAGIC = 0x4750474D  # "MGPG" little-endian
HEADER = struct.Struct("<IIQQII")
HEADER_SIZE = HEADER.size
KIND_ZERO, KIND_TEXT, KIND_RANDOM = 0, 1, 2

_WORDS = (
    "the quick brown fox jumps over lazy dogs while guest pages travel from "
    "source to destination through userfaultfd and grpc streams page table "
    "entry kernel memory fault handler prefetch window demand latency zstd "
    "compression checksum version index vcpu register migration postcopy "
).split()


def _make_corpus(size: int = 1 << 16) -> bytes:
    rng = random.Random(1234)
    out: list[str] = []
    n = 0
    while n < size:
        w = rng.choice(_WORDS)
        out.append(w)
        n += len(w) + 1
    return " ".join(out).encode()[:size]


CORPUS = _make_corpus()


def table_pages(npages: int, page_size: int) -> int:
    """Number of pages holding the version table."""
    return (npages * 4 + page_size - 1) // page_size


def page_kind(index: int, zero_pct: int, text_pct: int) -> int:
    """Which kind of content a page holds after the initial fill.

    Decided per cluster of 16 pages (64 KiB), like memory a guest allocates in
    chunks, so zero pages come in runs as they do in real guests.
    """
    h = ((index >> 4) * 2654435761 >> 7) % 100
    if h < zero_pct:
        return KIND_ZERO
    if h < zero_pct + text_pct:
        return KIND_TEXT
    return KIND_RANDOM


def build_page(buf: bytearray, index: int, version: int, kind: int, writer: int, rnd: random.Random) -> None:
    """Fill ``buf`` (one page) with version ``version`` of page ``index``."""
    size = len(buf)
    n = size - HEADER_SIZE
    if kind == KIND_RANDOM:
        buf[HEADER_SIZE:] = rnd.randbytes(n)
    else:
        off = (index * 7919 + version * 104729) % (len(CORPUS) - n)
        buf[HEADER_SIZE:] = CORPUS[off : off + n]
    HEADER.pack_into(buf, 0, MAGIC, 0, index, version, kind, writer)
    struct.pack_into("<I", buf, 4, zlib.crc32(memoryview(buf)[8:]))


def check_page(buf: bytes | bytearray | memoryview, index: int, expected_version: int) -> str | None:
    """Return None if the page is right, else a one-line description of what is wrong."""
    if expected_version == 0:
        if not any(buf):
            return None
        return f"page {index}: expected a never-written (zero) page, found data"
    magic, crc, pidx, version, _kind, _writer = HEADER.unpack_from(buf)
    if magic != MAGIC:
        if not any(buf):
            return f"page {index}: zero page where version {expected_version} was expected"
        return f"page {index}: bad magic {magic:#x} (garbage)"
    if pidx != index:
        return f"page {index}: holds page {pidx} instead (wrong page)"
    if version != expected_version:
        return f"page {index}: stale or future version {version}, expected {expected_version}"
    if zlib.crc32(memoryview(buf)[8:]) != crc:
        return f"page {index}: checksum mismatch (corrupt)"
    return None
