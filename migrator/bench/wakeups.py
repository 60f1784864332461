"""`migrator bench wakeups`: the experiment of the kernel patch this project started from.

A fault storm served from a local page source (no network): a child process
with 1 or 4 threads touches every page of an empty registered mapping; 1, 2 or 4
fault handlers resolve the faults, waiting either in a blocking ``read()`` on
the uffd (on this kernel every waiter is woken for each fault) or in one epoll
instance each, holding the uffd with ``EPOLLEXCLUSIVE`` (one waiter is woken).

The handlers are separate *processes* sharing the uffd (``storm_handler.py``):
as Python threads of one process they would contend for one GIL, and the
context switches of that contention (3-4 per fault with 4 threads, measured)
swamp the kernel's wake-up policy that this experiment is about.  Each
handler reads one message per call, so a wasted wake-up is not hidden by
batching.  Measured: faults/s (timed by the faulting process), context
switches of the handlers per fault (/proc/PID/status, the kernel's own count),
and their CPU time per fault (/proc/PID/stat).
"""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from migrator.bench.report import table, write_json
from migrator.uffd.fd import Userfaultfd


def _switches_pid(pid: int) -> int:
    """Context switches of every thread of a process, from the kernel's own count."""
    n = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                n += int(line.split()[1])
    return n


def _cpu_pid(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")




def storm(mode: str, nthreads: int, npages: int, guest_threads: int = 4, batch: int = 1) -> dict[str, Any]:
    ps = mmap.PAGESIZE
    tmp = tempfile.mkdtemp(prefix="migrator-storm-")
    path = os.path.join(tmp, "s.sock")
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(1)
    lsock.settimeout(30)
    child = subprocess.Popen([sys.executable, "-m", "migrator.bench.storm_guest", path, str(npages), str(guest_threads), str(nthreads)])
    try:
        conn, _ = lsock.accept()
        conn.settimeout(120)
        msg, fds, _, _ = socket.recv_fds(conn, 4096, 1)
        hello = json.loads(msg)
        uffd = Userfaultfd(fds[0])
        uffd.api(0)
        base, total = hello["addr"], hello["npages"]
        uffd.register(base, total * ps)
        f = conn.makefile("rb")
        stopfd = os.eventfd(0, os.EFD_NONBLOCK)  # inherited by the handlers
        if mode == "read":
            fl = fcntl.fcntl(uffd.fd, fcntl.F_GETFL)
            fcntl.fcntl(uffd.fd, fcntl.F_SETFL, fl & ~os.O_NONBLOCK)
        handlers = [
            subprocess.Popen(
                [sys.executable, "-m", "migrator.bench.storm_handler", mode, str(uffd.fd), str(stopfd), str(base),
                 str(npages), str(batch)],
                pass_fds=(uffd.fd, stopfd), stdout=subprocess.PIPE, text=True,
            )
            for _ in range(nthreads)
        ]  # fmt: skip
        try:
            for h in handlers:
                assert h.stdout is not None and h.stdout.readline().strip() == "ready"
            time.sleep(0.05)  # let every handler reach its wait
            sw0 = sum(_switches_pid(h.pid) for h in handlers)
            cpu0 = sum(_cpu_pid(h.pid) for h in handlers)
            conn.sendall(b"go\n")
            res = json.loads(f.readline())
            sw1 = sum(_switches_pid(h.pid) for h in handlers)
            cpu1 = sum(_cpu_pid(h.pid) for h in handlers)
            conn.sendall(b"stop\n")
            f.readline()  # "done": every sentinel page was served (ending the blocking readers)
            os.eventfd_write(stopfd, 1)  # ends the epoll handlers
            for h in handlers:
                h.wait(timeout=10)
        finally:
            for h in handlers:
                if h.poll() is None:
                    h.kill()
                    h.wait()
            os.close(stopfd)
        return {
            "mode": mode, "threads": nthreads, "faults": npages, "handlers": "processes",
            "faults_per_s": npages / res["elapsed_s"], "switches_per_fault": (sw1 - sw0) / npages,
            "cpu_us_per_fault": (cpu1 - cpu0) / npages * 1e6,
        }  # fmt: skip
    finally:
        child.kill()
        child.wait()
        lsock.close()
        try:
            os.unlink(path)
            os.rmdir(tmp)
        except OSError:
            pass



def wakeups(runs: int, out_dir: str, say, npages: int = 20000) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """Two experiments, blocking read() vs EPOLLEXCLUSIVE, with 1, 2 and 4 handlers:

    * *isolated*: ONE faulting thread, so at most one fault is pending and every
      other handler only waits.  This isolates the wake-up policy: a wasted
      wake-up is a context switch with nothing to do (the kernel patch this
      project began from is about exactly that);
    * *storm*: four faulting threads, handlers always busy, which hides the
      policy (a woken handler usually finds work).
    """
    results = []
    rows = []
    for case, guest_threads in (("isolated", 1), ("storm", 4)):
        for nthreads in (1, 2, 4):
            for mode in ("read", "epoll"):
                rs = [storm(mode, nthreads, npages, guest_threads=guest_threads) for _ in range(runs)]
                for r in rs:
                    r["case"] = case
                results.extend(rs)
                label = (f"{case}: {nthreads} handler{'s' if nthreads > 1 else ''}, "
                         f"{'blocking read()' if mode == 'read' else 'EPOLLEXCLUSIVE'}")  # fmt: skip
                say(f"  {label}: {statistics.median(r['faults_per_s'] for r in rs):,.0f} faults/s, "
                    f"{statistics.median(r['switches_per_fault'] for r in rs):.2f} switches/fault")  # fmt: skip
                rows += [
                    (f"{label}: faults/s", [r["faults_per_s"] for r in rs], ""),
                    (f"{label}: switches/fault", [r["switches_per_fault"] for r in rs], ""),
                    (f"{label}: CPU us/fault", [r["cpu_us_per_fault"] for r in rs], ""),
                ]
    medians = {name: statistics.median(v) for name, v, _ in rows}
    write_json(os.path.join(out_dir, "wakeups.json"), "wakeups", {"npages": npages, "runs": runs}, results, medians)
    return {"text": table(rows), "medians": medians}
