"""The destination's worker processes: the fault process and the bulk lanes.

Started by the session before the pause (so that starting Python, importing
gRPC and connecting cost no downtime); each holds the guest's userfaultfd and
the shared page state, and talks to its own server on the source.  Priorities:
the fault process first (nice -10 where CAP_SYS_NICE allows), the lanes at 0,
the guest's vCPUs at +10 while pages are missing (``session.py``).

Events from the workers come to :meth:`Crew.next_event` as (worker, event);
the session turns them into progress, recovery and failures.
"""

from __future__ import annotations

import queue
import time
from typing import Any

from migrator import errors
from migrator.dest.pagestate import PageState
from migrator.errors import MigratorError
from migrator.source.serving import lane_range
from migrator.workers import Worker, WorkerError

FAULT_NICE = -10


class Crew:
    def __init__(self, ps: PageState, uffd_fd: int, base: int, page_size: int, lanes: int, source: dict[str, Any],
                 urgent_address: str, lane_addresses: list[str], *, window: int, fault_threads: int,
                 batch_pages: int, compress: str, loopback: bool, connect_timeout: float) -> None:  # fmt: skip
        self.ps = ps
        self.events: queue.SimpleQueue[tuple[str, dict[str, Any]]] = queue.SimpleQueue()
        npages = ps.npages
        common = {"npages": npages, "page_size": page_size, "base": base, "uffd_fd": uffd_fd, "shm_fd": ps.fd,
                  "connect_timeout": connect_timeout}  # fmt: skip
        fds = [uffd_fd, ps.fd]
        self.fault = Worker(
            "migrator.dest.faultproc", "dst-fault",
            {**common, "slot": 0, "window": window, "fault_threads": fault_threads,
             "lane_starts": [lane_range(i, lanes, npages)[0] for i in range(lanes)],
             "source": {**source, "address": urgent_address}},
            fds, self.events, nice=FAULT_NICE,
        )  # fmt: skip
        self.lanes: list[Worker] = []
        try:
            for i in range(lanes):
                cfg = {**common, "slot": 1 + i, "lane": i, "lanes": lanes, "batch_pages": batch_pages, "heap_keep_mib": 512,
                       "compress": compress, "loopback": loopback, "source": {**source, "address": lane_addresses[i]}}  # fmt: skip
                self.lanes.append(Worker("migrator.dest.lane", f"dst-lane{i}", cfg, fds, self.events))
        except BaseException:
            self.kill()
            raise
        self.all = [self.fault, *self.lanes]

    @property
    def nslots(self) -> int:
        return 1 + len(self.lanes)

    def wait_ready(self, timeout: float) -> None:
        """Every worker is up and connected to its server on the source."""
        ready: set[str] = set()
        deadline = time.monotonic() + timeout
        while len(ready) < len(self.all):
            name, ev = self.next_event(max(0.05, deadline - time.monotonic()))
            if not name:
                raise errors.SourceUnreachable(f"the destination's workers did not connect within {timeout:g} s")
            if ev.get("event") == "ready":
                ready.add(name)
            else:
                raise event_error(name, ev)

    def next_event(self, timeout: float) -> tuple[str, dict[str, Any]]:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return "", {}

    def open_urgent(self, epoch: int) -> int:
        """Ask the fault process to open its urgent stream; returns the command id to wait on."""
        return self.fault.send("epoch", epoch=epoch)

    def start_lanes(self, epoch: int, resync: bool = False) -> None:
        for w in self.lanes:
            w.send("start", epoch=epoch, resync=resync)

    def start_precopy(self, epoch: int, guest_pid: int) -> None:
        for w in self.lanes:
            w.call("precopy", timeout=10, epoch=epoch, guest_pid=guest_pid)

    def stop_precopy(self) -> dict[str, Any]:
        """Every lane ends its pre-copy (before the handshake); their counts, summed,
        and ``unclean``: the lanes whose stream did not end with the source's ``last``."""
        total: dict[str, Any] = {"unclean": []}
        for i, w in enumerate(self.lanes):
            reply = w.call("precopy-stop", timeout=60)
            if not reply.get("clean"):
                total["unclean"].append(i)
            for k in ("installed", "rewritten", "batches", "wire_bytes", "rounds"):
                v = int(reply.get(k, 0))
                total[k] = max(total.get(k, 0), v) if k == "rounds" else total.get(k, 0) + v
        return total

    def stop(self) -> dict[str, dict[str, Any]]:
        """Stop every worker; their final reports by name."""
        reports = {}
        for w in self.all:
            try:
                reports[w.name] = w.stop(timeout=10) or {}
            except WorkerError:
                reports[w.name] = {}
        return reports

    def kill(self) -> None:
        for w in [getattr(self, "fault", None), *getattr(self, "lanes", [])]:
            if w is not None:
                w.close(timeout=2)


def event_error(name: str, ev: dict[str, Any]) -> MigratorError:
    """A worker's ``fatal`` (or unexpected) event as the exception it describes."""
    if ev.get("event") == "exited":
        return MigratorError(f"the destination's {name} process exited unexpectedly")
    kind = getattr(errors, str(ev.get("kind", "MigratorError")), None)
    cls = kind if isinstance(kind, type) and issubclass(kind, MigratorError) else MigratorError
    exc = MigratorError.__new__(cls)
    MigratorError.__init__(exc, str(ev.get("error", f"{name}: {ev}")), **dict(ev.get("fields", {})))
    if isinstance(exc, errors.UffdError):
        exc.errno = 0
    return exc
