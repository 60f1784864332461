"""Hostile input to the page server: every malformed request gets a precise
status, the server keeps serving, and the paused guest's memory does not change.

We play the destination (a real handshake pauses the guest, so its RAM is
frozen), then send more than 10,000 generated requests — demand requests with
any page range and count, bulk-stream controls with any seek, codec, batch size
and missing map, second handshakes, wrong versions, completions and
cancellations of migrations that do not exist, undecodable bytes, and garbage
on the TCP port — checking each answer: pages that were asked for validly
against the guest's RAM read from /proc/PID/mem, and the status of the others.
"""

from __future__ import annotations

import hashlib
import os
import socket

import grpc
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migrator import PROTOCOL_VERSION
from migrator.wire import migration_pb2 as pb
from migrator.wire import migration_pb2_grpc as pb_grpc
from tests.conftest import require_userfaultfd
from tests.helpers import procs

PS = 4096
RAM = 32 << 20
NPAGES = RAM // PS
MAX_DEMAND = 256
COUNTER = {"requests": 0, "rejected": 0}
TOKEN = os.urandom(16)


@pytest.fixture(scope="module")
def paused_source(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    require_userfaultfd()
    tmp = tmp_path_factory.mktemp("hostile")
    with procs.running_source(tmp, "32MiB") as (src, info):
        md = (("authorization", f"Bearer {info['secret']}"),)
        ch = grpc.insecure_channel(info["address"])
        stub = pb_grpc.MigrationStub(ch)
        manifest = stub.Handshake(pb.HandshakeRequest(protocol_version=PROTOCOL_VERSION, session_token=TOKEN),
                                  metadata=md, timeout=30)  # fmt: skip
        # switched over: the source keeps its guest paused for as long as we like
        stub.Switchover(pb.SwitchoverRequest(epoch=manifest.epoch), metadata=md, timeout=30)
        pid = int(info["guest_pid"])
        addr = _ram_address(pid, manifest)
        at_pause = _digest(pid, addr)
        host, port = info["address"].rsplit(":", 1)
        urgent = grpc.insecure_channel(f"{host}:{int(port) + manifest.urgent_port_offset}")
        lane = grpc.insecure_channel(f"{host}:{int(port) + manifest.lane_port_offsets[0]}")
        yield {"at_pause": at_pause, "src": src, "stub": stub, "md": md, "epoch": manifest.epoch,
               "urgent": pb_grpc.MigrationStub(urgent), "lane": pb_grpc.MigrationStub(lane),
               "manifest": manifest, "pid": pid, "addr": addr, "address": info["address"]}  # fmt: skip
        for c in (ch, urgent, lane):
            c.close()


def _ram_address(pid: int, manifest: pb.Manifest) -> int:
    """Find the guest's RAM: the mapping whose pages hold their own index (guest_sim's format)."""
    probes = range(NPAGES - 1, NPAGES - 400, -1)
    with open(f"/proc/{pid}/maps") as f, open(f"/proc/{pid}/mem", "rb") as mem:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if hi - lo < RAM:
                continue
            for base in range(lo, hi - RAM + 1, PS):
                for probe in probes:
                    mem.seek(base + probe * PS + 8)
                    if int.from_bytes(mem.read(8), "little") == probe:
                        return base
    raise AssertionError("guest RAM not found")


def _digest(pid: int, addr: int) -> str:
    with open(f"/proc/{pid}/mem", "rb") as mem:
        mem.seek(addr)
        return hashlib.sha256(mem.read(RAM)).hexdigest()


def _pages(pid: int, addr: int, first: int, count: int) -> bytes:
    with open(f"/proc/{pid}/mem", "rb") as mem:
        mem.seek(addr + first * PS)
        return mem.read(count * PS)


def _check_batch(ctx: dict, batch: pb.PageBatch, first: int, count: int) -> None:
    assert (batch.first_page, batch.count) == (first, count)
    raw = _pages(ctx["pid"], ctx["addr"], first, count)
    data = memoryview(batch.data)
    k = 0
    for i, flag in enumerate(batch.flags):
        page = raw[i * PS : (i + 1) * PS]
        if flag == 2:
            assert page == bytes(PS)
        else:
            assert flag == 1 and data[k * PS : (k + 1) * PS] == page
            k += 1
    assert batch.xxh3 == (xxhash.xxh3_64_intdigest(batch.data) if batch.data else 0)


def _demand_status(first: int, count: int) -> grpc.StatusCode | None:
    if count == 0 or count > MAX_DEMAND:
        return grpc.StatusCode.INVALID_ARGUMENT
    if first >= NPAGES or first + count > NPAGES:
        return grpc.StatusCode.OUT_OF_RANGE
    return None


u64 = st.integers(min_value=0, max_value=2**64 - 1)
u32 = st.integers(min_value=0, max_value=2**32 - 1)
valid_req = st.integers(0, NPAGES - 1).flatmap(lambda f: st.tuples(st.just(f), st.integers(1, min(MAX_DEMAND, NPAGES - f))))
any_req = st.tuples(st.one_of(st.integers(0, NPAGES + 10), u64), st.one_of(st.integers(0, MAX_DEMAND + 2), u32))
# mostly valid requests, so that a stream carries several before the bad one ends it
demand_req = st.one_of(valid_req, valid_req, valid_req, any_req)


@settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(reqs=st.lists(demand_req, min_size=1, max_size=6))
def test_demand_requests(paused_source: dict, reqs: list[tuple[int, int]]) -> None:
    ctx = paused_source
    call = ctx["urgent"].Demand(
        iter([pb.DemandRequest(epoch=ctx["epoch"], request_id=i + 1, first_page=f, count=c) for i, (f, c) in enumerate(reqs)]),
        metadata=ctx["md"], timeout=30,
    )  # fmt: skip
    answers = iter(call)
    for f, c in reqs:
        COUNTER["requests"] += 1
        want = _demand_status(f, c)
        if want is None:
            _check_batch(ctx, next(answers), f, c)
            continue
        with pytest.raises(grpc.RpcError) as err:
            next(answers)
        assert err.value.code() == want, (f, c, err.value.details())
        COUNTER["rejected"] += 1
        break
    call.code()  # the stream has ended on the server too (a migration has a few at most)


controls = st.builds(
    pb.StreamControl,
    seek_page=st.one_of(st.none(), st.integers(0, NPAGES + 5), u64),
    codec=st.one_of(st.none(), st.integers(0, 5)),
    batch_pages=st.one_of(st.integers(0, 1100), u32),
    missing_map_zstd=st.one_of(st.just(b""), st.binary(max_size=64)),
)


@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(ctl=controls)
def test_bulk_controls(paused_source: dict, ctl: pb.StreamControl) -> None:
    """Each control is either served (first batch decodes) or refused with a precise status."""
    ctx = paused_source
    COUNTER["requests"] += 1
    bad_seek = ctl.HasField("seek_page") and ctl.seek_page >= NPAGES
    bad_codec = ctl.HasField("codec") and ctl.codec not in (0, 1)
    bad_batch = ctl.batch_pages > 1024
    ctl.epoch = ctx["epoch"]
    ctl.lanes = 1
    call = ctx["lane"].Stream(iter([ctl]), metadata=ctx["md"], timeout=30)
    try:
        first = next(iter(call))
        assert not (bad_seek or bad_codec or bad_batch or ctl.missing_map_zstd), ctl
        assert first.last or len(first.flags) == first.count
    except grpc.RpcError as exc:
        COUNTER["rejected"] += 1
        assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE), exc.details()
        assert bad_seek or bad_codec or bad_batch or ctl.missing_map_zstd, (ctl, exc.details())
    finally:
        call.cancel()


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(version=u32, describe=st.booleans(), token=st.binary(max_size=20), epoch=u64, garbage=st.binary(max_size=200))
def test_handshakes_completions_and_garbage(
    paused_source: dict, version: int, describe: bool, token: bytes, epoch: int, garbage: bytes
) -> None:
    ctx = paused_source
    stub, md = ctx["stub"], ctx["md"]
    COUNTER["requests"] += 5
    try:
        if describe:
            stub.Describe(pb.DescribeRequest(protocol_version=version), metadata=md, timeout=10)
        else:
            stub.Handshake(pb.HandshakeRequest(protocol_version=version, session_token=token), metadata=md, timeout=10)
        assert version == PROTOCOL_VERSION and describe  # describing is always allowed
    except grpc.RpcError as exc:
        if version != PROTOCOL_VERSION:
            want = grpc.StatusCode.FAILED_PRECONDITION
        elif len(token) != 16:
            want = grpc.StatusCode.INVALID_ARGUMENT
        else:
            want = grpc.StatusCode.ALREADY_EXISTS  # another destination's token: one migration at a time
        assert exc.code() == want, exc.details()
        COUNTER["rejected"] += 1
    if epoch != ctx["epoch"]:
        for rpc, req in ((stub.Complete, pb.CompleteRequest(epoch=epoch)), (stub.Cancel, pb.CancelRequest(epoch=epoch)),
                         (stub.Switchover, pb.SwitchoverRequest(epoch=epoch))):  # fmt: skip
            with pytest.raises(grpc.RpcError) as err:
                rpc(req, metadata=md, timeout=10)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            COUNTER["rejected"] += 1
    # bytes that are not a message of the method they are sent to
    raw = grpc.insecure_channel(ctx["address"])
    try:
        call = raw.unary_unary("/migrator.wire.Migration/Handshake", request_serializer=lambda b: b,
                               response_deserializer=lambda b: b)  # fmt: skip
        try:
            call(garbage, metadata=md, timeout=10)
        except grpc.RpcError as exc:
            COUNTER["rejected"] += 1
            # undecodable: INVALID_ARGUMENT (as the README lists); decodable: the handshake's own refusals
            assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                                  grpc.StatusCode.ALREADY_EXISTS), exc.details()  # fmt: skip
    finally:
        raw.close()


def test_garbage_on_the_port_then_still_serving_and_memory_unchanged(paused_source: dict) -> None:
    ctx = paused_source
    before = _digest(ctx["pid"], ctx["addr"])
    host, port = ctx["address"].rsplit(":", 1)
    for blob in (os.urandom(4096), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x00" * 100, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + os.urandom(500)):
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(blob)
            s.settimeout(5)
            try:
                while s.recv(65536):
                    pass
            except (TimeoutError, ConnectionResetError):
                pass
        COUNTER["requests"] += 1
    # still serving, exactly
    req = pb.DemandRequest(epoch=ctx["epoch"], request_id=1, first_page=100, count=8)
    call = ctx["urgent"].Demand(iter([req]), metadata=ctx["md"], timeout=30)
    _check_batch(ctx, next(iter(call)), 100, 8)
    assert _digest(ctx["pid"], ctx["addr"]) == before
    assert ctx["src"].proc.poll() is None


def test_the_count_and_the_memory(paused_source: dict) -> None:
    """Runs last in this module: >= 10,000 requests sent, the guest's RAM as at the pause."""
    print(f"\n[hostile] {COUNTER['requests']} requests sent, {COUNTER['rejected']} malformed ones rejected "
          f"with a precise status")
    assert COUNTER["requests"] >= 10_000, COUNTER
    ctx = paused_source
    assert _digest(ctx["pid"], ctx["addr"]) == ctx["at_pause"]  # not a byte of guest memory changed
    assert ctx["src"].proc.poll() is None
