"""Page maps and batch flags, the same on both sides of the wire.

A page map is one byte per page, 0 or 1 (``bytes``/``bytearray``: searched
and combined at C speed).  A batch's flags are one byte per page:
``FLAG_OMITTED`` (sent on the other channel), ``FLAG_DATA`` (its bytes are in
the batch), ``FLAG_ZERO`` (all zero: no bytes on the wire).
"""

from __future__ import annotations

import zstandard

FLAG_OMITTED, FLAG_DATA, FLAG_ZERO = 0, 1, 2
VALID_FLAGS = bytes(range(3))  # bytes.translate(None, VALID_FLAGS) leaves only invalid ones
FLIP01 = bytes([1, 0]) + bytes(254)  # translate table: 0 <-> 1


def or_bytes(a: bytes | bytearray | memoryview, b: bytes | bytearray | memoryview) -> bytes:
    """Bytewise OR of two equal-length 0/1 maps, at C speed."""
    return (int.from_bytes(a, "little") | int.from_bytes(b, "little")).to_bytes(len(a), "little")


def is_01(m: bytes | bytearray) -> bool:
    return not m.translate(None, b"\x00\x01")


def decompress_exact(data: bytes, size: int) -> bytes:
    """Decompress a peer's zstd frame that must hold exactly ``size`` bytes.

    Raises ValueError.  python-zstandard trusts a frame's declared size over
    ``max_output_size``, so the declared size is checked first: a 53-byte
    frame declaring 1 TiB never allocates; a frame without a declared size is
    bounded by ``size``.
    """
    try:
        declared = zstandard.frame_content_size(data)
        if declared not in (-1, size):
            raise ValueError(f"frame declares {declared} bytes, not {size}")
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise ValueError(str(exc)) from None
    if len(out) != size:
        raise ValueError(f"{len(out)} bytes, not {size}")
    return out


def decompress_map(data: bytes, npages: int, what: str) -> bytes:
    """A peer's zstd-compressed map of one 0/1 byte per page (zero, missing, stale
    maps: both sides), checked by :func:`decompress_exact` and for its values.
    Raises ValueError("bad WHAT: ..."); callers turn it into their refusal."""
    try:
        out = decompress_exact(data, npages)
    except ValueError as exc:
        raise ValueError(f"bad {what}: {exc}") from None
    if not is_01(out):
        raise ValueError(f"bad {what}: one 0/1 byte per page expected")
    return out
