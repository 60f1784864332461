"""A TCP proxy that reads the HTTP/2 it forwards, and resets the link at a chosen call.

::

    with H2Proxy(("127.0.0.1", 7000)) as proxy:
        done = proxy.cut_at("Complete", when="request")    # the request never arrives
        done = proxy.cut_at("Handshake", when="response")  # it arrives; its reply is lost
        ... connect to proxy.address ...
        done.wait(30)

A cut resets every open connection (RST, both sides), as a real link reset
would; the client may then reconnect through the proxy.  ``cut()`` does it at
once (a network blip at any moment).

A source listens on a block of ports (control P, urgent P+1, lanes P+2...):
the proxy listens on a block of the same size and forwards port Q+k to P+k,
so the destination, which finds the other ports by their offsets from the
one it was given, goes through the proxy for all of them.  Frames are parsed
with hyperframe's layout (9-byte header) and the request headers decoded with
hpack (python-hyper), so the proxy knows each stream's ``:path``.  Plain TCP
only (a TLS link cannot be read).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HEADERS, CONTINUATION, DATA = 0x1, 0x9, 0x0
END_HEADERS, PADDED, PRIORITY = 0x4, 0x8, 0x20


@dataclass
class Rule:
    method: str
    when: str  # "request" | "response"
    nth: int
    seen: int = 0
    stream: int | None = None  # the matched stream (when == "response")
    done: threading.Event = field(default_factory=threading.Event)


class _Conn:
    def __init__(self, proxy: "H2Proxy", client: socket.socket, upstream: socket.socket) -> None:
        self.proxy, self.client, self.upstream = proxy, client, upstream
        self.decoder = hpack.Decoder()
        self.block = b""  # a header block across CONTINUATION frames
        self.block_stream = 0

    def start(self) -> None:
        threading.Thread(target=self._pump, args=(self.client, self.upstream, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.upstream, self.client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        buf = b""
        preface = from_client
        rate, t0, sent = self.proxy.rate, time.monotonic(), 0
        try:
            while True:
                data = src.recv(64 * 1024 if rate else 256 * 1024)
                if not data:
                    break
                buf += data
                if preface:
                    if len(buf) < len(PREFACE):
                        continue
                    dst.sendall(buf[: len(PREFACE)])
                    buf, preface = buf[len(PREFACE) :], False
                while len(buf) >= 9:
                    length = int.from_bytes(buf[:3], "big")
                    if len(buf) < 9 + length:
                        break
                    frame, buf = buf[: 9 + length], buf[9 + length :]
                    if self.proxy._inspect(self, frame, from_client):
                        return  # cut: the frame is never forwarded
                    dst.sendall(frame)
                    if rate:
                        sent += len(frame)
                        ahead = sent / rate - (time.monotonic() - t0)
                        if ahead > 0:
                            time.sleep(ahead)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def request_path(self, frame: bytes) -> tuple[int, str] | None:
        """(stream, :path) once a client header block is complete, else None."""
        ftype, flags = frame[3], frame[4]
        stream = int.from_bytes(frame[5:9], "big") & 0x7FFFFFFF
        payload = frame[9:]
        if ftype == HEADERS:
            if flags & PADDED:
                pad = payload[0]
                payload = payload[1 : len(payload) - pad]
            if flags & PRIORITY:
                payload = payload[5:]
            self.block, self.block_stream = payload, stream
        elif ftype == CONTINUATION:
            self.block += payload
        else:
            return None
        if not flags & END_HEADERS:
            return None
        headers = dict((k if isinstance(k, str) else k.decode(), v if isinstance(v, str) else v.decode())
                       for k, v in self.decoder.decode(self.block))  # fmt: skip
        return self.block_stream, headers.get(":path", "")

    def reset(self) -> None:
        for s in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()


def _listen_block(n: int) -> list[socket.socket]:
    """Listening sockets on n consecutive free loopback ports."""
    for _ in range(50):
        first = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        first.bind(("127.0.0.1", 0))
        base = first.getsockname()[1]
        socks = [first]
        try:
            for k in range(1, n):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind(("127.0.0.1", base + k))
        except OSError:
            for s in socks:
                s.close()
            continue
        for s in socks:
            s.listen(16)
            s.settimeout(0.2)
        return socks
    raise OSError(f"no block of {n} free ports")


class H2Proxy:
    """``rate``: bytes/s each connection may carry each way (None: as fast as it goes)."""

    def __init__(self, target: tuple[str, int], lifetime_s: float = 300.0, ports: int = 8, rate: float | None = None) -> None:
        self.target = target
        self.rate = rate
        self._lsocks = _listen_block(ports)
        self._lsock = self._lsocks[0]
        self._conns: list[_Conn] = []
        self._rules: list[Rule] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._deadline = time.monotonic() + lifetime_s
        self.cuts = 0
        self.accepted = 0  # connections accepted so far
        self.paths: list[str] = []  # every request path seen, in order
        self._threads = [threading.Thread(target=self._accept, args=(k,), name=f"h2-proxy{k}", daemon=True)
                         for k in range(len(self._lsocks))]  # fmt: skip

    @property
    def address(self) -> str:
        host, port = self._lsock.getsockname()
        return f"{host}:{port}"

    def __enter__(self) -> H2Proxy:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def cut_at(self, method: str, when: str = "request", nth: int = 1) -> threading.Event:
        """Reset the link at the ``nth`` call of ``method`` (e.g. "Complete"): before its
        request is forwarded, or (``when="response"``) before its first reply frame is."""
        assert when in ("request", "response")
        rule = Rule(method, when, nth)
        with self._lock:
            self._rules.append(rule)
        return rule.done

    def _inspect(self, conn: _Conn, frame: bytes, from_client: bool) -> bool:
        """True if the link was cut at this frame."""
        stream = int.from_bytes(frame[5:9], "big") & 0x7FFFFFFF
        with self._lock:
            if from_client:
                found = conn.request_path(frame)
                if found is None:
                    return False
                sid, path = found
                self.paths.append(path)
                for rule in self._rules:
                    if rule.done.is_set() or rule.stream is not None or not path.endswith("/" + rule.method):
                        continue
                    rule.seen += 1
                    if rule.seen == rule.nth:
                        if rule.when == "request":
                            self._cut_locked(rule)
                            return True
                        rule.stream = sid
                        rule.conn = conn  # type: ignore[attr-defined]
                return False
            if frame[3] not in (HEADERS, DATA):
                return False
            for rule in self._rules:
                if not rule.done.is_set() and rule.stream == stream and getattr(rule, "conn", None) is conn:
                    self._cut_locked(rule)
                    return True
        return False

    def _cut_locked(self, rule: Rule | None) -> None:
        conns, self._conns = self._conns, []
        self.cuts += 1
        for c in conns:
            c.reset()
        if rule is not None:
            rule.done.set()

    def cut(self) -> None:
        """Reset every open connection now."""
        with self._lock:
            self._cut_locked(None)

    def _accept(self, k: int) -> None:
        lsock = self._lsocks[k]
        target = (self.target[0], self.target[1] + k)
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            try:
                client, _ = lsock.accept()
            except (socket.timeout, OSError):
                continue
            try:
                upstream = socket.create_connection(target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            if self.rate:  # small buffers: a rate limit, not a queue (a queue would delay gRPC's pings too)
                for sock in (client, upstream):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 128 * 1024)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 128 * 1024)
            conn = _Conn(self, client, upstream)
            with self._lock:
                self._conns.append(conn)
                self.accepted += 1
            conn.start()
        self._stop.set()

    def close(self) -> None:
        self._stop.set()
        self.cut()
        for t in self._threads:
            t.join(5)
        for s in self._lsocks:
            s.close()
