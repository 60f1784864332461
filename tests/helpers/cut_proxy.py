"""A TCP proxy whose connections can be cut on demand (a network blip).

::

    with CutProxy(("127.0.0.1", 7000)) as proxy:
        ... connect to proxy.address ...
        proxy.cut()      # every open connection is reset (RST), both sides

New connections are accepted after a cut, as after a real blip.  Threads only,
bounded: close() stops everything, and the proxy never outlives ``lifetime_s``.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time


class CutProxy:
    def __init__(self, target: tuple[str, int], lifetime_s: float = 300.0) -> None:
        self.target = target
        self._lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._lsock.bind(("127.0.0.1", 0))
        self._lsock.listen(16)
        self._lsock.settimeout(0.2)
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._deadline = time.monotonic() + lifetime_s
        self.cuts = 0
        self.accepted = 0
        self._thread = threading.Thread(target=self._accept, name="cut-proxy", daemon=True)

    @property
    def address(self) -> str:
        host, port = self._lsock.getsockname()
        return f"{host}:{port}"

    def __enter__(self) -> CutProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            try:
                client, _ = self._lsock.accept()
            except (socket.timeout, OSError):
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
                self.accepted += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()
        self._stop.set()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(256 * 1024)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        """Reset every open connection (both directions), like a link that went away."""
        with self._lock:
            conns, self._conns = self._conns, []
            self.cuts += 1
        for s in conns:
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()

    def close(self) -> None:
        self._stop.set()
        self.cut()
        self._thread.join(5)
        self._lsock.close()
