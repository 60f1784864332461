"""Turn a range of frozen guest RAM into one PageBatch.

Per page: never-touched pages (pagemap) and pages whose content is all zero
travel as a flag byte, no data; data pages are concatenated in order, each
with a CRC32 of its bytes; the concatenation is zstd-compressed when the
destination asked for it.  Pages outside ``include`` are flagged omitted (the
other channel already sent them).
"""

from __future__ import annotations

import time
import zlib
from typing import Protocol

import zstandard

from migrator.pagemaps import FLAG_DATA, FLAG_ZERO
from migrator.wire import migration_pb2 as pb



class PageReader(Protocol):
    """Where a batch's pages come from: a paused guest (RamReader) or an image."""

    page_size: int

    def read_into(self, first: int, buf: memoryview) -> None: ...


class BatchBuilder:
    """Builds batches with one reusable read buffer; one builder per thread."""

    def __init__(self, reader: PageReader, untouched: bytes, max_pages: int, zstd_level: int = 1) -> None:
        self.reader = reader
        self.ps = reader.page_size
        self.untouched = untouched
        self.max_pages = max_pages
        self._buf = bytearray(max_pages * self.ps)
        self._view = memoryview(self._buf)
        self._zero = bytes(self.ps)
        self._cctx = zstandard.ZstdCompressor(level=zstd_level)
        self.pages_data = 0
        self.pages_zero = 0
        self.bytes_raw = 0
        self.bytes_wire = 0

    def build(self, first: int, count: int, include: bytes | bytearray | None, codec: int, request_id: int = 0) -> pb.PageBatch:
        """``include``: one byte per page, nonzero = send it; None = send all."""
        assert 0 < count <= self.max_pages
        ps, view, zero = self.ps, self._view, self._zero
        flags = bytearray(count)
        crcs: list[int] = []
        chunks: list[memoryview] = []
        untouched = self.untouched
        i = 0
        while i < count:
            # one read per run of pages that must be sent and were touched
            if (include is not None and not include[i]) or untouched[first + i]:
                if untouched[first + i] and (include is None or include[i]):
                    flags[i] = FLAG_ZERO
                i += 1
                continue
            j = i + 1
            while j < count and (include is None or include[j]) and not untouched[first + j]:
                j += 1
            self.reader.read_into(first + i, view[i * ps : j * ps])
            for k in range(i, j):
                page = view[k * ps : (k + 1) * ps]
                if page == zero:
                    flags[k] = FLAG_ZERO
                else:
                    flags[k] = FLAG_DATA
                    crcs.append(zlib.crc32(page))
                    chunks.append(page)
            i = j
        raw = b"".join(chunks)
        data = raw
        if codec == pb.CODEC_ZSTD and raw:
            data = self._cctx.compress(raw)
        ndata = len(crcs)
        self.pages_data += ndata
        self.pages_zero += flags.count(FLAG_ZERO)
        self.bytes_raw += len(raw)
        self.bytes_wire += len(data)
        return pb.PageBatch(
            request_id=request_id,
            first_page=first,
            count=count,
            flags=bytes(flags),
            codec=pb.Codec.Name(codec if raw else pb.CODEC_NONE),
            data=data,
            raw_size=len(raw),
            crc32=crcs,
            sent_unix_ns=time.time_ns(),
        )
