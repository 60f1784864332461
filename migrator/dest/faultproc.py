"""The fault process: the guest's faults, the urgent stream and its installs.

It holds the guest's userfaultfd (passed by the session) and nothing of the
bulk path, so a vCPU's fault waits for the network, never for a bulk batch's
Python work (``workers.py``).  Run as ``python -m migrator.dest.faultproc``::

    config  {"npages", "page_size", "base", "window", "fault_threads", "lane_starts",
             "source": {"address", "secret", "tls"}, "uffd_fd", "shm_fd", "slot"}
    epoch   {"epoch"}   open the urgent stream for this migration (before the resume)
    replay  {"path", "wait_s"}  ask for a recorded working set first (``workingset.py``)
    stop                stop; answer with the faults' latencies and the timeline

Events: ``ready`` (the urgent connection is up), ``lost``/``back`` (the urgent
stream), ``fatal`` (with the error, which ends the migration).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from migrator.dest.demand import DemandChannel, describe_error
from migrator.dest.fault import FaultHandler, FaultThreads
from migrator.dest.gate import Gate
from migrator.dest.install import Installer
from migrator.dest.pagestate import PageState
from migrator.dest.local_source import open_page_source
from migrator.dest import workingset
from migrator.source.serving import MAX_DEMAND_PAGES
from migrator.errors import MigratorError
from migrator.uffd.fd import Userfaultfd
from migrator.workers import WorkerSide


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    side = WorkerSide()
    cfg: dict[str, Any] = side.config
    npages, psize, base = int(cfg["npages"]), int(cfg["page_size"]), int(cfg["base"])
    ps = PageState.attach(int(cfg["shm_fd"]), npages)
    uffd = Userfaultfd(int(cfg["uffd_fd"]))
    counters = ps.counters(int(cfg["slot"]))
    gate = Gate(int(cfg["shm_fd"]), ps.words)
    lanes = len(cfg["lane_starts"])
    installer = Installer(uffd, ps, base, psize, counters, gate, 0)
    source = open_page_source(cfg["source"])
    try:
        source.ready(timeout=float(cfg.get("connect_timeout", 10)))
    except MigratorError as exc:
        side.event("fatal", **describe_error(exc))
        return 4
    demand = DemandChannel(source, installer, ps, counters, side.event)
    handler = FaultHandler(uffd, ps, installer, base, psize, demand.request, int(cfg["window"]),
                           [int(x) for x in cfg["lane_starts"]], counters, demand.discarded)  # fmt: skip
    faults = FaultThreads(uffd, handler, int(cfg["fault_threads"]), lambda exc: side.event("fatal", **describe_error(exc)),
                          gate, lanes)  # fmt: skip
    faults.start()
    side.event("ready")

    def epoch(msg: dict[str, Any]) -> None:
        demand.start(int(msg["epoch"]))

    def replay(msg: dict[str, Any]) -> dict[str, Any]:
        pages = workingset.load(str(msg["path"]), image="", npages=npages, page_size=psize)
        return workingset.replay(ps, demand.request, pages, MAX_DEMAND_PAGES, float(msg.get("wait_s", 0)))

    def stop() -> dict[str, Any]:
        faults.stop()
        demand.stop()
        return {"faults": fault_latencies(handler.records, ps), "timeline": demand.timeline,
                "touched": workingset.first_touches(handler.records)}  # fmt: skip

    side.serve({"epoch": epoch, "replay": replay}, on_stop=stop)
    source.close()
    return 0


def fault_latencies(records: list[tuple[int, int, int]], ps: PageState) -> list[tuple[int, int, int]]:
    """(latency ns, resolved at ns, thread) of every fault that waited for a page.

    A fault's page is resolved when it was installed (``installed_ns``, written
    by whichever process installed it); a fault read after its page was
    already there (a race with an install) did not wait, and is left out.
    """
    out = []
    for page, t_fault, tid in records:
        t_done = ps.installed_at(page)
        if t_done > t_fault:
            out.append((t_done - t_fault, t_done, tid))
    return out


if __name__ == "__main__":
    sys.exit(main())
