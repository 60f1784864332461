"""migrator.policy (pure functions) and migrator.config.parse_size."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migrator import policy
from migrator.config import parse_size

# -- runs_of ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "value", "max_run", "expected"),
    [
        (b"", 1, 8, []),
        (b"\x00\x00\x00", 1, 8, []),
        (b"\x01\x01\x01", 1, 8, [(0, 3)]),
        (b"\x00\x01\x01\x00\x01", 1, 8, [(1, 2), (4, 1)]),
        (b"\x01\x01\x01\x01\x01", 1, 2, [(0, 2), (2, 2), (4, 1)]),
        (b"\x02\x01\x02\x02", 2, 8, [(0, 1), (2, 2)]),
        (b"\x00\x01\x00", 0, 1, [(0, 1), (2, 1)]),
        (bytearray(b"\x01\x00\x01\x01"), 1, 8, [(0, 1), (2, 2)]),
    ],
)
def test_runs_of_examples(flags: bytes, value: int, max_run: int, expected: list[tuple[int, int]]) -> None:
    assert list(policy.runs_of(flags, value, max_run)) == expected


@settings(max_examples=300, deadline=None)
@given(
    flags=st.binary(max_size=200).map(lambda b: bytes(x % 3 for x in b)),
    value=st.integers(0, 2),
    max_run=st.integers(1, 20),
)
def test_runs_of_covers_exactly_the_matching_pages(flags: bytes, value: int, max_run: int) -> None:
    runs = list(policy.runs_of(flags, value, max_run))
    covered: list[int] = []
    for first, count in runs:
        assert 1 <= count <= max_run
        assert all(flags[i] == value for i in range(first, first + count))
        covered.extend(range(first, first + count))
    # in order, no overlap, and every matching page is in some run
    assert covered == [i for i, f in enumerate(flags) if f == value]
    # maximal: a run shorter than max_run is never followed by a matching page
    for first, count in runs:
        end = first + count
        if count < max_run and end < len(flags):
            assert flags[end] != value
        if first > 0 and flags[first - 1] == value:
            # it only starts mid-stretch because the previous run was split at max_run
            assert any(f + c == first and c == max_run for f, c in runs)


# -- should_seek -----------------------------------------------------------------


def test_should_seek_never_within_the_minimum_interval() -> None:
    just_before = policy.SEEK_MIN_INTERVAL_S / 2
    assert not policy.should_seek(10_000, 0, just_before)
    assert not policy.should_seek(10_000, -1, just_before)


def test_should_seek_when_stream_has_no_position() -> None:
    assert policy.should_seek(0, -1, policy.SEEK_MIN_INTERVAL_S)
    assert policy.should_seek(5, -1, 10.0)


@pytest.mark.parametrize("direction", [1, -1])
def test_should_seek_at_the_minimum_distance_only(direction: int) -> None:
    cur = 100_000
    d = policy.SEEK_MIN_DISTANCE
    assert policy.should_seek(cur + direction * d, cur, 1.0)
    assert not policy.should_seek(cur + direction * (d - 1), cur, 1.0)
    assert not policy.should_seek(cur, cur, 1.0)


# -- codec choice ------------------------------------------------------------------


@pytest.mark.parametrize(("requested", "expected"), [("auto", "none"), ("none", "none"), ("zstd", "zstd")])
def test_initial_codec(requested: str, expected: str) -> None:
    assert policy.initial_codec(requested) == expected


def test_auto_never_compresses_on_loopback() -> None:
    assert not policy.auto_wants_zstd(True, link_bytes_per_s=1.0, zstd_bytes_per_s=1e12)


@pytest.mark.parametrize(
    ("link", "zstd", "expected"),
    [
        (100e6, 1e9, True),  # slow link, fast compressor: compress
        (10e9, 1e9, False),  # link faster than the compressor: don't
        (1e9, 1e9, False),  # equal: compressing cannot pay for its CPU
    ],
)
def test_auto_compresses_only_when_link_is_slower_than_compressor(link: float, zstd: float, expected: bool) -> None:
    assert policy.auto_wants_zstd(False, link, zstd) is expected


# -- config.parse_size -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("4096", 4096),
        ("17b", 17),
        ("4k", 4096),
        ("4K", 4096),
        ("4KiB", 4096),
        ("4kb", 4000),
        ("256MiB", 256 << 20),
        ("256m", 256 << 20),
        ("3MB", 3_000_000),
        ("1GiB", 1 << 30),
        ("1gib", 1 << 30),
        ("2G", 2 << 30),
        ("2GB", 2_000_000_000),
        (" 64 MiB ", 64 << 20),
    ],
)
def test_parse_size_good(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", " ", "MiB", "1.5GiB", "-1", "+1", "1 TiB", "1 XB", "1e6", "0x100", "1 MiB 2", "1MiB!", "one"],
)
def test_parse_size_bad(text: str) -> None:
    with pytest.raises(ValueError, match="not a size") as info:
        parse_size(text)
    assert repr(text) in str(info.value)  # the message quotes what the user typed
