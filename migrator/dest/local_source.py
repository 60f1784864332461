"""A page source in this process: a RAM image served with the same batches as
the gRPC source (the transport seam, httpx's MockTransport for us).

The destination pipeline (fault threads, page table, installer, prefetcher)
runs unchanged against it, so the fault path can be tested and measured
without a network.  The image is only data here: the guest whose RAM faults is
still its own process.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import zstandard

from migrator import PROTOCOL_VERSION
from migrator.source.batches import BatchBuilder
from migrator.pagemaps import FLIP01
from migrator.wire import migration_pb2 as pb


class _ImageReader:
    def __init__(self, image: bytes | bytearray | memoryview, page_size: int) -> None:
        self.image = memoryview(image)
        self.page_size = page_size

    def read_into(self, first: int, buf: memoryview) -> None:
        off = first * self.page_size
        buf[:] = self.image[off : off + len(buf)]


class _LocalDemand:
    def __init__(self, src: "LocalPageSource") -> None:
        self._src = src
        self._q: queue.SimpleQueue[tuple[int, int, int] | None] = queue.SimpleQueue()

    def request(self, request_id: int, first: int, count: int) -> None:
        self._q.put((request_id, first, count))

    def responses(self) -> Iterator[pb.PageBatch]:
        builder = BatchBuilder(self._src.reader, self._src.untouched, 256)
        while (item := self._q.get()) is not None:
            rid, first, count = item
            batch = builder.build(first, count, None, pb.CODEC_NONE, request_id=rid)
            batch.epoch = self._src.epoch
            yield batch

    def close(self) -> None:
        self._q.put(None)


class _LocalBulk:
    def __init__(self, src: "LocalPageSource", codec: int, batch_pages: int, seek: int) -> None:
        self._src, self._codec, self._batch = src, codec, batch_pages or 512
        self._pos = seek
        self._closed = threading.Event()

    def seek(self, page: int) -> None:
        self._pos = page

    def set_codec(self, codec: int) -> None:
        self._codec = codec

    def responses(self) -> Iterator[pb.PageBatch]:
        src = self._src
        builder = BatchBuilder(src.reader, src.untouched, self._batch)
        need = bytearray(src.untouched)  # 0 = still to send
        zero_map: bytes | None = zstandard.ZstdCompressor().compress(src.untouched)
        while not self._closed.is_set():
            p = need.find(0, self._pos)
            if p < 0:
                p = need.find(0)
            if p < 0:
                break
            end = min(p + self._batch, src.npages)
            include = need[p:end].translate(FLIP01)
            need[p:end] = b"\x01" * (end - p)
            self._pos = end
            batch = builder.build(p, end - p, include, self._codec)
            batch.epoch = src.epoch
            if zero_map is not None:
                batch.zero_map_zstd, zero_map = zero_map, None
            yield batch
        yield pb.PageBatch(epoch=src.epoch, last=True, sent_unix_ns=time.time_ns(), zero_map_zstd=zero_map or b"")

    def close(self) -> None:
        self._closed.set()


class LocalPageSource:
    def __init__(self, image: bytes | bytearray | memoryview, page_size: int, vcpu_state: dict[str, Any], vcpus: int = 2) -> None:
        self.reader = _ImageReader(image, page_size)
        self.page_size = page_size
        self.npages = len(self.reader.image) // page_size
        self.untouched = bytes(self.npages)  # every page is served (zero ones as flags)
        self.vcpu_state = vcpu_state
        self.vcpus = vcpus
        self.completed = threading.Event()
        self.switched = threading.Event()
        self.epoch = 0

    def describe(self) -> pb.Manifest:
        return pb.Manifest(protocol_version=PROTOCOL_VERSION, ram_size=self.npages * self.page_size,
                           page_size=self.page_size, vcpus=self.vcpus)  # fmt: skip

    def handshake(self, token: bytes) -> pb.Manifest:
        m = self.describe()
        self.epoch = m.epoch = int.from_bytes(token[:8], "little") or 1
        m.vcpu_state = json.dumps(self.vcpu_state).encode()
        m.paused_unix_ns = time.time_ns()
        return m

    def open_demand(self) -> _LocalDemand:
        return _LocalDemand(self)

    def open_bulk(self, codec: int, batch_pages: int, seek: int, missing_zstd: bytes = b"") -> _LocalBulk:
        return _LocalBulk(self, codec, batch_pages, seek)

    def ping(self, timeout: float) -> None:
        return None

    def switchover(self, timeout: float = 0.0) -> None:
        self.switched.set()

    def complete(self, installed: int, ack: bool = False) -> pb.CompleteReply:
        self.completed.set()
        return pb.CompleteReply()

    def cancel(self, reason: str) -> None:
        return None

    def close(self) -> None:
        return None
