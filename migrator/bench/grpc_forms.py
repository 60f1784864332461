"""`migrator bench grpc-forms`: the transport alone, in the forms gRPC Python offers.

A page server in its own process serves 4 KiB pages and 1 MiB bulk messages
from memory (no uffd, no protobuf: identity serializers, so only the transport
is measured).  The client measures a demand round trip (8-byte request, one
page back) as a sync unary call, a sync bidirectional stream, and an asyncio
bidirectional stream, each with the bulk channel idle and with a bulk stream
running at full speed on its own connection in the same client process (as in
`migrator dest`); and bulk throughput with one sync stream, two sync streams on
two connections, and one asyncio stream.
"""

from __future__ import annotations

import asyncio
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from concurrent import futures
from typing import Any

import grpc

from migrator.bench.report import table, write_json

PAGE = os.urandom(4096)
BULK = os.urandom(1 << 20)
OPTS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.use_local_subchannel_pool", 1)]
_ident = (lambda b: b, lambda b: b)


def _server(port_file: str) -> None:
    def unary(req: bytes, ctx: Any) -> bytes:
        return PAGE

    def bidi(reqs: Any, ctx: Any) -> Any:
        for _ in reqs:
            yield PAGE

    def bulk(req: bytes, ctx: Any) -> Any:
        n = int.from_bytes(req, "little")
        for _ in range(n):
            yield BULK

    handler = grpc.method_handlers_generic_handler("bench.Forms", {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, *_ident),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi, *_ident),
        "Bulk": grpc.unary_stream_rpc_method_handler(bulk, *_ident),
    })  # fmt: skip
    server = grpc.server(futures.ThreadPoolExecutor(8), options=OPTS)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with open(port_file + ".tmp", "w") as f:
        f.write(str(port))
    os.replace(port_file + ".tmp", port_file)
    server.wait_for_termination()


class _Bulk:
    """Pull bulk messages on their own channel(s) until stopped; measures GB/s."""

    def __init__(self, addr: str, streams: int = 1) -> None:
        self.stop = threading.Event()
        self.bytes = 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(addr,), daemon=True) for _ in range(streams)]

    def _run(self, addr: str) -> None:
        ch = grpc.insecure_channel(addr, options=OPTS)
        call = ch.unary_stream("/bench.Forms/Bulk", *_ident)(int(1 << 30).to_bytes(8, "little"))
        for msg in call:
            with self.lock:
                self.bytes += len(msg)
            if self.stop.is_set():
                call.cancel()
                break
        ch.close()

    def __enter__(self) -> "_Bulk":
        self.t0 = time.perf_counter()
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *a: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)


def _sync_unary(addr: str, n: int) -> list[float]:
    ch = grpc.insecure_channel(addr, options=OPTS)
    call = ch.unary_unary("/bench.Forms/Unary", *_ident)
    out = []
    for i in range(n):
        t = time.perf_counter_ns()
        call(i.to_bytes(8, "little"), timeout=10)
        out.append((time.perf_counter_ns() - t) / 1e3)
    ch.close()
    return out


def _sync_bidi(addr: str, n: int) -> list[float]:
    ch = grpc.insecure_channel(addr, options=OPTS)
    q: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
    responses = ch.stream_stream("/bench.Forms/Bidi", *_ident)(iter(q.get, None))
    out = []
    for i in range(n):
        t = time.perf_counter_ns()
        q.put(i.to_bytes(8, "little"))
        next(responses)
        out.append((time.perf_counter_ns() - t) / 1e3)
    q.put(None)
    ch.close()
    return out


def _aio_bidi(addr: str, n: int) -> list[float]:
    async def run() -> list[float]:
        async with grpc.aio.insecure_channel(addr, options=OPTS) as ch:
            call = ch.stream_stream("/bench.Forms/Bidi", *_ident)()
            out = []
            for i in range(n):
                t = time.perf_counter_ns()
                await call.write(i.to_bytes(8, "little"))
                await call.read()
                out.append((time.perf_counter_ns() - t) / 1e3)
            await call.done_writing()
            return out

    return asyncio.run(run())


def _aio_bulk(addr: str, nmsgs: int) -> float:
    async def run() -> float:
        async with grpc.aio.insecure_channel(addr, options=OPTS) as ch:
            call = ch.unary_stream("/bench.Forms/Bulk", *_ident)(nmsgs.to_bytes(8, "little"))
            t = time.perf_counter()
            total = 0
            async for msg in call:
                total += len(msg)
            return total / (time.perf_counter() - t) / 1e9

    return asyncio.run(run())


def grpc_forms(runs: int, out_dir: str, say, n: int = 2000) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    import tempfile

    tmp = tempfile.mkdtemp(prefix="migrator-forms-")
    pf = os.path.join(tmp, "port")
    srv = subprocess.Popen([sys.executable, "-c", f"from migrator.bench.grpc_forms import _server; _server({pf!r})"])
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(pf):
            if time.monotonic() > deadline or srv.poll() is not None:
                raise RuntimeError("grpc-forms server did not start")
            time.sleep(0.05)
        addr = f"127.0.0.1:{open(pf).read()}"
        forms = {"sync unary": _sync_unary, "sync bidi stream": _sync_bidi, "asyncio bidi stream": _aio_bidi}
        res: dict[str, list[float]] = {}
        for _ in range(runs):
            for name, fn in forms.items():
                for bulk in (False, True):
                    key = f"{name}, bulk {'running' if bulk else 'idle'}"
                    if bulk:
                        with _Bulk(addr):
                            time.sleep(0.2)
                            lat = sorted(fn(addr, n // 2))
                    else:
                        lat = sorted(fn(addr, n))
                    res.setdefault(key + ": p50 (us)", []).append(lat[len(lat) // 2])
                    res.setdefault(key + ": p99 (us)", []).append(lat[int(len(lat) * 0.99)])
                    say(f"  {key}: p50 {lat[len(lat) // 2]:.0f} us, p99 {lat[int(len(lat) * 0.99)]:.0f} us")
            for streams in (1, 2):
                with _Bulk(addr, streams) as b:
                    time.sleep(2.0)
                    rate = b.bytes / (time.perf_counter() - b.t0) / 1e9
                res.setdefault(f"bulk, {streams} sync stream{'s' if streams > 1 else ''} (GB/s)", []).append(rate)
                say(f"  bulk, {streams} sync stream(s): {rate:.2f} GB/s")
            rate = _aio_bulk(addr, 1024)
            res.setdefault("bulk, 1 asyncio stream (GB/s)", []).append(rate)
            say(f"  bulk, 1 asyncio stream: {rate:.2f} GB/s")
    finally:
        srv.kill()
        srv.wait()
    rows = [(k, v, "") for k, v in res.items()]
    medians = {k: statistics.median(v) for k, v in res.items()}
    write_json(os.path.join(out_dir, "grpc-forms.json"), "grpc-forms", {"round_trips": n, "runs": runs}, [res], medians)
    return {"text": table(rows), "medians": medians}
