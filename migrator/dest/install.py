"""Install received pages into the guest: validate, then UFFDIO_COPY / ZEROPAGE runs.

A batch is validated completely before anything is installed: page range,
flag values, data length, codec, and the XXH3-64 of its data.  A batch that
fails any check raises ProtocolError and changes nothing in the guest.

Then every page the batch carries that is not PRESENT yet is installed, in
contiguous runs, one ioctl per run, straight from the received message (no
copy: ``wire/fastbatch.py``).  Races with other installers (another process's
copy of the same page) are settled by the kernel: ``EEXIST`` means the page is
already there (counted as a duplicate, skipped), ``EAGAIN`` means the address
space is changing (retried).  ``UFFDIO_COPY`` wakes the vCPUs waiting on the
range.  See ``pagestate.py`` for why this needs no lock.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable

import xxhash
import zstandard

from migrator import policy
from migrator.dest.pagestate import PRESENT, Counters, PageState
from migrator.errors import IntegrityError, PageExists, ProtocolError, RetryLater
from migrator.pagemaps import FLAG_DATA, FLAG_OMITTED, FLAG_ZERO, VALID_FLAGS
from migrator.uffd.fd import Userfaultfd
from migrator.wire import fastbatch
from migrator.wire import migration_pb2 as pb

MAX_EAGAIN = 1000


def buffer_address(data: bytes) -> int:
    """Address of a bytes object's contents (no copy; keep ``data`` alive)."""
    return ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0


class Decoded:
    """A validated batch: its header fields and its raw page data (kept alive here)."""

    __slots__ = ("batch", "data", "address")

    def __init__(self, batch: fastbatch.Batch, data: bytes, address: int) -> None:
        self.batch, self.data, self.address = batch, data, address


class Installer:
    def __init__(self, uffd: Userfaultfd, ps: PageState, base: int, page_size: int, counters: Counters) -> None:
        self.uffd = uffd
        self.ps = ps
        self.base = base
        self.psize = page_size
        self.npages = ps.npages
        self.c = counters
        self._zero_page = bytes(page_size)
        self._zero_addr = buffer_address(self._zero_page)
        self._dctx = zstandard.ZstdDecompressor()

    # -- validation ------------------------------------------------------------
    def decode(self, raw: bytes, epoch: int) -> Decoded:
        """Parse and validate one serialized PageBatch; raises ProtocolError."""
        try:
            b = fastbatch.decode(raw)
        except ValueError as exc:
            raise ProtocolError(f"undecodable batch: {exc}") from None
        if b.epoch != epoch:
            raise ProtocolError("a batch of another migration", epoch=f"{b.epoch:x}", ours=f"{epoch:x}")
        if b.last:
            return Decoded(b, b"", 0)
        first, count, flags = b.first_page, b.count, b.flags
        if count == 0 or first >= self.npages or first + count > self.npages:
            raise ProtocolError("batch outside guest RAM", first=first, count=count, pages=self.npages)
        if len(flags) != count:
            raise ProtocolError("batch flags do not match its page count", count=count, flags=len(flags))
        if flags.translate(None, VALID_FLAGS):
            raise ProtocolError("batch has an unknown page flag", first=first)
        ndata = flags.count(FLAG_DATA)
        if b.raw_size != ndata * self.psize:
            raise ProtocolError("batch data does not match its flags", first=first, data_pages=ndata, raw=b.raw_size)
        data: bytes
        if b.codec == pb.CODEC_ZSTD:
            data = self._decompress(b, first)
            address = buffer_address(data)
        elif b.codec == pb.CODEC_NONE:
            if len(b.data) != b.raw_size:
                raise ProtocolError("truncated or oversized batch data", first=first, got=len(b.data), want=b.raw_size)
            data = raw  # the pages stay where they arrived: installed from there
            address = buffer_address(raw) + b.data_offset
        else:
            raise ProtocolError("unknown codec", codec=b.codec)
        view = b.data if b.codec == pb.CODEC_NONE else memoryview(data)
        if ndata and xxhash.xxh3_64_intdigest(view) != b.xxh3:
            raise IntegrityError("batch failed its checksum", first=first, count=count)
        return Decoded(b, data, address)

    def _decompress(self, b: fastbatch.Batch, first: int) -> bytes:
        # python-zstandard trusts the frame's declared size over max_output_size:
        # check the declared size first, so a hostile frame cannot make us allocate.
        frame = bytes(b.data)
        try:
            declared = zstandard.frame_content_size(frame)
        except zstandard.ZstdError as exc:
            raise ProtocolError(f"bad zstd frame: {exc}", first=first) from exc
        if declared not in (-1, b.raw_size):  # -1: not declared; max_output_size bounds it
            raise ProtocolError("zstd frame size does not match the batch", first=first, declared=declared, want=b.raw_size)
        try:
            data = self._dctx.decompress(frame, max_output_size=b.raw_size)
        except zstandard.ZstdError as exc:
            raise ProtocolError(f"cannot decompress batch: {exc}", first=first) from exc
        if len(data) != b.raw_size:
            raise ProtocolError("truncated or oversized batch data", first=first, got=len(data), want=b.raw_size)
        return data

    # -- installing -------------------------------------------------------------
    def install(self, d: Decoded, channel: str) -> int:
        """Install the pages of a validated batch that are not present yet; returns pages installed."""
        b = d.batch
        first, flags, n = b.first_page, b.flags, b.count
        mask = self.ps.not_present_mask(first, n)
        received = n - flags.count(FLAG_OMITTED)
        if mask.count(0):  # some are here already: install only the others
            kind = (int.from_bytes(flags, "little") & int.from_bytes(mask, "little")).to_bytes(n, "little")
        else:
            kind = flags
        ps = self.psize
        n_data = n_zero = 0
        for value, i, j in policy.value_runs(kind):
            if value == FLAG_DATA:
                di = flags.count(FLAG_DATA, 0, i)  # page i's index among the data pages
                n_data += self._copy_run(first + i, j - i, d.address + di * ps)
            elif value == FLAG_ZERO:
                n_zero += self._fill(first + i, j - i, self._zero_op)
        c = self.c
        c.add("installed", n_data + n_zero)
        c.add("data_pages", n_data)
        c.add("zero_pages", n_zero)
        c.add("duplicates", received - (kind.count(FLAG_DATA) + kind.count(FLAG_ZERO)))  # present already: skipped
        return n_data + n_zero

    def install_zero(self, page: int, write: bool) -> bool:
        """Resolve a fault on a known-zero page here, without the network.

        A write fault gets a private zero page by UFFDIO_COPY (one fault); a
        read fault gets the shared zero page (cheaper now, one CoW fault later
        if the guest writes it).  False if another installer was first.
        """
        if write:
            done = self._copy_run(page, 1, self._zero_addr)
        else:
            done = self._fill(page, 1, self._zero_op)
        self.c.add("installed", done)
        self.c.add("zero_pages", done)
        self.c.add("zero_local", done)
        return bool(done)

    def install_zero_range(self, first: int, count: int) -> int:
        """Map the pages of a run of known-zero pages that are still missing."""
        mask = self.ps.not_present_mask(first, count)
        done = 0
        for value, i, j in policy.value_runs(mask.replace(b"\xff", b"\x02")):
            if value == 2:
                done += self._fill(first + i, j - i, self._zero_op)
        self.c.add("installed", done)
        self.c.add("zero_pages", done)
        return done

    def _copy_run(self, page: int, count: int, src: int) -> int:
        def op(dst: int, off: int, length: int) -> int:
            if length == self.psize:  # the fast single-page ioctl: nothing copied when it fails
                self.uffd.copy_page(dst, src + off, length)
                return length
            return self.uffd.copy(dst, src + off, length)

        return self._fill(page, count, op)

    def _zero_op(self, dst: int, _off: int, length: int) -> int:
        return self.uffd.zeropage(dst, length)

    def _fill(self, page: int, count: int, op: Callable[[int, int, int], int]) -> int:
        """Run a COPY/ZEROPAGE ioctl over ``count`` pages from ``page`` to the end,
        across the benign races; marks what the kernel took PRESENT; returns how many.

        EEXIST: the kernel stopped at a page that is already there: skip it.
        EAGAIN with progress: a run stopped early: go on from there.
        EAGAIN without progress: the address space is changing: retry, bounded.
        """
        ps, base = self.psize, self.base
        length = count * ps
        done = taken = tries = 0
        mark_from = 0  # start (bytes) of the pages taken and not yet marked
        while done < length:
            dst = base + page * ps + done
            try:
                got = op(dst, done, length - done)
                done += got
                taken += got
                continue
            except PageExists as exc:
                copied = getattr(exc, "copied", 0)
                taken += copied
                done += copied
                self._mark(page, mark_from, done)
                self.ps.state[page + done // ps] = PRESENT  # someone else's install (it may not have said so yet)
                done += ps
                mark_from = done
                self.c.add("kernel_eexist")
            except RetryLater as exc:
                copied = getattr(exc, "copied", 0)
                done += copied
                taken += copied
                if copied:
                    continue
                tries += 1
                self.c.add("kernel_eagain")
                if tries > MAX_EAGAIN:
                    raise
                time.sleep(0.0001)
        self._mark(page, mark_from, done)
        self.c.add("duplicates", count - taken // ps)
        return taken // ps

    def _mark(self, page: int, start: int, end: int) -> None:
        if end > start:
            ps = self.psize
            self.ps.mark_present(page + start // ps, (end - start) // ps)
