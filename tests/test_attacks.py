"""The page server under attack (issue 9): nothing for a peer without the secret,
bounded for one with it — measured, with TLS off and on.

A real `migrator source` is attacked the way an attacker would (raw HTTP/2 from
``helpers.attacker`` where a gRPC client cannot make the attack); the evidence
is the source's own process (VmRSS and VmHWM in /proc/PID/status, the
descriptors in /proc/PID/fd), the answers the attacker gets, other peers' calls
served meanwhile, and a legitimate migration that must complete with every
page verified, timed against one without the attack.  The figures are printed
(``-s`` shows them) and collected in FIGURES.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import h2.errors
import pytest
import zstandard

from migrator import PROTOCOL_VERSION
from migrator.dest.source_client import CHANNEL_OPTIONS
from migrator.source.guard import server_options
from migrator.wire import migration_pb2 as pb
from migrator.wire import migration_pb2_grpc as pb_grpc
from tests.conftest import require_userfaultfd
from tests.helpers import attacker, procs
from tests.helpers.evil_source import zstd_frame_declaring
from tests.helpers.pki import make_ca, make_cert
from tests.helpers.raw_client import RawClient

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed for the TLS half"),
]
FIGURES: list[str] = []
HANDSHAKE_TIMEOUT_S = 5.0  # guard.HANDSHAKE_TIMEOUT_MS


# -- measuring the source ------------------------------------------------------------------
def source_pids(pid: int) -> list[int]:
    """The source's processes: its session and its urgent and lane workers (not the guest)."""
    return [pid] + [c for c in procs.children(pid) if "migrator.source.worker" in procs.cmdline(c)]


def status_kib(pid: int, field: str) -> int:
    """``field`` of /proc/PID/status summed over the source's processes (kB)."""
    total = 0
    for p in source_pids(pid):
        try:
            lines = Path(f"/proc/{p}/status").read_text().splitlines()
        except OSError:
            continue  # gone (e.g. the source exited after its migration)
        for line in lines:
            if line.startswith(field + ":"):
                total += int(line.split()[1])
    return total


def nfds(pid: int) -> int:
    total = 0
    for p in source_pids(pid):
        try:
            total += len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            pass
    return total


def server_address(t: dict, which: str) -> str:
    """The address of the source's urgent or first lane server (its manifest's port offsets)."""
    with _channel(t) as ch:
        m = pb_grpc.MigrationStub(ch).Describe(pb.DescribeRequest(protocol_version=PROTOCOL_VERSION),
                                               metadata=(("authorization", f"Bearer {t['secret']}"),), timeout=10)  # fmt: skip
    host, port = t["address"].rsplit(":", 1)
    return f"{host}:{int(port) + (m.urgent_port_offset if which == 'urgent' else m.lane_port_offsets[0])}"


class Peak:
    """Samples the source's RSS every 10 ms while the attack runs."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self.start_kib = status_kib(pid, "VmRSS")
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            try:
                self.peak = max(self.peak, status_kib(self.pid, "VmRSS"))
            except OSError:
                return

    def stop(self) -> tuple[int, int]:
        """(peak growth, lasting growth) in MiB (lasting 0 if the source has exited since)."""
        self._stop.set()
        self._t.join()
        time.sleep(0.3)
        now = status_kib(self.pid, "VmRSS")
        return (self.peak - self.start_kib) >> 10, max(0, now - self.start_kib) >> 10 if now else 0


# -- a source to attack, TLS off and on ----------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d, "ca")
    return {"ca": ca, "server": make_cert(d, "server", ca)}


@pytest.fixture(params=[False, True], ids=["plain", "tls"])
def target(request: pytest.FixtureRequest, tmp_path: Path, pki: dict) -> Any:
    require_userfaultfd()
    tls = bool(request.param)
    extra = ["--tls-cert", str(pki["server"][0]), "--tls-key", str(pki["server"][1])] if tls else []
    with procs.running_source(tmp_path, "64MiB", *extra) as (src, info):
        yield {"src": src, "info": info, "tls": tls, "address": info["address"], "pid": src.pid,
               "secret": info["secret"], "ca": str(pki["ca"][0]), "tmp": tmp_path}  # fmt: skip


def _channel(t: dict) -> grpc.Channel:
    if t["tls"]:
        creds = grpc.ssl_channel_credentials(root_certificates=Path(t["ca"]).read_bytes())
        return grpc.secure_channel(t["address"], creds)
    return grpc.insecure_channel(t["address"])


def _describe_ms(t: dict, secret: str | None = None) -> float:
    """One legitimate call, timed (ms), retried as a destination does
    (source_client.py: RESOURCE_EXHAUSTED, every 0.2 s) while a burst of calls holds
    every worker of the source for a moment."""
    with _channel(t) as ch:
        stub = pb_grpc.MigrationStub(ch)
        t0 = time.perf_counter()
        while True:
            try:
                stub.Describe(pb.DescribeRequest(protocol_version=PROTOCOL_VERSION),
                              metadata=(("authorization", f"Bearer {secret or t['secret']}"),), timeout=10)  # fmt: skip
                return (time.perf_counter() - t0) * 1e3
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.perf_counter() - t0 > 10:
                    raise
                time.sleep(0.2)


def _migrate(t: dict, name: str) -> tuple[float, dict]:
    args = [*procs.MIGRATOR, "dest", "--source", t["address"], "--run-for", "0.3", "--json", "--quiet"]
    if t["tls"]:
        args += ["--tls-ca", t["ca"]]
    t0 = time.monotonic()
    with procs.command(args, t["tmp"], name) as d:
        assert d.wait(120) == 0, d.stderr()
        s = json.loads(d.stdout())
    assert s["ok"] and s["verified_pages"] == s["pages"] and s["verify_errors"] == [] and s["guest_errors"] == []
    return time.monotonic() - t0, s


def _figure(t: dict, line: str) -> None:
    line = f"[attacks/{'tls' if t['tls'] else 'plain'}] {line}"
    FIGURES.append(line)
    print("\n" + line)


# -- before authentication ---------------------------------------------------------------------
def test_headers_without_a_body_cost_no_worker(target: dict) -> None:
    """128 calls that never send their body: each is refused at once (it used to pin
    one of 8 workers each), other peers are served meanwhile."""
    t = target
    fds0 = nfds(t["pid"])
    peak = Peak(t["pid"])
    done: list[attacker.Report] = []
    th = threading.Thread(target=lambda: done.append(attacker.headers_without_body(t["address"], t["tls"], hold=3.0)))
    th.start()
    time.sleep(0.5)
    lat = [_describe_ms(t) for _ in range(5)]
    th.join(30)
    grow, lasting = peak.stop()
    r = done[0]
    # every one refused without sending a body: UNAUTHENTICATED, or RESOURCE_EXHAUSTED when more arrive
    # at once than the server has workers (the bound on concurrent calls; a legitimate peer retries)
    assert sum(r.answered.values()) == r.calls and set(r.answered) <= {"16", "8"}, r
    assert max(lat) < 1000, lat
    procs.wait_for(lambda: nfds(t["pid"]) <= fds0 + 2, 10, what="the attacker's connections to be released")
    assert grow < 32 and lasting < 16, (grow, lasting)
    _figure(t, f"headers without a body: {r.calls} calls refused {r.answered} in {r.seconds:.1f} s; legitimate Describe "
               f"max {max(lat):.1f} ms meanwhile; RSS +{grow} MiB peak, +{lasting} MiB after; fds {fds0} -> {nfds(t['pid'])}")


def test_big_bodies_are_never_buffered(target: dict) -> None:
    """32 concurrent 60 MiB requests, three rounds (it took the source to ~800 MiB)."""
    t = target
    peak = Peak(t["pid"])
    r = attacker.big_bodies(server_address(t, "lane"), t["tls"])
    grow, lasting = peak.stop()
    # UNAUTHENTICATED, RESOURCE_EXHAUSTED (too large), or reset by the transport (streams per connection)
    assert sum(r.answered.values()) == r.calls and set(r.answered) <= {"16", "8", "RST"}, r
    assert grow < 48 and lasting < 16, (grow, lasting)
    assert _describe_ms(t) < 1000
    _figure(t, f"60 MiB bodies: {r.calls} calls answered {r.answered}; RSS +{grow} MiB peak, +{lasting} MiB after")


def test_silent_and_byte_at_a_time_connections_are_closed(target: dict) -> None:
    t = target
    fds0 = nfds(t["pid"])
    r, socks = attacker.silent_connections(t["address"], t["tls"], n=100)
    slow = attacker.slowloris(t["address"], n=20, seconds=HANDSHAKE_TIMEOUT_S + 3)
    assert slow.note.startswith("20 of 20 closed"), slow.note
    procs.wait_for(lambda: all(attacker.closed_by_peer(s) for s in socks), HANDSHAKE_TIMEOUT_S + 5,
                   what="the silent connections to be closed")  # fmt: skip
    for s in socks:
        s.close()
    procs.wait_for(lambda: nfds(t["pid"]) <= fds0 + 2, 10, what="descriptors back to the baseline")
    assert _describe_ms(t) < 1000
    _figure(t, f"silent connections: {r.calls} closed within {HANDSHAKE_TIMEOUT_S:g} s + slack; {slow.note}; "
               f"fds {fds0} -> {nfds(t['pid'])}")


def test_keepalive_pings_are_welcome_and_ping_floods_are_sent_away(target: dict) -> None:
    """The destination's keepalive (one PING a second, no data: e.g. while the source
    pauses a slow guest) never earns a GOAWAY; a PING flood does (ENHANCE_YOUR_CALM).

    The server's ping policy is a set of channel arguments gRPC ignores silently when
    misspelt: with the default policy (one PING per 5 min without data) a call left
    waiting ~6 s was sent away, which a stalled guest's pause made happen."""
    t = target
    keepalive_s = dict(CHANNEL_OPTIONS)["grpc.keepalive_time_ms"] / 1000
    calm = attacker.H2Client(t["address"], t["tls"])
    try:
        for _ in range(10):
            calm.ping()
            calm.pump(keepalive_s)
        assert not calm.closed and calm.goaway is None, f"keepalive pings sent away (GOAWAY {calm.goaway})"
    finally:
        calm.close()
    flood = attacker.H2Client(t["address"], t["tls"])
    try:
        for _ in range(200):
            flood.ping()
            flood.pump(0.005)
            if flood.closed:
                break
        assert flood.goaway == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, f"a ping flood was not sent away ({flood.goaway})"
    finally:
        flood.close()
    assert _describe_ms(t) < 1000
    _figure(t, f"PING every {keepalive_s:g} s for 10 s: kept; PING flood: GOAWAY ENHANCE_YOUR_CALM")


def test_every_grpc_option_is_one_grpc_knows() -> None:
    """gRPC ignores channel arguments it does not know, silently: every name we set
    must appear in its core library (the one that reads them)."""
    core = Path(grpc.__file__).parent / "_cython"
    text = b"".join(p.read_bytes() for p in core.glob("cygrpc*.so"))
    names = {k for k, _ in CHANNEL_OPTIONS} | {k for k, _ in server_options(1 << 18, 4096, 128)}
    unknown = sorted(n for n in names if n.encode() + b"\0" not in text)
    assert not unknown, f"gRPC does not know these options: {unknown}"


def test_refusals_are_logged_rate_limited(target: dict) -> None:
    t = target
    before = t["src"].stderr().count("refused")
    with _channel(t) as ch:
        stub = pb_grpc.MigrationStub(ch)
        for i in range(3000):
            with pytest.raises(grpc.RpcError) as err:
                stub.Describe(pb.DescribeRequest(), metadata=(("authorization", f"Bearer wrong{i}"),), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    time.sleep(0.2)
    lines = [ln for ln in t["src"].stderr().splitlines() if "refused" in ln][before:]
    assert 1 <= len(lines) <= 3, lines
    assert "wrong migration secret" in lines[0]
    _figure(t, f"3,000 refused calls: {len(lines)} log line(s): {lines[-1]!r}")


def test_undecodable_requests_get_invalid_argument(target: dict) -> None:
    t = target
    md = (("authorization", f"Bearer {t['secret']}"),)
    with _channel(t) as ch:
        for method in ("Describe", "Handshake", "Switchover", "Complete", "Cancel", "Rollback"):
            call = ch.unary_unary(f"/migrator.wire.Migration/{method}", request_serializer=lambda b: b,
                                  response_deserializer=lambda b: b)  # fmt: skip
            with pytest.raises(grpc.RpcError) as err:
                call(b"\xff\xff\xff\xff", metadata=md, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, err.value.details())
    _figure(t, "undecodable requests: INVALID_ARGUMENT for every method")


def test_rapid_resets_and_floods_while_a_migration_runs(target: dict, tmp_path: Path) -> None:
    """A legitimate migration completes, every page verified, while streams are
    opened and reset in a flood, connections are left silent and refused calls
    pour in; its time is reported against one without the attack."""
    t = target
    # a migration of a second, identical source without the attack: the baseline
    extra = ["--tls-cert", str(Path(t["ca"]).with_name("server.pem")), "--tls-key", str(Path(t["ca"]).with_name("server.key"))] if t["tls"] else []
    (tmp_path / "base").mkdir()
    with procs.running_source(tmp_path / "base", "64MiB", *extra) as (_bsrc, binfo):
        base_t, _ = _migrate({**t, "address": binfo["address"]}, "baseline")
    stop = threading.Event()
    reports: list[attacker.Report] = []
    fds0 = nfds(t["pid"])
    peak = Peak(t["pid"])
    threads = [
        threading.Thread(target=lambda: reports.append(attacker.rapid_reset(t["address"], t["tls"], seconds=60, stop=stop))),
        threading.Thread(target=lambda: reports.append(attacker.headers_without_body(t["address"], t["tls"], connections=4, hold=4))),
    ]
    for th in threads:
        th.start()
    _, socks = attacker.silent_connections(t["address"], t["tls"], n=30)
    time.sleep(0.5)
    took, s = _migrate(t, "under-attack")
    stop.set()
    for th in threads:
        th.join(60)
    grow, lasting = peak.stop()
    for sock in socks:
        sock.close()
    reset = next(r for r in reports if r.name == "rapid reset")
    assert reset.calls > 1000, reset
    # gRPC's own buffers grow under a flood (all the source's processes together); what stays is
    # bounded by the heap each process keeps for its batches (32 MiB, workers.py)
    assert grow < 256 and lasting < 128, (grow, lasting)
    _figure(t, f"migration under attack: {took:.2f} s vs {base_t:.2f} s without ({took / base_t:.2f}x); "
               f"{reset.calls} streams opened and reset ({reset.note or 'connections kept'}); RSS +{grow} MiB peak, "
               f"+{lasting} MiB after; fds {fds0} before")  # fmt: skip


# -- after authentication ------------------------------------------------------------------------
def test_idle_authenticated_calls_are_bounded_and_the_owner_is_served(target: dict) -> None:
    """Calls with the secret that never send a request: at most 4 of one peer address
    wait (8 of all peers), for at most 5 s each, the rest are refused at once; the
    destination that owns the migration (its calls name it) is served meanwhile, and a
    new destination gets in within seconds."""
    t = target
    with RawClient(t["address"], t["secret"], ca=t["ca"] if t["tls"] else None) as owner:
        owner.handshake(owner_headers=True)
        owner.switchover()
        lane_addr = server_address(t, "lane")
        rogue = attacker.H2Client(lane_addr, t["tls"], secret=t["secret"])
        for _ in range(12):
            rogue.open("Stream")
        rogue.pump(0.5)
        busy = sum(1 for v in rogue.status.values() if v == "8")
        assert busy == 8, rogue.status  # RESOURCE_EXHAUSTED beyond the 4 one address may keep waiting
        t0 = time.perf_counter()
        for first in range(100, 4000, 400):
            assert owner.demand(first, 8).count == 8  # the owner's urgent path: served at once
        owner_ms = (time.perf_counter() - t0) * 1e3 / 10
        rogue.pump(6.0)
        assert list(rogue.status.values()).count("1") == 4, rogue.status  # CANCELLED by the source after 5 s
        rogue.close()
        owner.rollback_force()
    # a new destination while other peers keep 8 calls waiting: it retries and gets in
    rogue = attacker.H2Client(t["address"], t["tls"], secret=t["secret"])
    for _ in range(8):
        rogue.open("Describe")  # the control server's waiting slots
    rogue.pump(0.3)
    took, _ = _migrate(t, "newcomer")
    rogue.close()
    _figure(t, f"12 idle authenticated streams from one address: 4 waited (ended after 5 s), 8 refused at once; the owner's demand "
               f"requests took {owner_ms:.1f} ms each meanwhile; a new destination migrated in {took:.2f} s "
               f"with 8 calls waiting")  # fmt: skip


def test_compression_bombs_allocate_nothing(target: dict) -> None:
    """A missing-page map that declares 1 TiB, one that expands past a map's size, and a
    gzip-compressed gRPC message: refused, and the source's memory does not grow."""
    t = target
    md = (("authorization", f"Bearer {t['secret']}"),)
    npages = (64 << 20) // 4096
    with _channel(t) as ch:
        stub = pb_grpc.MigrationStub(ch)
        m = stub.Handshake(pb.HandshakeRequest(protocol_version=PROTOCOL_VERSION, session_token=os.urandom(16)),
                           metadata=md, timeout=30)  # fmt: skip
        stub.Switchover(pb.SwitchoverRequest(epoch=m.epoch), metadata=md, timeout=10)  # keep it paused
        peak = Peak(t["pid"])
        declared_1tib = zstd_frame_declaring(1 << 40)
        undeclared = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(npages * 64))
        host, port = t["address"].rsplit(":", 1)
        lane = _channel({**t, "address": f"{host}:{int(port) + m.lane_port_offsets[0]}"})
        for bomb in (declared_1tib, undeclared):
            ctl = pb.StreamControl(epoch=m.epoch, missing_map_zstd=bomb, lanes=1)
            call = pb_grpc.MigrationStub(lane).Stream(iter([ctl]), metadata=md, timeout=10)
            with pytest.raises(grpc.RpcError) as err:
                next(iter(call))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    lane_addr = server_address(t, "lane")
    gz_plain = attacker.gzip_bomb(lane_addr, t["tls"], None, size=16 << 20)
    gz_auth = attacker.gzip_bomb(lane_addr, t["tls"], t["secret"], size=16 << 20)
    grow, lasting = peak.stop()
    assert gz_plain.answered == {"16": 1}, gz_plain
    assert list(gz_auth.answered) and list(gz_auth.answered)[0] in ("8", "3"), gz_auth  # too large / invalid
    assert grow < 48 and lasting < 16, (grow, lasting)
    _figure(t, f"compression bombs: 1 TiB-declaring and oversize zstd maps INVALID_ARGUMENT; gzip message "
               f"{gz_plain.answered} without, {gz_auth.answered} with the secret; RSS +{grow} MiB peak")


def test_figures(request: pytest.FixtureRequest) -> None:
    """Runs last: the collected figures (the closing note quotes them)."""
    for line in FIGURES:
        print(line)
