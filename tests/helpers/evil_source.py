"""A misbehaving page source (Firecracker's malicious_handler, for us): a real
gRPC Migration server that describes a guest honestly and then lies in one
chosen way.  Serves real page contents (a fixed pattern) where it does not lie.

Modes: ``page-size`` (the manifest's page size differs from the guest's),
``bad-crc`` (a page whose checksum does not match), ``unasked`` (a demand reply
for pages that were not asked for), ``truncated`` (less data than the flags
promise), ``oversized`` (more), ``bad-zstd`` (a bulk batch that does not decompress),
``zero-map-bomb`` (a zero map whose zstd frame declares 1 TiB), ``zero-map-big`` (a
zero map without a declared size that expands past one byte per page).
"""

from __future__ import annotations

import json
from concurrent import futures

import grpc
import xxhash
import zstandard

from migrator import PROTOCOL_VERSION
from migrator.security import SecretInterceptor
from migrator.wire import migration_pb2 as pb
from migrator.wire import migration_pb2_grpc as pb_grpc

PS = 4096
PAGE = bytes(range(256)) * (PS // 256)
EPOCH = 0xE1E1


class EvilSource(pb_grpc.MigrationServicer):
    def __init__(self, mode: str, ram: int) -> None:
        self.mode, self.ram = mode, ram
        self.npages = ram // PS

    def Describe(self, request, context):  # type: ignore[no-untyped-def]
        return pb.Manifest(protocol_version=PROTOCOL_VERSION, ram_size=self.ram, page_size=PS, vcpus=2,
                           urgent_port_offset=1, lane_port_offsets=[2])  # fmt: skip

    def Handshake(self, request, context):  # type: ignore[no-untyped-def]
        page_size = PS * 2 if self.mode == "page-size" else PS
        state = {"config": {"workload": "random", "write_permille": 0, "zero_pct": 0, "text_pct": 0, "nvcpus": 2},
                 "vcpus": [{"rng": 12345, "cursor": 0, "ops": 0, "reads": 0, "writes": 0}] * 2}  # fmt: skip
        return pb.Manifest(
            protocol_version=PROTOCOL_VERSION, epoch=EPOCH, ram_size=self.ram, page_size=page_size,
            vcpu_state=json.dumps(state).encode(), vcpus=2, urgent_port_offset=1, lane_port_offsets=[2],
        )  # fmt: skip

    def Switchover(self, request, context):  # type: ignore[no-untyped-def]
        return pb.SwitchoverReply()

    def _batch(self, first: int, count: int, rid: int = 0) -> pb.PageBatch:
        data = PAGE * count
        digest = xxhash.xxh3_64_intdigest(data)
        codec = pb.CODEC_NONE
        if self.mode == "bad-crc":
            digest ^= 1
        elif self.mode == "truncated":
            data = data[:-100]
        elif self.mode == "oversized":
            data += b"x" * 100
        elif self.mode == "bad-zstd" and rid == 0:
            codec, data = pb.CODEC_ZSTD, zstandard.ZstdCompressor().compress(data)[:-7]
        return pb.PageBatch(epoch=EPOCH, request_id=rid, first_page=first, count=count, flags=b"\x01" * count, codec=codec,
                            data=data, raw_size=count * PS, xxh3=digest)  # fmt: skip

    def Demand(self, request_iterator, context):  # type: ignore[no-untyped-def]
        for req in request_iterator:
            if req.count == 0:
                continue  # the stream's opening message
            first = (req.first_page + 7) % (self.npages - req.count) if self.mode == "unasked" else req.first_page
            yield self._batch(first, req.count, req.request_id)

    def Stream(self, request_iterator, context):  # type: ignore[no-untyped-def]
        next(request_iterator)
        if self.mode == "unasked":  # only the demand channel lies in this mode; keep bulk quiet
            context.abort(grpc.StatusCode.UNAVAILABLE, "bulk unavailable")  # forces demand faults
        for first in range(0, self.npages, 64):
            batch = self._batch(first, min(64, self.npages - first))
            if first == 0 and self.mode == "zero-map-bomb":
                batch.zero_map_zstd = zstd_frame_declaring(1 << 40)
            elif first == 0 and self.mode == "zero-map-big":
                batch.zero_map_zstd = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(self.npages * 64))
            yield batch
        yield pb.PageBatch(epoch=EPOCH, last=True)

    def Complete(self, request, context):  # type: ignore[no-untyped-def]
        return pb.CompleteReply()

    def Cancel(self, request, context):  # type: ignore[no-untyped-def]
        return pb.CancelReply()


def zstd_frame_declaring(size: int) -> bytes:
    """A 53-byte zstd frame whose header declares ``size`` bytes (RFC 8878: magic, a
    single-segment descriptor with an 8-byte content size, one last raw block)."""
    body = b"\x01" * 37
    block_header = (len(body) << 3) | 1  # last block, raw
    return b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + size.to_bytes(8, "little") + block_header.to_bytes(3, "little") + body


def start(mode: str, ram: int, secret: str) -> tuple[grpc.Server, str]:
    """One server on three consecutive ports, as a source's control, urgent and lane servers."""
    from migrator.source.session import free_port_block

    server = grpc.server(futures.ThreadPoolExecutor(8), interceptors=[SecretInterceptor(secret)],
                         options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.so_reuseport", 0)])  # fmt: skip
    pb_grpc.add_MigrationServicer_to_server(EvilSource(mode, ram), server)
    base = free_port_block("127.0.0.1", 3)
    for k in range(3):
        server.add_insecure_port(f"127.0.0.1:{base + k}")
    server.start()
    return server, f"127.0.0.1:{base}"
