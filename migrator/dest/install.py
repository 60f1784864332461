"""Install received pages into the guest: validate, claim, UFFDIO_COPY / ZEROPAGE.

A batch is validated completely before anything is installed: page range,
flag values, data length, and the CRC32 of every data page.  A batch that fails
any check raises ProtocolError and changes nothing in the guest.

Then the pages this caller wins in the page table are installed in contiguous
runs, one ioctl per run.  Races are normal: EEXIST means the kernel already has
the page (counted, skipped), EAGAIN means retry; both are counters here, not
errors.  UFFDIO_COPY wakes the vCPUs waiting on the range.
"""

from __future__ import annotations

import ctypes
import time
import zlib
from collections.abc import Callable, Sequence

import zstandard

from migrator import policy
from migrator.dest.pagetable import PageTable
from migrator.pagemaps import FLAG_DATA, FLAG_OMITTED, FLAG_ZERO, VALID_FLAGS
from migrator.errors import IntegrityError, PageExists, ProtocolError, RetryLater
from migrator.stats import DestStats
from migrator.uffd.fd import Userfaultfd
from migrator.wire import migration_pb2 as pb

MAX_EAGAIN = 1000


def buffer_address(data: bytes) -> int:
    """Address of a bytes object's contents (no copy; keep ``data`` alive)."""
    return ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0


class Installer:
    def __init__(self, uffd: Userfaultfd, table: PageTable, base: int, page_size: int, stats: DestStats) -> None:
        self.uffd = uffd
        self.table = table
        self.base = base
        self.ps = page_size
        self.npages = table.npages
        self.stats = stats
        self._zero_page = bytes(page_size)
        self._zero_addr = buffer_address(self._zero_page)
        self._dctx = zstandard.ZstdDecompressor()

    # -- validation ------------------------------------------------------------
    def decode(self, batch: pb.PageBatch) -> tuple[int, bytes]:
        """Validate a batch; returns (bytes on the wire, raw page data); raises ProtocolError."""
        first, count, flags = batch.first_page, batch.count, batch.flags
        if count == 0 or first >= self.npages or first + count > self.npages:
            raise ProtocolError("batch outside guest RAM", first=first, count=count, pages=self.npages)
        if len(flags) != count:
            raise ProtocolError("batch flags do not match its page count", count=count, flags=len(flags))
        if flags.translate(None, VALID_FLAGS):
            raise ProtocolError("batch has an unknown page flag", first=first)
        ndata = flags.count(FLAG_DATA)
        if len(batch.crc32) != ndata or batch.raw_size != ndata * self.ps:
            raise ProtocolError(
                "batch data does not match its flags", first=first, data_pages=ndata, crcs=len(batch.crc32), raw=batch.raw_size
            )
        data = batch.data  # one copy out of the message; take it once
        wire = len(data)
        if batch.codec == pb.CODEC_ZSTD:
            # python-zstandard trusts the frame's declared size over max_output_size:
            # check the declared size first, so a hostile frame cannot make us allocate.
            try:
                declared = zstandard.frame_content_size(data)
            except zstandard.ZstdError as exc:
                raise ProtocolError(f"bad zstd frame: {exc}", first=first) from exc
            if declared not in (-1, batch.raw_size):  # -1: not declared; max_output_size bounds it
                raise ProtocolError("zstd frame size does not match the batch", first=first, declared=declared, want=batch.raw_size)
            try:
                data = self._dctx.decompress(data, max_output_size=batch.raw_size)
            except zstandard.ZstdError as exc:
                raise ProtocolError(f"cannot decompress batch: {exc}", first=first) from exc
        elif batch.codec != pb.CODEC_NONE:
            raise ProtocolError("unknown codec", codec=batch.codec)
        if len(data) != batch.raw_size:
            raise ProtocolError("truncated or oversized batch data", first=first, got=len(data), want=batch.raw_size)
        ps = self.ps
        mv = memoryview(data)
        crcs = list(batch.crc32)
        for k in range(ndata):
            if zlib.crc32(mv[k * ps : (k + 1) * ps]) != crcs[k]:
                page = first + _nth_data_index(flags, k)
                raise IntegrityError("page failed its checksum", page=page)
        return wire, data

    # -- installing -------------------------------------------------------------
    def install(self, first: int, flags: bytes, data: bytes, channel: str) -> int:
        """Install the pages of a validated batch that nobody else has; returns pages installed."""
        mine = self.table.claim(first, flags)
        n = len(flags)
        received = n - flags.count(FLAG_OMITTED)
        won = mine.count(1)
        # what to do per page: the flag where the page is ours, else 0 (skip)
        kind = flags if won == n else bytes(f if m else 0 for f, m in zip(flags, mine))
        src = buffer_address(data)
        ps = self.ps
        n_data = n_zero = 0
        try:
            for value, i, j in policy.value_runs(kind):
                if value == FLAG_DATA:
                    d = flags.count(FLAG_DATA, 0, i)  # page i's index among the data pages
                    self._copy_run(self.base + (first + i) * ps, src + d * ps, (j - i) * ps)
                    n_data += j - i
                elif value == FLAG_ZERO:
                    self._zero_run(self.base + (first + i) * ps, (j - i) * ps)
                    n_zero += j - i
        except BaseException:
            self.table.unclaim(first, mine)
            raise
        woken = self.table.installed(first, mine)
        now = time.perf_counter_ns()
        st = self.stats
        with st.lock:
            if channel == "demand":
                st.pages_demand += n_data
            else:
                st.pages_prefetch += n_data
            st.pages_zero += n_zero
            st.duplicates += received - won
            st.record_resolved(woken, now)
            st.timeline.append((now, channel, won, 0))
        return won

    def install_zero(self, page: int, write: bool) -> None:
        """Resolve a fault on a known-zero page locally, without the network.

        A write fault gets a private zero page by UFFDIO_COPY (one fault); a
        read fault gets the shared zero page (cheaper now, one CoW fault later
        if the guest writes it).
        """
        mine = self.table.claim(page, b"\x02")
        if not mine[0]:
            return
        dst = self.base + page * self.ps
        try:
            if write:
                self._copy_run(dst, self._zero_addr, self.ps)
            else:
                self._zero_run(dst, self.ps)
        except BaseException:
            self.table.unclaim(page, mine)
            raise
        woken = self.table.installed(page, mine)
        now = time.perf_counter_ns()
        with self.stats.lock:
            self.stats.pages_zero += 1
            self.stats.pages_zero_local += 1
            self.stats.record_resolved(woken, now)
            self.stats.timeline.append((now, "zero", 1, 0))

    def install_zero_range(self, first: int, count: int) -> int:
        """Map a run of known-zero pages (those still missing); returns pages mapped."""
        return self.install(first, bytes([FLAG_ZERO]) * count, b"", "zero")

    def _copy_run(self, dst: int, src: int, length: int) -> None:
        def op(off: int, n: int) -> int:
            if n == self.ps:  # the fast single-page ioctl: nothing copied when it fails
                self.uffd.copy_page(dst + off, src + off, n)
                return n
            return self.uffd.copy(dst + off, src + off, n)

        self._fill(op, length)

    def _zero_run(self, dst: int, length: int) -> None:
        self._fill(lambda off, n: self.uffd.zeropage(dst + off, n), length)

    def _fill(self, op: Callable[[int, int], int], length: int) -> None:
        """Run a COPY/ZEROPAGE ioctl over [0, length) to the end, across the benign races.

        EEXIST: the kernel stopped at a page that is already there: skip it.
        EAGAIN with progress: a run stopped early: go on from there.
        EAGAIN without progress: the address space is changing: retry, bounded.
        """
        done = tries = 0
        while done < length:
            try:
                done += op(done, length - done)
            except PageExists as exc:
                done += getattr(exc, "copied", 0) + self.ps
                self.stats.add(kernel_eexist=1)
            except RetryLater as exc:
                copied = getattr(exc, "copied", 0)
                done += copied
                if copied:
                    continue
                tries += 1
                self.stats.add(kernel_eagain=1)
                if tries > MAX_EAGAIN:
                    raise
                time.sleep(0.0001)


def _nth_data_index(flags: Sequence[int] | bytes, k: int) -> int:
    seen = -1
    for i, f in enumerate(flags):
        if f == FLAG_DATA:
            seen += 1
            if seen == k:
                return i
    return -1
