"""guest_sim.pages (self-checking page format) and guest_sim.workload (which page a vCPU touches)."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guest_sim import pages, workload

PS = 4096


def built(index: int, version: int, kind: int = pages.KIND_RANDOM, seed: int = 0) -> bytearray:
    buf = bytearray(PS)
    pages.build_page(buf, index, version, kind, writer=3, rnd=random.Random(seed))
    return buf


# -- build_page / check_page ------------------------------------------------------------


@pytest.mark.parametrize("kind", [pages.KIND_TEXT, pages.KIND_RANDOM])
def test_built_page_checks_clean(kind: int) -> None:
    buf = built(100, 7, kind)
    assert pages.check_page(buf, 100, 7) is None
    assert pages.check_page(bytes(buf), 100, 7) is None
    assert pages.check_page(memoryview(buf), 100, 7) is None
    magic, _crc, index, version, k, writer = pages.HEADER.unpack_from(buf)
    assert (magic, index, version, k, writer) == (pages.MAGIC, 100, 7, kind, 3)


def test_text_pages_are_deterministic_and_differ_by_version() -> None:
    a, b = built(9, 2, pages.KIND_TEXT, seed=1), built(9, 2, pages.KIND_TEXT, seed=2)
    assert a == b
    assert built(9, 3, pages.KIND_TEXT) != a


def test_never_written_page_must_be_zero() -> None:
    assert pages.check_page(bytes(PS), 50, 0) is None


def test_wrong_index_is_detected() -> None:
    msg = pages.check_page(built(11, 1), 12, 1)
    assert msg is not None and "page 12" in msg and "holds page 11" in msg and "wrong page" in msg


@pytest.mark.parametrize(("have", "want"), [(1, 2), (5, 4)])
def test_stale_or_future_version_is_detected(have: int, want: int) -> None:
    msg = pages.check_page(built(20, have), 20, want)
    assert msg is not None and f"version {have}" in msg and f"expected {want}" in msg


def test_zero_page_where_data_was_expected_is_detected() -> None:
    msg = pages.check_page(bytes(PS), 33, 4)
    assert msg is not None and "zero page where version 4 was expected" in msg


def test_data_where_a_zero_page_was_expected_is_detected() -> None:
    msg = pages.check_page(built(40, 1), 40, 0)
    assert msg is not None and "expected a never-written (zero) page" in msg
    one_byte = bytearray(PS)
    one_byte[PS - 1] = 1
    assert pages.check_page(one_byte, 40, 0) is not None


def test_garbage_is_detected() -> None:
    msg = pages.check_page(bytes([0x5A]) * PS, 1, 1)
    assert msg is not None and "bad magic" in msg


def test_payload_bit_flip_is_a_checksum_mismatch() -> None:
    buf = built(60, 2)
    buf[2000] ^= 0x10
    msg = pages.check_page(buf, 60, 2)
    assert msg is not None and "checksum mismatch" in msg


def test_every_single_bit_flip_is_detected() -> None:
    for kind in (pages.KIND_TEXT, pages.KIND_RANDOM):
        good = built(77, 3, kind)
        for byte in range(PS):
            for bit in range(8):
                bad = bytearray(good)
                bad[byte] ^= 1 << bit
                assert pages.check_page(bad, 77, 3) is not None, f"flip of byte {byte} bit {bit} not detected"


@settings(max_examples=100, deadline=None)
@given(
    index=st.integers(0, 2**40),
    version=st.integers(1, 2**32 - 1),
    kind=st.sampled_from([pages.KIND_TEXT, pages.KIND_RANDOM]),
    seed=st.integers(0, 2**32),
)
def test_round_trip_any_index_and_version(index: int, version: int, kind: int, seed: int) -> None:
    buf = built(index, version, kind, seed)
    assert pages.check_page(buf, index, version) is None
    assert pages.check_page(buf, index + 1, version) is not None
    assert pages.check_page(buf, index, version + 1) is not None


def test_header_layout() -> None:
    assert pages.HEADER_SIZE == 32
    assert struct.pack("<I", pages.MAGIC) == b"MGPG"


# -- layout helpers -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("npages", "ps", "expected"),
    [(1, 4096, 1), (1024, 4096, 1), (1025, 4096, 2), (65536, 4096, 64), (16, 16, 4)],
)
def test_table_pages(npages: int, ps: int, expected: int) -> None:
    assert pages.table_pages(npages, ps) == expected
    assert pages.table_pages(npages, ps) * ps >= 4 * npages


def test_page_kind_comes_in_clusters_of_16() -> None:
    for cluster in range(200):
        kinds = {pages.page_kind(cluster * 16 + i, 40, 30) for i in range(16)}
        assert len(kinds) == 1


def test_page_kind_extremes_and_mix() -> None:
    idx = range(0, 16 * 1000, 16)
    assert {pages.page_kind(i, 100, 0) for i in idx} == {pages.KIND_ZERO}
    assert {pages.page_kind(i, 0, 100) for i in idx} == {pages.KIND_TEXT}
    assert {pages.page_kind(i, 0, 0) for i in idx} == {pages.KIND_RANDOM}
    kinds = [pages.page_kind(i, 40, 30) for i in idx]
    # roughly the requested mix (a hash, not a random draw: allow slack)
    assert 0.30 < kinds.count(pages.KIND_ZERO) / len(kinds) < 0.50
    assert 0.20 < kinds.count(pages.KIND_TEXT) / len(kinds) < 0.40


# -- workload -----------------------------------------------------------------------------


@pytest.mark.parametrize(("first", "npages", "nvcpus"), [(1, 16, 1), (1, 16, 2), (2, 100, 3), (4, 1000, 7), (1, 5, 8)])
def test_vcpus_partition_the_data_pages(first: int, npages: int, nvcpus: int) -> None:
    owners: dict[int, int] = {}
    for vcpu in range(nvcpus):
        owned = workload.owned_count(first, npages, vcpu, nvcpus)
        for slot in range(owned):
            page = workload.slot_to_page(slot, first, vcpu, nvcpus)
            assert first <= page < npages
            assert page not in owners, f"page {page} owned by vCPUs {owners.get(page)} and {vcpu}"
            owners[page] = vcpu
    assert sorted(owners) == list(range(first, npages))


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(workload.WORKLOADS),
    rng=st.integers(1, workload.MASK64),
    cursor=st.integers(0, 10**6),
    first=st.integers(1, 64),
    extra=st.integers(1, 5000),
    nvcpus=st.integers(1, 16),
    data=st.data(),
)
def test_next_slot_stays_within_owned_pages(
    kind: str, rng: int, cursor: int, first: int, extra: int, nvcpus: int, data: st.DataObject
) -> None:
    npages = first + extra
    vcpu = data.draw(st.integers(0, nvcpus - 1))
    owned = workload.owned_count(first, npages, vcpu, nvcpus)
    if owned == 0:
        return  # such a vCPU never runs the workload (guest_sim/vcpu.py)
    for _ in range(20):
        rng = workload.xorshift64(rng)
        slot, cursor = workload.next_slot(kind, rng, cursor, owned)
        assert 0 <= slot < owned
        page = workload.slot_to_page(slot, first, vcpu, nvcpus)
        assert first <= page < npages
        assert (page - first) % nvcpus == vcpu


def test_sequential_walks_every_owned_page_in_order() -> None:
    cursor, seen = 0, []
    for _ in range(10):
        slot, cursor = workload.next_slot("sequential", 1, cursor, 4)
        seen.append(slot)
    assert seen == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]


def test_hotset_mostly_hits_the_hot_tenth() -> None:
    owned, rng, hot_hits = 1000, 0x1234_5678_9ABC_DEF1, 0
    for _ in range(2000):
        rng = workload.xorshift64(rng)
        slot, _ = workload.next_slot("hotset", rng, 0, owned)
        hot_hits += slot < owned // 10
    assert hot_hits / 2000 > 0.85


@settings(max_examples=200, deadline=None)
@given(st.integers(1, workload.MASK64))
def test_xorshift64_stays_64_bit_and_nonzero(s: int) -> None:
    out = workload.xorshift64(s)
    assert 0 < out <= workload.MASK64
