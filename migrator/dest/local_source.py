"""Pages from a RAM image file, no network: the transport seam's local form
(httpx's MockTransport for us), and what a lazy restore reads from.

The destination pipeline — the fault process and the lanes, real userfaultfd,
a real guest process — runs unchanged against it: the session talks to a
:class:`LocalControl` instead of a source, and each worker opens an
:class:`ImagePageSource` on the same file instead of a gRPC channel
(:func:`open_page_source`).  Batches are built by the source's own
``BatchBuilder`` from the image, so the installer sees exactly what a source
would send.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import zstandard

from migrator import PROTOCOL_VERSION
from migrator.dest.pagestate import PageState
from migrator.pagemaps import FLIP01, or_bytes
from migrator.source.batches import BatchBuilder
from migrator.source.serving import MAX_DEMAND_PAGES, lane_range
from migrator.wire import migration_pb2 as pb


class _FileReader:
    """Pages of an image file (holes read as zeros)."""

    def __init__(self, path: str, page_size: int) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.page_size = page_size

    def read_into(self, first: int, buf: memoryview) -> None:
        done = 0
        off = first * self.page_size
        while done < len(buf):
            n = os.preadv(self.fd, [buf[done:]], off + done)
            if n <= 0:  # past the end of the file: zeros
                buf[done:] = bytes(len(buf) - done)
                return
            done += n

    def close(self) -> None:
        os.close(self.fd)


class _Demand:
    def __init__(self, src: "ImagePageSource", epoch: int) -> None:
        self._src, self._epoch = src, epoch
        self._q: queue.SimpleQueue[tuple[int, int, int] | None] = queue.SimpleQueue()

    def request(self, request_id: int, first: int, count: int) -> None:
        self._q.put((request_id, first, count))

    def discarded(self, first: int, count: int) -> None:
        """Nothing to tell an image: the lanes skip discarded pages themselves."""

    def responses(self) -> Iterator[bytes]:
        builder = BatchBuilder(self._src.reader, self._src.untouched, MAX_DEMAND_PAGES)
        while (item := self._q.get()) is not None:
            rid, first, count = item
            yield builder.build(first, count, None, pb.CODEC_NONE, request_id=rid, epoch=self._epoch).message

    def close(self) -> None:
        self._q.put(None)


_ASKED = bytes([0]) + bytes([1]) * 255  # translate a page state: 1 = requested or present at the destination


class _Bulk:
    def __init__(self, src: "ImagePageSource", epoch: int, lane: int, lanes: int, codec: int, batch_pages: int,
                 seek: int) -> None:  # fmt: skip
        self._src, self._epoch, self._lane = src, epoch, lane
        self._start, self._end = lane_range(lane, lanes, src.npages)
        self._codec, self._batch = codec, batch_pages or 512
        self._pos = max(self._start, min(seek, self._end))
        self._closed = threading.Event()

    def seek(self, page: int) -> None:
        if self._start <= page < self._end:
            self._pos = page

    def set_codec(self, codec: int) -> None:
        self._codec = codec

    def responses(self) -> Iterator[bytes]:
        src = self._src
        builder = BatchBuilder(src.reader, src.untouched, self._batch)
        need = bytearray(src.untouched)  # 0 = still to send
        zero_map = zstandard.ZstdCompressor().compress(src.untouched) if self._lane == 0 else b""
        while not self._closed.is_set():
            p = need.find(0, self._pos, self._end)
            if p < 0:
                p = need.find(0, self._start, self._end)
            if p < 0:
                break
            stop = min(p + self._batch, self._end)
            if src.dest_state is not None:  # 0 = still to send: pages requested or present there are not
                need[p:stop] = or_bytes(need[p:stop], bytes(src.dest_state[p:stop]).translate(_ASKED))
                if need.find(0, p, stop) < 0:
                    self._pos = stop
                    continue
            include = need[p:stop].translate(FLIP01)
            need[p:stop] = b"\x01" * (stop - p)
            self._pos = stop
            yield builder.build(p, stop - p, include, self._codec, epoch=self._epoch, zero_map_zstd=zero_map).message
            zero_map = b""
        yield pb.PageBatch(epoch=self._epoch, last=True, sent_unix_ns=time.time_ns(), zero_map_zstd=zero_map).SerializeToString()

    def close(self) -> None:
        self._closed.set()


class ImagePageSource:
    """A worker's page source: the image file at ``path``, or the snapshot image
    folder ``image`` (``snapshot/image.py``: its holes are never read, every page
    read is checked against its checksum)."""

    def __init__(self, path: str, page_size: int, image: str | None = None, state_fd: int = -1) -> None:
        self.reader: Any
        if image:
            from migrator.snapshot.image import CheckedReader, open_image

            img = open_image(image)
            self.reader, self.npages, self.untouched = CheckedReader(img), img.npages, img.holes
        else:
            self.reader = _FileReader(path, page_size)
            self.npages = os.fstat(self.reader.fd).st_size // page_size
            self.untouched = bytes(self.npages)  # every page is read (zero ones travel as flags)
        # the destination's page state: what the fault process already asked for or has is not sent
        # again (a source's lanes learn it from the urgent worker's map: ``source/shared.py``)
        self.dest_state = PageState.attach(state_fd, self.npages).state if state_fd >= 0 else None

    def ready(self, timeout: float) -> None:
        return None

    def open_demand(self, epoch: int) -> _Demand:
        return _Demand(self, epoch)

    def open_bulk(self, epoch: int, lane: int, lanes: int, codec: int, batch_pages: int, seek: int,
                  missing_zstd: bytes = b"", precopy: bool = False) -> _Bulk:  # fmt: skip
        return _Bulk(self, epoch, lane, lanes, codec, batch_pages, seek)

    def close(self) -> None:
        self.reader.close()


class LocalControl:
    """The session's side of an image: describe it, "pause" it (nothing to pause), complete."""

    def __init__(self, path: str, page_size: int, vcpu_state: dict[str, Any], vcpus: int = 2) -> None:
        self.path, self.page_size = path, page_size
        self.npages = os.stat(path).st_size // page_size
        self.vcpu_state, self.vcpus = vcpu_state, vcpus
        self.epoch = 0
        self.completed = threading.Event()
        self.switched = threading.Event()

    def worker_source(self, state_fd: int = -1) -> dict[str, Any]:
        """The workers' source; ``state_fd``: the destination's page state (``pagestate.py``),
        inherited by every worker, so that the bulk skips pages that are already there."""
        return {"kind": "image", "path": self.path, "page_size": self.page_size, "state_fd": state_fd}

    def describe(self) -> pb.Manifest:
        return pb.Manifest(protocol_version=PROTOCOL_VERSION, ram_size=self.npages * self.page_size,
                           page_size=self.page_size, vcpus=self.vcpus, urgent_port_offset=1,
                           lane_port_offsets=[2])  # fmt: skip

    def handshake(self, token: bytes) -> pb.Manifest:
        m = self.describe()
        self.epoch = m.epoch = int.from_bytes(token[:8], "little") or 1
        m.vcpu_state = json.dumps(self.vcpu_state).encode()
        m.paused_unix_ns = time.time_ns()
        return m

    def switchover(self, timeout: float = 0.0) -> None:
        self.switched.set()

    def complete(self, installed: int, ack: bool = False) -> pb.CompleteReply:
        self.completed.set()
        return pb.CompleteReply()

    def cancel(self, reason: str) -> None:
        return None

    def rollback(self, force: bool) -> str:
        return "nothing to roll back: an image"

    def close(self) -> None:
        return None


def open_page_source(spec: dict[str, Any]) -> Any:
    """A worker's page source from its configuration: gRPC (``address``) or an image (``path``)."""
    if spec.get("kind") == "image":
        return ImagePageSource(spec["path"], int(spec["page_size"]), spec.get("image"), int(spec.get("state_fd", -1)))
    from migrator.dest.source_client import GrpcPageSource
    from migrator.security import TlsFiles

    tls = TlsFiles(**spec["tls"]) if spec.get("tls") else None
    return GrpcPageSource(spec["address"], secret=spec.get("secret"), tls=tls)
