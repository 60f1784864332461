"""A destination's calls one by one, for tests that play a destination (or a broken one).

The real gRPC client and stubs, nothing mocked: each method is one call of the
protocol with the migration's secret, so a test can stop between any two steps.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import grpc

from migrator import PROTOCOL_VERSION
from migrator.wire import migration_pb2 as pb
from migrator.wire import migration_pb2_grpc as pb_grpc


class RawClient:
    def __init__(self, address: str, secret: str, ca: str | None = None) -> None:
        self.address = address
        self._creds = None
        if ca is not None:  # TLS, verifying the source against this CA
            with open(ca, "rb") as f:
                self._creds = grpc.ssl_channel_credentials(root_certificates=f.read())
        self.channel = self._open(address)
        self.stub = pb_grpc.MigrationStub(self.channel)
        self._servers: dict[int, tuple[grpc.Channel, pb_grpc.MigrationStub]] = {}
        self.manifest: pb.Manifest | None = None
        self.md = (("authorization", f"Bearer {secret}"),)
        self.token = os.urandom(16)
        self.epoch = 0
        self._done = threading.Event()  # ends the request side of open streams

    def _open(self, address: str) -> grpc.Channel:
        return grpc.secure_channel(address, self._creds) if self._creds else grpc.insecure_channel(address)

    def server(self, which: str, lane: int = 0) -> pb_grpc.MigrationStub:
        """A stub for the source's urgent server or a lane server (ports from its manifest)."""
        m = self.manifest or self.describe()
        offset = m.urgent_port_offset if which == "urgent" else m.lane_port_offsets[lane % len(m.lane_port_offsets)]
        if offset not in self._servers:
            host, _, port = self.address.rpartition(":")
            ch = self._open(f"{host}:{int(port) + offset}")
            self._servers[offset] = (ch, pb_grpc.MigrationStub(ch))
        return self._servers[offset][1]

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> pb.Manifest:
        m = self.stub.Describe(pb.DescribeRequest(protocol_version=PROTOCOL_VERSION), metadata=self.md, timeout=10)
        self.manifest = self.manifest or m
        return m

    def handshake(self, owner_headers: bool = False) -> pb.Manifest:
        """Pause the source's guest.  ``owner_headers``: name the migration in every later
        call's headers, as `migrator dest` does (the source serves its owner first)."""
        req = pb.HandshakeRequest(protocol_version=PROTOCOL_VERSION, session_token=self.token)
        m = self.stub.Handshake(req, metadata=self.md, timeout=30)
        self.epoch = m.epoch
        self.manifest = m
        if owner_headers:
            self.md = self.md + (("x-migrator-epoch", f"{m.epoch:016x}"),)
        return m

    def switchover(self) -> None:
        self.stub.Switchover(pb.SwitchoverRequest(epoch=self.epoch), metadata=self.md, timeout=10)

    def cancel(self, reason: str = "test") -> None:
        self.stub.Cancel(pb.CancelRequest(epoch=self.epoch, reason=reason), metadata=self.md, timeout=10)

    def rollback_force(self) -> str:
        return str(self.stub.Rollback(pb.RollbackRequest(force=True), metadata=self.md, timeout=10).message)

    def complete(self, ack: bool = False) -> pb.CompleteReply:
        return self.stub.Complete(pb.CompleteRequest(epoch=self.epoch, ack=ack), metadata=self.md, timeout=10)

    def stream(self, batch_pages: int = 64, epoch: int | None = None, lane: int = 0, lanes: int = 1) -> grpc.Call:
        """A bulk stream of lane ``lane`` of ``lanes`` (iterate it for batches; .cancel() ends it)."""
        ctl = pb.StreamControl(epoch=self.epoch if epoch is None else epoch, batch_pages=batch_pages, lane=lane, lanes=lanes)
        return self.server("lane", lane).Stream(_forever(ctl, self._done), metadata=self.md, timeout=120)

    def demand(self, first: int, count: int, epoch: int | None = None) -> pb.PageBatch:
        req = pb.DemandRequest(epoch=self.epoch if epoch is None else epoch, request_id=1, first_page=first, count=count)
        call = self.server("urgent").Demand(iter([req]), metadata=self.md, timeout=30)
        batch: pb.PageBatch = next(iter(call))
        call.cancel()
        return batch

    def close(self) -> None:
        self._done.set()
        for ch, _ in self._servers.values():
            ch.close()
        self.channel.close()


def _forever(first: pb.StreamControl, done: threading.Event) -> Iterator[pb.StreamControl]:
    """The stream's controls: the first message, then nothing until the client closes."""
    yield first
    done.wait()


def ended_reason(exc: grpc.RpcError) -> str:
    """The ``migrator-epoch-ended`` trailing metadata of a refusal, or ''."""
    return dict(exc.trailing_metadata() or ()).get("migrator-epoch-ended", "")
