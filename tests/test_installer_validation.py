"""Installer.decode refuses malformed PageBatch messages before anything is installed.

decode() validates only: it never touches the uffd, so the installer here has no
uffd at all, and the page state must be unchanged after every refusal.  The
messages are real serialized PageBatch bytes (built with protobuf, so these
tests also check the fast decoder against protobuf's encoding).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
import xxhash
import zstandard

from migrator.dest.install import Decoded, Installer
from migrator.dest.pagestate import PageState
from migrator.errors import IntegrityError, ProtocolError
from migrator.pagemaps import FLAG_DATA, FLAG_OMITTED, FLAG_ZERO
from migrator.wire import migration_pb2 as pb

PS = 4096
NPAGES = 64
EPOCH = 0x77


def page_bytes(page: int) -> bytes:
    return (struct.pack("<Q", page) * (PS // 8))[:PS]


def make_batch(first: int, flags: bytes, codec: int = pb.CODEC_NONE, **override: object) -> pb.PageBatch:
    """A well-formed batch for ``flags``; ``override`` replaces any field afterwards."""
    raw = b"".join(page_bytes(first + i) for i, f in enumerate(flags) if f == FLAG_DATA)
    data = zstandard.ZstdCompressor().compress(raw) if codec == pb.CODEC_ZSTD and raw else raw
    fields: dict[str, object] = dict(
        epoch=EPOCH,
        first_page=first,
        count=len(flags),
        flags=flags,
        codec=codec if raw else pb.CODEC_NONE,
        data=data,
        raw_size=len(raw),
        xxh3=xxhash.xxh3_64_intdigest(raw) if raw else 0,
    )
    fields.update(override)
    return pb.PageBatch(**fields)  # type: ignore[arg-type]


@pytest.fixture
def installer() -> Iterator[Installer]:
    ps = PageState.create(NPAGES)
    yield Installer(None, ps, base=0x7F00_0000_0000, page_size=PS, counters=ps.counters(0))  # type: ignore[arg-type]
    ps.close()


def decode(installer: Installer, batch: pb.PageBatch) -> Decoded:
    return installer.decode(batch.SerializeToString(), EPOCH)


def data_of(d: Decoded) -> bytes:
    b = d.batch
    return bytes(b.data) if b.codec == pb.CODEC_NONE else d.data


def refuse(installer: Installer, batch: pb.PageBatch, exc: type[Exception] = ProtocolError) -> ProtocolError:
    before = bytes(installer.ps.state)
    with pytest.raises(exc) as info:
        decode(installer, batch)
    assert bytes(installer.ps.state) == before, "a refused batch changed the page state"
    assert isinstance(info.value, ProtocolError)
    return info.value


MIXED = bytes([FLAG_DATA, FLAG_ZERO, FLAG_DATA, FLAG_OMITTED, FLAG_DATA])

# -- good batches ------------------------------------------------------------------------


@pytest.mark.parametrize("codec", [pb.CODEC_NONE, pb.CODEC_ZSTD])
def test_good_batch_decodes_to_its_raw_data(installer: Installer, codec: int) -> None:
    d = decode(installer, make_batch(10, MIXED, codec))
    assert data_of(d) == page_bytes(10) + page_bytes(12) + page_bytes(14)


def test_batch_without_data_decodes_to_nothing(installer: Installer) -> None:
    assert data_of(decode(installer, make_batch(0, bytes([FLAG_ZERO, FLAG_OMITTED, FLAG_ZERO])))) == b""


def test_batch_ending_at_the_last_page_is_accepted(installer: Installer) -> None:
    assert len(data_of(decode(installer, make_batch(NPAGES - 2, bytes([FLAG_DATA, FLAG_DATA]))))) == 2 * PS


def test_batch_of_another_migration(installer: Installer) -> None:
    err = refuse(installer, make_batch(0, MIXED, epoch=EPOCH + 1))
    assert "another migration" in str(err)


@pytest.mark.parametrize("cut", [1, 7, 100])
def test_undecodable_message(installer: Installer, cut: int) -> None:
    raw = make_batch(0, MIXED).SerializeToString()
    with pytest.raises(ProtocolError):
        installer.decode(raw[:-cut], EPOCH)


# -- range ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "count"),
    [(NPAGES, 1), (NPAGES - 1, 2), (0, NPAGES + 1), (2**63, 1), (2**64 - 1, 1), (2**64 - 1, 2)],
)
def test_out_of_range_batch(installer: Installer, first: int, count: int) -> None:
    flags = bytes([FLAG_ZERO]) * count
    err = refuse(installer, make_batch(0, flags, first_page=first, count=count))
    assert "outside guest RAM" in str(err)


def test_empty_batch(installer: Installer) -> None:
    refuse(installer, make_batch(0, b"", count=0))


# -- flags ----------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [4, 6])
def test_flags_length_mismatch(installer: Installer, count: int) -> None:
    err = refuse(installer, make_batch(0, MIXED, count=count))
    assert "flags do not match" in str(err)


@pytest.mark.parametrize("bad", [3, 0x7F, 0xFF])
def test_unknown_flag_value(installer: Installer, bad: int) -> None:
    flags = bytes([FLAG_ZERO, bad, FLAG_ZERO])
    err = refuse(installer, make_batch(0, flags))
    assert "unknown page flag" in str(err)


# -- data accounting --------------------------------------------------------------------------


@pytest.mark.parametrize("delta", [-PS, -1, 1, PS])
def test_raw_size_mismatch(installer: Installer, delta: int) -> None:
    good = make_batch(0, MIXED)
    err = refuse(installer, make_batch(0, MIXED, raw_size=good.raw_size + delta))
    assert "does not match its flags" in str(err)


@pytest.mark.parametrize("cut", [1, PS, 3 * PS - 1])
def test_truncated_data(installer: Installer, cut: int) -> None:
    good = make_batch(0, MIXED)
    err = refuse(installer, make_batch(0, MIXED, data=good.data[:-cut]))
    assert "truncated" in str(err)


def test_oversized_data(installer: Installer) -> None:
    good = make_batch(0, MIXED)
    refuse(installer, make_batch(0, MIXED, data=good.data + b"\0"))


def test_data_on_a_batch_without_data_pages(installer: Installer) -> None:
    refuse(installer, make_batch(0, bytes([FLAG_ZERO]), data=bytes(PS)))


# -- integrity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 2])
def test_checksum_mismatch_names_the_batch(installer: Installer, k: int) -> None:
    good = make_batch(20, MIXED)
    data = bytearray(good.data)
    data[k * PS + 100] ^= 0x01
    err = refuse(installer, make_batch(20, MIXED, data=bytes(data)), IntegrityError)
    assert err.fields["first"] == 20 and err.fields["count"] == len(MIXED)


def test_wrong_checksum_value(installer: Installer) -> None:
    good = make_batch(5, MIXED)
    refuse(installer, make_batch(5, MIXED, xxh3=good.xxh3 ^ 1), IntegrityError)


def test_swapped_pages_fail_the_checksum(installer: Installer) -> None:
    good = make_batch(0, MIXED)
    d = good.data
    swapped = d[PS : 2 * PS] + d[:PS] + d[2 * PS :]
    refuse(installer, make_batch(0, MIXED, data=swapped), IntegrityError)


def test_checksum_checked_after_decompression(installer: Installer) -> None:
    good = make_batch(30, MIXED)
    raw = bytearray(good.data)
    raw[2 * PS + 7] ^= 0x80
    batch = make_batch(30, MIXED, pb.CODEC_ZSTD, data=zstandard.ZstdCompressor().compress(bytes(raw)))
    refuse(installer, batch, IntegrityError)


# -- codecs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("garbage", [b"", b"\x00", b"not zstd at all", b"\x28\xb5\x2f\xfd" + b"\xff" * 32])
def test_bad_zstd_data(installer: Installer, garbage: bytes) -> None:
    err = refuse(installer, make_batch(0, MIXED, pb.CODEC_ZSTD, data=garbage))
    assert not isinstance(err, IntegrityError)


def test_truncated_zstd_data(installer: Installer) -> None:
    good = make_batch(0, MIXED, pb.CODEC_ZSTD)
    refuse(installer, make_batch(0, MIXED, pb.CODEC_ZSTD, data=good.data[:-5]))


def test_zstd_that_decompresses_to_more_than_raw_size(installer: Installer) -> None:
    good = make_batch(0, MIXED)
    bigger = zstandard.ZstdCompressor().compress(good.data + page_bytes(99))
    refuse(installer, make_batch(0, MIXED, pb.CODEC_ZSTD, data=bigger))


def test_zstd_frame_without_content_size(installer: Installer) -> None:
    """A streamed frame carries no size; decode must still bound the output by raw_size."""
    good = make_batch(0, MIXED)
    cctx = zstandard.ZstdCompressor(write_content_size=False)
    bigger = cctx.compress(good.data + page_bytes(99))
    assert zstandard.frame_content_size(bigger) == -1
    refuse(installer, make_batch(0, MIXED, pb.CODEC_ZSTD, data=bigger))
    exact = cctx.compress(good.data)
    assert data_of(decode(installer, make_batch(0, MIXED, pb.CODEC_ZSTD, data=exact))) == good.data


def _zstd_frame_claiming(content_size: int, payload: bytes) -> bytes:
    """A single-segment zstd frame whose header claims ``content_size`` bytes (RFC 8878 3.1.1)."""
    magic = struct.pack("<I", 0xFD2FB528)
    descriptor = bytes([0xE0])  # 8-byte Frame_Content_Size, Single_Segment, no checksum/dict
    block_header = ((len(payload) << 3) | 1).to_bytes(3, "little")  # last block, raw
    return magic + descriptor + struct.pack("<Q", content_size) + block_header + payload


def test_zstd_frame_claiming_a_different_size(installer: Installer) -> None:
    good = make_batch(0, MIXED)
    frame = _zstd_frame_claiming(8 * PS, good.data)
    refuse(installer, make_batch(0, MIXED, pb.CODEC_ZSTD, data=frame))


def test_zstd_frame_claiming_a_huge_size_is_a_protocol_error(installer: Installer) -> None:
    good = make_batch(0, MIXED)
    frame = _zstd_frame_claiming(1 << 40, good.data[:16])
    refuse(installer, make_batch(0, MIXED, pb.CODEC_ZSTD, data=frame))


@pytest.mark.parametrize("codec", [2, 7, 1000])
def test_unknown_codec(installer: Installer, codec: int) -> None:
    err = refuse(installer, make_batch(0, MIXED, codec=codec))
    assert "unknown codec" in str(err)


# -- decode does not depend on the page state ---------------------------------------------------------


def test_decode_neither_claims_nor_installs(installer: Installer) -> None:
    before = bytes(installer.ps.state)
    decode(installer, make_batch(0, MIXED))
    assert bytes(installer.ps.state) == before
    assert installer.c.get("duplicates") == 0 and installer.c.get("installed") == 0
