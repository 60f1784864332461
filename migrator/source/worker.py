"""A source worker process: the urgent server (Demand streams) or a bulk lane
server (Stream), each a gRPC server on its own port, reading the paused
guest's RAM through a descriptor the session passed, and sharing the page maps
(``shared.py``).  Started and commanded by the session (``workers.py``)::

    config  {"role": "urgent"|"lane", "slot", "host", "port", "npages",
             "page_size", "addr", "pid", "shm_fd", "mem_fd", "secret", "tls"}
    end       {"epoch", "why"}   the epoch ended: its streams are cancelled
                                 before the answer (the session then resumes)
    map-ready {"epoch"}          the untouched map is valid: lanes may stream
    stop                         close the server; answer with the counters

Run as ``python -m migrator.source.worker``.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import grpc

from migrator.security import TlsFiles
from migrator.source import shared as sh
from migrator.source.ram_reader import MappedRam, RamReader
from migrator.source.servicer import make_server, streaming
from migrator.source.serving import MAX_STREAMS, PageServer
from migrator.wire import migration_pb2 as pb
from migrator.workers import WorkerSide, set_thread_name

SERVICE = "migrator.wire.Migration"


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    side = WorkerSide()
    cfg: dict[str, Any] = side.config
    npages, role = int(cfg["npages"]), cfg["role"]
    shared = sh.attach(int(cfg["shm_fd"]), npages)
    reader: Any
    if int(cfg.get("ram_fd", -1)) >= 0:
        reader = MappedRam(int(cfg["ram_fd"]), npages * int(cfg["page_size"]), int(cfg["page_size"]))
    else:
        reader = RamReader(int(cfg["pid"]), int(cfg["addr"]), npages * int(cfg["page_size"]), int(cfg["page_size"]),
                           mem_fd=int(cfg["mem_fd"]))  # fmt: skip
    pages = PageServer(shared, reader, npages, sh.Counters(shared, int(cfg["slot"])))
    kind = "demand" if role == "urgent" else "bulk"
    behavior: Any
    req: Any
    if role == "urgent":
        method, behavior, req = "Demand", pages.demand, pb.DemandRequest
    else:
        method, behavior, req = "Stream", pages.stream, pb.StreamControl

    def serve_stream(requests, context):  # type: ignore[no-untyped-def]
        set_thread_name(f"{side.name}-rpc"[:15])
        yield from streaming(context, lambda: behavior(requests, context.cancel))

    handler = grpc.method_handlers_generic_handler(
        SERVICE, {method: grpc.stream_stream_rpc_method_handler(serve_stream, request_deserializer=req.FromString)}
    )  # responses are serialized PageBatch bytes already (wire/fastbatch.py)
    tls = TlsFiles(**cfg["tls"]) if cfg.get("tls") else None
    try:
        server, port = make_server(
            [handler], f"{cfg['host']}:{cfg['port']}", npages=npages, page_size=int(cfg["page_size"]),
            secret=cfg.get("secret"), tls=tls, current_epoch=lambda: shared.words[sh.EPOCH],
            streams=MAX_STREAMS[kind], name=side.name,
        )  # fmt: skip
    except OSError as exc:
        side.event("failed", error=str(exc))
        return 3
    side.event("ready", port=port)

    def end(msg: dict[str, Any]) -> None:
        pages.end_epoch(int(msg["epoch"]), str(msg["why"]))

    def map_ready(msg: dict[str, Any]) -> None:
        pages.map_ready(int(msg["epoch"]))

    def stop() -> dict[str, Any]:
        server.stop(grace=0.5).wait(2)
        return {}

    side.serve({"end": end, "map-ready": map_ready}, on_stop=stop)
    server.stop(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
