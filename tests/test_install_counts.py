"""Counts stay true when an install is refused part way (EAGAIN: the guest's address space changing).

``Installer._fill`` raises RetryLater when an ioctl makes no progress, even if an
earlier ioctl of the same run (or an earlier address run) did install pages; those
pages are marked PRESENT (its ``finally``) but their count is lost with the
exception, and on the retry they are skipped as present, so ``install()`` counts
them as *duplicates* instead of installed data pages.  No kernel needed: a
stand-in uffd plays the kernel's answers (a partial copy reported as EAGAIN with
``copy`` > 0, then EAGAIN with nothing copied because an event got queued).
"""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from migrator.dest.install import Decoded, Installer
from migrator.dest.pagestate import PageState
from migrator.errors import RetryLater
from migrator.pagemaps import FLAG_DATA

PS = 4096


class FakeUffd:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def copy(self, dst: int, src: int, length: int) -> int:
        self.calls.append((dst, length))
        n = len(self.calls)
        if n == 1:  # the kernel copied 2 pages, then stopped (reported as EAGAIN with copy = 2 pages)
            exc = RetryLater("UFFDIO_COPY: address space changing, retry")
            exc.copied = 2 * PS  # type: ignore[attr-defined]
            raise exc
        if n == 2:  # an event is queued now: nothing copied
            exc = RetryLater("UFFDIO_COPY: address space changing, retry")
            exc.copied = 0  # type: ignore[attr-defined]
            raise exc
        return length

    def copy_page(self, dst: int, src: int, length: int) -> None:
        self.copy(dst, src, length)


@pytest.fixture
def ps() -> Iterator[PageState]:
    p = PageState.create(64)
    yield p
    p.close()


def test_pages_installed_before_an_eagain_are_counted_installed_not_duplicates(ps: PageState) -> None:
    c = ps.counters(1)
    inst = Installer(FakeUffd(), ps, 0x10000000, PS, c)  # type: ignore[arg-type]
    batch = SimpleNamespace(first_page=8, count=8, flags=bytes([FLAG_DATA]) * 8)
    n = inst.install(Decoded(batch, b"", 0x20000000), "bulk")  # type: ignore[arg-type]
    assert bytes(ps.state[8:16]) == b"\x03" * 8  # every page is present in the end
    got = {k: c.get(k) for k in ("installed", "data_pages", "duplicates")}
    assert (n, got) == (8, {"installed": 8, "data_pages": 8, "duplicates": 0}), (n, got)
