"""PageBatch without copying its page data: the bulk path's codec.

The wire format is the ``PageBatch`` message of ``migration.proto``, unchanged;
only the page data is kept out of protobuf's hands.  Protobuf's Python runtime
copies a bytes field when it builds a message, again when it serializes it,
and again when a parsed field is read; at 2 MiB per batch and ~1 GB/s that is
most of a CPU.  So:

* :func:`encode` serializes every field but ``data`` with protobuf (a few dozen
  bytes), then appends the ``data`` field itself: its key, its length and the
  page bytes, joined once (protobuf accepts fields in any order, so any
  protobuf parser reads the result as the same message);
* :func:`decode` walks the message's top-level fields (protobuf's wire format:
  a varint key, then a varint, 8 bytes, a varint length and bytes, or 4
  bytes) and returns ``data`` as a memoryview of the received buffer.

Both are tested against protobuf's own parser and serializer
(``tests/test_fastbatch.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from migrator.wire import migration_pb2 as pb

_DATA_KEY = bytes([(6 << 3) | 2])  # field 6 (data), wire type 2 (length-delimited)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode(header: pb.PageBatch, data: Sequence[bytes | bytearray | memoryview]) -> bytes:
    """The serialized PageBatch: ``header``'s fields (its ``data`` must be empty) and
    ``data`` (the pieces, concatenated) as its data field.  One copy of the data."""
    size = sum(len(d) for d in data)
    head = header.SerializeToString()
    if not size:
        return head
    return b"".join([head, _DATA_KEY, _varint(size), *data])


@dataclass
class Batch:
    """A decoded PageBatch; ``data`` is a view of the received message (no copy)."""

    epoch: int = 0
    request_id: int = 0
    first_page: int = 0
    count: int = 0
    flags: bytes = b""
    codec: int = 0
    data: memoryview = field(default_factory=lambda: memoryview(b""))
    raw_size: int = 0
    last: bool = False
    sent_unix_ns: int = 0
    zero_map_zstd: bytes = b""
    xxh3: int = 0
    round: int = 0  # pre-copy round (0 = post-copy)
    wire_size: int = 0  # bytes of the whole message
    data_offset: int = 0  # where ``data`` starts in the message


_VARINT_FIELDS = {1: "request_id", 2: "first_page", 3: "count", 5: "codec", 7: "raw_size", 9: "last",
                  10: "sent_unix_ns", 12: "epoch", 14: "round"}  # fmt: skip
_BYTES_FIELDS = {4: "flags", 6: "data", 11: "zero_map_zstd"}
_FIXED64_FIELDS = {13: "xxh3"}


def decode(raw: bytes) -> Batch:
    """Parse a serialized PageBatch; raises ValueError on malformed input."""
    b = Batch(wire_size=len(raw))
    mv = memoryview(raw)
    n = len(raw)
    i = 0
    while i < n:
        key, i = _read_varint(raw, i)
        num, wtype = key >> 3, key & 7
        if wtype == 0:
            value, i = _read_varint(raw, i)
            name = _VARINT_FIELDS.get(num)
            if name is not None:
                setattr(b, name, bool(value) if num == 9 else value)
        elif wtype == 2:
            length, i = _read_varint(raw, i)
            if i + length > n:
                raise ValueError("field runs past the end of the message")
            name = _BYTES_FIELDS.get(num)
            if name == "data":
                b.data = mv[i : i + length]
                b.data_offset = i
            elif name is not None:
                setattr(b, name, raw[i : i + length])
            i += length
        elif wtype == 1:
            if i + 8 > n:
                raise ValueError("fixed64 runs past the end of the message")
            if num in _FIXED64_FIELDS:
                b.xxh3 = int.from_bytes(raw[i : i + 8], "little")
            i += 8
        elif wtype == 5:
            i += 4
        else:
            raise ValueError(f"unknown wire type {wtype}")
    if i != n:
        raise ValueError("truncated message")
    return b


def _read_varint(raw: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    n = len(raw)
    while True:
        if i >= n or shift > 63:
            raise ValueError("bad varint")
        byte = raw[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7
