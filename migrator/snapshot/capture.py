"""Taking a snapshot: a running `migrator source`'s guest, or a raw memory file, into an image.

From a source, the snapshot is a destination whose "guest" is a file: it
speaks the migration protocol unchanged.  Handshake (the source pauses its
guest and returns the vCPU state), Switchover (so that the source does not
resume on its own while the image is written), one bulk stream per lane of
the source, each batch validated as the destination's installer validates it
(range, flags, XXH3-64), data pages written at their offsets, never-touched
pages (the zero map that lane 0's first batch carries: the source read them
from pagemap) and all-zero pages left as holes.  Then, as asked:

* ``resume``: a forced roll-back: the guest runs on the source again, from
  its state at the pause (nothing else ever ran it);
* ``release``: Complete, as after a migration: the source releases its guest.

If anything fails after the pause the guest is given back to the source
(roll-back), and the unfinished folder has no manifest, so it is never
taken for an image.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import zstandard

from migrator.dest.install import Installer
from migrator.dest.source_client import GrpcControl, GrpcPageSource, port_address
from migrator.errors import ImageError, MigratorError, ProtocolError
from migrator.pagemaps import FLAG_DATA, FLAG_ZERO, decompress_map
from migrator.security import TlsFiles
from migrator.snapshot.image import READ_CHUNK, ImageWriter, holes_map, open_sized, runs
from migrator.wire import migration_pb2 as pb


@dataclass
class Taken:
    """What a snapshot did (the CLI prints it)."""

    path: str
    manifest: dict[str, Any]
    paused_ms: float  # the guest stood still this long (0 for a raw file)
    elapsed_ms: float
    then: str  # resumed | released | (raw)


_DATA_ONLY = bytes(1 if i == FLAG_DATA else 0 for i in range(256))  # translate: 1 = a data page
_ZERO_ONLY = bytes(1 if i == FLAG_ZERO else 0 for i in range(256))


class _Validator(Installer):
    """The installer's batch validation, without a guest (decode() only)."""

    def __init__(self, npages: int, page_size: int) -> None:  # noqa: D107 - only what decode() reads
        self.npages, self.psize = npages, page_size
        self._dctx = zstandard.ZstdDecompressor()


def snapshot_source(address: str, to: str, *, then: str = "resume", secret: str | None = None,
                    tls: TlsFiles | None = None, connect_timeout: float = 5.0) -> Taken:  # fmt: skip
    """Pause the guest of the `migrator source` at ``address``, write its image to ``to``, then
    ``then`` = "resume" (the guest runs on there) or "release" (the source lets it go).

    Raises TransportError/AuthError (the source), ProtocolError (what it sent),
    ImageError (the folder), MigratorError.
    """
    if then not in ("resume", "release"):
        raise ValueError(then)
    t0 = time.monotonic()
    ctl = GrpcControl(address, secret=secret, tls=tls, connect_timeout=connect_timeout)
    try:
        desc = ctl.describe()
        writer = ImageWriter(to, desc.ram_size, desc.page_size)
        sources = [GrpcPageSource(port_address(address, off), secret=secret, tls=tls) for off in desc.lane_port_offsets]
        switched = False
        try:
            for s in sources:
                s.ready(connect_timeout)
            m = ctl.handshake(os.urandom(16))  # the source pauses its guest here
            t_pause = time.monotonic()
            try:
                ctl.switchover()
                switched = True
                _receive_all(m, sources, writer)
                state = json.loads(m.vcpu_state)
                manifest = writer.finish(vcpu_state=state, vcpus=m.vcpus,
                                         origin={"source": address, "paused_unix_ns": m.paused_unix_ns})  # fmt: skip
            except BaseException as exc:
                writer.abort()
                _give_back(ctl, switched, exc)
                raise
            if then == "resume":
                ctl.rollback(force=True)
            else:
                ctl.complete(writer.npages)
                ctl.complete(writer.npages, ack=True)
            paused_ms = (time.monotonic() - t_pause) * 1e3
        finally:
            for s in sources:
                s.close()
    finally:
        ctl.close()
    return Taken(to, manifest, paused_ms, (time.monotonic() - t0) * 1e3, "resumed" if then == "resume" else "released")


def _give_back(ctl: GrpcControl, switched: bool, exc: BaseException) -> None:
    """The snapshot failed after the pause: the source's guest runs there again."""
    try:
        if switched:
            ctl.rollback(force=True)
        else:
            ctl.cancel(f"snapshot failed: {exc}")
    except MigratorError:
        pass  # the source resumes by itself when no switch-over comes (or it is gone)


def _receive_all(m: pb.Manifest, sources: list[GrpcPageSource], writer: ImageWriter) -> None:
    """Every lane's stream into the image; every page must be accounted for."""
    npages, ps = writer.npages, writer.page_size
    covered = bytearray(npages)  # 1 = data written, zero, or never touched
    errors: list[BaseException] = []
    lanes = len(sources)

    def lane(i: int) -> None:
        v = _Validator(npages, ps)
        stream = sources[i].open_bulk(m.epoch, i, lanes, pb.CODEC_NONE, 512, i * npages // lanes)
        try:
            for raw in stream.responses():
                d = v.decode(raw, m.epoch)
                b = d.batch
                if b.zero_map_zstd:
                    _take_zero_map(b.zero_map_zstd, npages, covered)
                if b.last:
                    return
                data = b.data if b.codec == pb.CODEC_NONE else memoryview(d.data)
                for first, count in runs(b.flags.translate(_DATA_ONLY), 1):
                    di = b.flags.count(FLAG_DATA, 0, first) * ps  # the run's place among the data pages
                    writer.write(b.first_page + first, data[di : di + count * ps])
                    covered[b.first_page + first : b.first_page + first + count] = b"\x01" * count
                for first, count in runs(b.flags.translate(_ZERO_ONLY), 1):
                    covered[b.first_page + first : b.first_page + first + count] = b"\x01" * count
            raise ProtocolError("the source ended a bulk stream early", lane=i)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)
        finally:
            stream.close()

    threads = [threading.Thread(target=lane, args=(i,), name=f"snap-lane{i}", daemon=True) for i in range(lanes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    missing = covered.count(0)
    if missing:
        raise ProtocolError("the source did not send every page", missing=missing, first=covered.find(0))


def _take_zero_map(zstd_map: bytes, npages: int, covered: bytearray) -> None:
    try:
        zero = decompress_map(zstd_map, npages, "zero map")
    except ValueError as exc:
        raise ProtocolError(str(exc)) from None
    for first, count in runs(zero, 1):
        covered[first : first + count] = b"\x01" * count


def snapshot_raw(raw: str, to: str, page_size: int) -> Taken:
    """Import a raw memory file (e.g. a VM's memory file) written by another program.

    Its holes (SEEK_DATA/SEEK_HOLE) are never read; its data extents are read,
    checksummed and written, all-zero pages left as holes.  Raises ImageError.
    """
    t0 = time.monotonic()
    fd, size = open_sized(raw, "the raw memory file")
    try:
        if size == 0 or size % page_size:
            raise ImageError(f"the raw memory file's size ({size} bytes) is not a whole number of {page_size}-byte pages",
                             path=raw)  # fmt: skip
        writer = ImageWriter(to, size, page_size)
        try:
            buf = bytearray(READ_CHUNK * page_size)
            view = memoryview(buf)
            for first, count in runs(holes_map(fd, size // page_size, page_size), 0):
                for p in range(first, first + count, READ_CHUNK):
                    n = min(READ_CHUNK, first + count - p) * page_size
                    got = os.preadv(fd, [view[:n]], p * page_size)
                    if got != n:
                        raise ImageError("the raw memory file changed while it was read", path=raw)
                    writer.write(p, view[:n])
            manifest = writer.finish(vcpu_state=None, vcpus=0, origin={"raw": os.path.abspath(raw)})
        except BaseException:
            writer.abort()
            raise
    finally:
        os.close(fd)
    return Taken(to, manifest, 0.0, (time.monotonic() - t0) * 1e3, "raw")
