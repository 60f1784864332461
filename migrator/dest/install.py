"""Install received pages into the guest: validate, then UFFDIO_COPY / ZEROPAGE runs.

A batch is validated completely before anything is installed: page range,
flag values, data length, codec, and the XXH3-64 of its data.  A batch that
fails any check raises ProtocolError and changes nothing in the guest.

Then every page the batch carries that is not PRESENT yet is installed, in
contiguous runs, one ioctl per run, straight from the received message (no
copy: ``wire/fastbatch.py``).  Races with other installers (another process's
copy of the same page) are settled by the kernel: ``EEXIST`` means the page is
already there (counted as a duplicate, skipped).  ``EAGAIN`` means the guest's
address space is changing (a memory event is queued): the installer lets its
gate go, waits for the fault process to read the events, and checks again
(``gate.py``: why a check and its ioctl happen under the gate).
``UFFDIO_COPY`` wakes the vCPUs waiting on the range.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import xxhash
import zstandard

from migrator import policy
from migrator.dest.gate import CHUNK_PAGES, Gate, wait_for_events
from migrator.dest.pagestate import DISCARDED, EVENTS, PRESENT, Counters, PageState
from migrator.errors import IntegrityError, PageExists, ProtocolError, RetryLater, Unmapped
from migrator.pagemaps import FLAG_DATA, FLAG_OMITTED, FLAG_ZERO, VALID_FLAGS
from migrator.uffd.fd import Userfaultfd
from migrator.wire import fastbatch
from migrator.wire import migration_pb2 as pb

MAX_WAITS = 50  # times 0.2 s at most each (wait_for_events)


def buffer_address(data: bytes) -> int:
    """Address of a bytes object's contents (no copy; keep ``data`` alive)."""
    return ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0


class Decoded:
    """A validated batch: its header fields and its raw page data (kept alive here)."""

    __slots__ = ("batch", "data", "address")

    def __init__(self, batch: fastbatch.Batch, data: bytes, address: int) -> None:
        self.batch, self.data, self.address = batch, data, address


class Installer:
    def __init__(self, uffd: Userfaultfd, ps: PageState, base: int, page_size: int, counters: Counters,
                 gate: Gate | None = None, slot: int = 0) -> None:  # fmt: skip
        self.uffd = uffd
        self.gate, self.slot = gate, slot  # None: no events to wait for (a uffd without EVENT_* features)
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
        """Install the pages of a validated batch that are still to install (not present,
        not discarded or unmapped by the guest); returns pages installed.  In chunks of
        ``CHUNK_PAGES``, each checked and installed with this installer's gate held."""
        b = d.batch
        first, flags, n = b.first_page, b.flags, b.count
        ps = self.psize
        acc = [0, 0, 0]  # data pages, zero pages, pages found discarded/unmapped
        data_before = 0  # data pages of the batch before the chunk
        for c0 in range(0, n, CHUNK_PAGES):
            c1 = min(n, c0 + CHUNK_PAGES)
            cflags = flags[c0:c1]
            base_addr = d.address + data_before * ps

            dead = [0]

            def chunk(c0: int = c0, c1: int = c1, cflags: bytes = cflags, base_addr: int = base_addr) -> None:
                mask = self.ps.not_present_mask(first + c0, c1 - c0)
                dead[0] = self.ps.dead_count(first + c0, c1 - c0, cflags)
                if mask.count(0):  # some are here already (or gone): install only the others
                    kind = (int.from_bytes(cflags, "little") & int.from_bytes(mask, "little")).to_bytes(c1 - c0, "little")
                else:
                    kind = cflags
                for value, i, j in policy.value_runs(kind):
                    k = 0 if value == FLAG_DATA else 1
                    try:
                        if value == FLAG_DATA:
                            di = cflags.count(FLAG_DATA, 0, i)  # page i's index among the chunk's data pages
                            acc[0] += self._copy_run(first + c0 + i, j - i, base_addr + di * ps)
                        elif value == FLAG_ZERO:
                            acc[1] += self._fill(first + c0 + i, j - i, self._zero_op)
                    except (RetryLater, Unmapped) as exc:
                        acc[k] += getattr(exc, "taken", 0)  # installed before the refusal: counted once
                        raise

            self._gated(chunk)
            acc[2] += dead[0]
            data_before += cflags.count(FLAG_DATA)
        n_data, n_zero = acc[0], acc[1]
        c = self.c
        c.add("installed", n_data + n_zero)
        c.add("data_pages", n_data)
        c.add("zero_pages", n_zero)
        # received, and present already (another installer's): skipped or refused by the kernel
        c.add("duplicates", max(0, n - flags.count(FLAG_OMITTED) - n_data - n_zero - acc[2]))
        return n_data + n_zero

    def install_zero(self, page: int, write: bool, wait: bool = True) -> bool:
        """Resolve a fault on a known-zero page here, without the network.

        A write fault gets a private zero page by UFFDIO_COPY (one fault); a
        read fault gets the shared zero page (cheaper now, one CoW fault later
        if the guest writes it).  False if another installer was first (or the
        page is no longer to install).  ``wait=False`` (a fault thread, which
        reads the events itself): raises RetryLater/Unmapped instead of waiting.
        """
        done = [0]

        def one() -> None:
            if self.ps.not_present_mask(page, 1) != b"\xff":
                return
            if write:
                done[0] = self._copy_run(page, 1, self._zero_addr)
            else:
                done[0] = self._fill(page, 1, self._zero_op)  # one page: nothing taken if refused

        self._gated(one, wait)
        self.c.add("installed", done[0])
        self.c.add("zero_pages", done[0])
        self.c.add("zero_local", done[0])
        return bool(done[0])

    def install_discarded(self, page: int, write: bool, wait: bool = True) -> bool:
        """A fault on a page the guest discarded (or one present in our table but no
        longer in the guest's: zapped by a discard after its install): it reads as
        zeros, the kernel's promise for a discarded anonymous page.  Installs a zero
        page if the kernel has none there; False if it has one (EEXIST: wake only)
        or the page is neither (``wait``: as for :meth:`install_zero`)."""
        done = [False]

        def one() -> None:
            if self.ps.state[page] not in (PRESENT, DISCARDED):
                return  # moved on meanwhile (e.g. dropped for a new copy): the caller wakes
            try:
                self._zero_at(self.ps.address(page) or self.base + page * self.psize, write)
            except PageExists:
                self.ps.state[page] = PRESENT
                return
            self.ps.mark_present(page, 1)
            self.c.add("zero_local")
            done[0] = True

        self._gated(one, wait)
        return done[0]

    def install_zero_at(self, address: int, write: bool) -> bool:
        """A fault at an address of registered memory that is no page of guest RAM (the
        tail an mremap grew): new anonymous memory reads as zeros.  False if the
        kernel has a page there or the range is not registered (wake only); raises
        RetryLater while the address space is changing."""
        try:
            self._zero_at(address & ~(self.psize - 1), write)
        except (PageExists, Unmapped):
            return False
        self.c.add("zero_local")
        return True

    def _zero_at(self, addr: int, write: bool) -> None:
        """One zero page at ``addr``: a private copy for a write fault (one fault), the
        shared zero page for a read."""
        if write:
            self.uffd.copy_page(addr, self._zero_addr, self.psize)
        else:
            self.uffd.zeropage(addr, self.psize)

    def install_zero_range(self, first: int, count: int) -> int:
        """Map the pages of a run of known-zero pages that are still to install."""
        done = [0]
        for c0 in range(0, count, CHUNK_PAGES):
            c1 = min(count, c0 + CHUNK_PAGES)

            def chunk(c0: int = c0, c1: int = c1) -> None:
                mask = self.ps.not_present_mask(first + c0, c1 - c0)
                for value, i, j in policy.value_runs(mask.replace(b"\xff", b"\x02")):
                    if value == 2:
                        try:
                            done[0] += self._fill(first + c0 + i, j - i, self._zero_op)
                        except (RetryLater, Unmapped) as exc:
                            done[0] += getattr(exc, "taken", 0)
                            raise

            self._gated(chunk)
        self.c.add("installed", done[0])
        self.c.add("zero_pages", done[0])
        return done[0]

    def _gated(self, fn: Callable[[], None], wait: bool = True) -> None:
        """Run ``fn`` (a check of pages and the ioctls installing them) with this
        installer's gate held.  When the kernel refuses because the guest's address
        space is changing (EAGAIN: an event is queued, unread) or a range is not
        guest RAM any more (ENOENT: unmapped), let the gate go, wait until the fault
        process has read the guest's events (``EVENTS`` moves), and run ``fn`` again:
        it checks the pages again (now discarded, unmapped or moved).  Raises the
        kernel's error if it persists (``MAX_WAITS`` waits, ~10 s), or at once with
        ``wait=False``: a fault thread reads the events itself (``fault.py``)."""
        waits = 0
        while True:
            seen = self.ps.words[EVENTS]
            with self._gate():
                try:
                    fn()
                    return
                except (RetryLater, Unmapped) as exc:
                    err = exc
            waits += 1
            self.c.add("kernel_eagain")
            if not wait or waits > MAX_WAITS:
                raise err
            wait_for_events(self.ps.words, seen)

    def _gate(self) -> AbstractContextManager[None]:
        return self.gate.installing(self.slot) if self.gate is not None else nullcontext()

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
        """Run a COPY/ZEROPAGE ioctl over ``count`` pages from ``page``, at their
        addresses now (``PageState.address_runs``: a remap moves some), across the
        benign races; marks what the kernel took PRESENT; returns how many.

        EEXIST: the kernel stopped at a page that is already there: skip it.
        EAGAIN with progress: a run stopped early: go on from there.
        EAGAIN or ENOENT without progress: raised, with ``taken`` (pages installed
        before it) for the caller's counts (``_gated`` waits for the events).
        """
        psize = self.psize
        taken = 0
        off = 0  # bytes of the source run before this address run
        try:
            for rpage, rcount, addr in self.ps.address_runs(page, count, self.base, psize):
                length = rcount * psize
                done = 0
                mark_from = 0  # start (bytes) of the pages taken and not yet marked
                try:
                    while done < length:
                        try:
                            got = op(addr + done, off + done, length - done)
                            done += got
                            taken += got
                        except PageExists as exc:
                            copied = getattr(exc, "copied", 0)
                            taken += copied
                            done += copied
                            self._mark(rpage, mark_from, done)
                            self.ps.state[rpage + done // psize] = PRESENT  # someone else's install (it may not have said so yet)
                            done += psize
                            mark_from = done
                            self.c.add("kernel_eexist")
                        except RetryLater as exc:
                            copied = getattr(exc, "copied", 0)
                            if not copied:
                                raise
                            done += copied
                            taken += copied
                finally:
                    self._mark(rpage, mark_from, done)
                off += length
        except (RetryLater, Unmapped) as exc:
            setattr(exc, "taken", taken // psize)  # noqa: B010 - read by the callers (getattr)
            raise
        return taken // psize

    def _mark(self, page: int, start: int, end: int) -> None:
        if end > start:
            ps = self.psize
            self.ps.mark_present(page + start // ps, (end - start) // ps)
