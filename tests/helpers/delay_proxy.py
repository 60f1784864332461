"""A TCP proxy that adds a fixed one-way delay in each direction (netem without netem).

::

    with DelayProxy(("127.0.0.1", 7000), delay_s=0.010) as proxy:
        run(["migrator", "dest", "--source", proxy.address, ...])

    python tests/helpers/delay_proxy.py --to 127.0.0.1:7000 --delay-ms 10   # standalone

Every accepted connection gets its own upstream connection; many may be open
at once.  A source listens on a block of ports (control P, urgent P+1, lanes
P+2...): the proxy listens on a block of ``ports`` ports and forwards Q+k to
P+k, so a destination given the proxy's address goes through it for all.  Each direction
is a delay line: a reader stamps every chunk with ``arrival + delay`` and queues
it, a writer sends it when that moment has come.  Chunks keep their order and
the line is pipelined, so it adds latency, not a bandwidth limit (a round trip
through the proxy costs ``2 * delay``).  A half-close (EOF) is delayed like data.

Bounded: the proxy runs on an asyncio loop in one daemon thread, stops after
``lifetime_s`` whatever happens, and :meth:`close` stops it sooner, closing every
connection.  The queue per direction is bounded, so a slow receiver slows the
sender down (TCP back-pressure goes through the proxy).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import threading
import time

CHUNK = 256 * 1024
QUEUE_CHUNKS = 1024


class DelayProxy:
    """Listen on ``listen``, forward to ``target``, delay every chunk by ``delay_s`` each way."""

    def __init__(
        self,
        target: tuple[str, int],
        delay_s: float,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        lifetime_s: float = 300.0,
        ports: int = 8,
    ) -> None:
        self.target, self.delay_s, self.listen, self.lifetime_s = target, delay_s, listen, lifetime_s
        self.ports = ports
        self.connections = 0
        self.bytes_up = 0  # client -> target
        self.bytes_down = 0  # target -> client
        self.errors: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._port = 0
        self._ready = threading.Event()
        self._stopped: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="delay-proxy", daemon=True)

    # -- lifecycle (test thread) ---------------------------------------------------------
    def __enter__(self) -> DelayProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10) or not self._port:
            self.close()
            raise RuntimeError(f"delay proxy did not start: {self.errors}")

    @property
    def address(self) -> str:
        return f"{self.listen[0]}:{self._port}"

    def close(self, timeout: float = 10.0) -> None:
        if self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # loop already closed
                self._loop.call_soon_threadsafe(self._request_stop)
            self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError("delay proxy thread did not stop")

    # -- the loop (proxy thread) ---------------------------------------------------------
    def _request_stop(self) -> None:
        if self._stopped is not None:
            self._stopped.set()

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._main())
        finally:
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()
            self._ready.set()

    async def _main(self) -> None:
        self._stopped = asyncio.Event()
        tasks: set[asyncio.Task[None]] = set()

        def on_client(k: int):  # type: ignore[no-untyped-def]
            async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                task = asyncio.current_task()
                assert task is not None
                tasks.add(task)
                try:
                    await self._serve(reader, writer, k)
                finally:
                    tasks.discard(task)

            return serve

        from helpers.h2_proxy import _listen_block

        try:
            socks = _listen_block(self.ports)
            servers = [await asyncio.start_server(on_client(k), sock=s) for k, s in enumerate(socks)]
        except OSError as exc:
            self.errors.append(f"listen {self.listen}: {exc}")
            return
        self._port = servers[0].sockets[0].getsockname()[1]
        self._ready.set()
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), self.lifetime_s)
        finally:
            for server in servers:
                server.close()
            for t in list(tasks):
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for server in servers:
                await server.wait_closed()

    async def _serve(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter, k: int = 0) -> None:
        self.connections += 1
        u_writer: asyncio.StreamWriter | None = None
        try:
            u_reader, u_writer = await asyncio.open_connection(self.target[0], self.target[1] + k)
            up = asyncio.ensure_future(self._line(c_reader, u_writer, "up"))
            down = asyncio.ensure_future(self._line(u_reader, c_writer, "down"))
            try:
                await asyncio.gather(up, down)
            finally:
                up.cancel()
                down.cancel()
                await asyncio.gather(up, down, return_exceptions=True)
        except OSError as exc:
            self.errors.append(f"connection: {exc}")
        finally:
            for w in (c_writer, u_writer):
                if w is not None:
                    w.close()
                    with contextlib.suppress(OSError, asyncio.CancelledError):
                        await w.wait_closed()

    async def _line(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str) -> None:
        """One direction: read, stamp, queue; send each chunk once its time has come."""
        q: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUE_CHUNKS)

        async def pump_in() -> None:
            while True:
                try:
                    data = await reader.read(CHUNK)
                except OSError:
                    data = b""
                await q.put((time.monotonic() + self.delay_s, data))
                if not data:
                    return

        feeder = asyncio.ensure_future(pump_in())
        try:
            while True:
                due, data = await q.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    if writer.can_write_eof():
                        with contextlib.suppress(OSError):
                            writer.write_eof()
                    return
                if direction == "up":
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
                writer.write(data)
                try:
                    await writer.drain()
                except OSError:
                    return
        finally:
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)


def _addr(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host, int(port)


def main() -> None:
    ap = argparse.ArgumentParser(description="TCP proxy adding a one-way delay in each direction.")
    ap.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to listen on (port 0 picks one)")
    ap.add_argument("--to", required=True, help="HOST:PORT to forward to")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay per direction")
    ap.add_argument("--lifetime", type=float, default=300.0, help="seconds before the proxy stops by itself")
    a = ap.parse_args()
    with DelayProxy(_addr(a.to), a.delay_ms / 1e3, _addr(a.listen), a.lifetime) as proxy:
        print(proxy.address, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            proxy._thread.join()


if __name__ == "__main__":
    main()
