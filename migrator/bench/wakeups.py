"""`migrator bench wakeups`: the experiment of the kernel patch this project started from.

A fault storm served from a local page source (no network): a child process
with 4 threads touches every page of an empty registered mapping; this process
resolves the faults with 1, 2 or 4 fault threads that wait either in a blocking
``read()`` on the uffd (on this kernel: every waiter is woken for each fault)
or in one epoll instance per thread holding the uffd with ``EPOLLEXCLUSIVE``
(one waiter is woken).  Each thread reads one message per call, so a wasted
wake-up is visible.  Measured: faults/s, context switches of the fault threads
per fault (from /proc/self/task/TID/status, the kernel's own count), and CPU
time of this process per fault.
"""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import resource
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from migrator.bench.report import table, write_json
from migrator.uffd import abi
from migrator.uffd.fd import Userfaultfd


def _switches(tids: list[int]) -> int:
    n = 0
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/status") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        n += int(line.split()[1])
        except FileNotFoundError:
            pass
    return n


def storm(mode: str, nthreads: int, npages: int, guest_threads: int = 4) -> dict[str, Any]:
    ps = mmap.PAGESIZE
    page = bytes(range(256)) * (ps // 256)
    src_addr = _addr(page)
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
        stopfd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        tids: list[int] = []
        ready = threading.Barrier(nthreads + 1)
        handled = [0] * nthreads
        errors: list[BaseException] = []

        def serve(f_) -> bool:  # type: ignore[no-untyped-def]
            """Install the faulted page; True if it was a sentinel (stop)."""
            p = (f_.address - base) // ps
            uffd.copy_page(base + p * ps, src_addr, ps)
            return p >= npages

        def reader(k: int) -> None:
            tids.append(threading.get_native_id())
            ready.wait()
            try:
                while True:
                    for f_ in uffd.read_faults(1):  # blocking fd: waits in read()
                        handled[k] += 1
                        if serve(f_):
                            return
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        def epoller(k: int) -> None:
            tids.append(threading.get_native_id())
            ep = select.epoll()
            ep.register(uffd.fd, select.EPOLLIN | select.EPOLLEXCLUSIVE)
            ep.register(stopfd, select.EPOLLIN)
            ready.wait()
            try:
                while True:
                    ev = ep.poll()
                    if any(fd == stopfd for fd, _ in ev):
                        return
                    for f_ in uffd.read_faults(1):
                        handled[k] += 1
                        serve(f_)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
            finally:
                ep.close()

        if mode == "read":
            fl = fcntl.fcntl(uffd.fd, fcntl.F_GETFL)
            fcntl.fcntl(uffd.fd, fcntl.F_SETFL, fl & ~os.O_NONBLOCK)
        target = reader if mode == "read" else epoller
        threads = [threading.Thread(target=target, args=(k,), name=f"fault-{k}", daemon=True) for k in range(nthreads)]
        for t in threads:
            t.start()
        ready.wait(timeout=10)
        sw0 = _switches(tids)
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        conn.sendall(b"go\n")
        res = json.loads(f.readline())
        wall = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        sw1 = _switches(tids)
        conn.sendall(b"stop\n")
        f.readline()  # "done": every sentinel page was served (ending the blocking readers)
        os.eventfd_write(stopfd, 1)  # ends the epoll threads
        for t in threads:
            t.join(timeout=10)
        if errors:
            raise errors[0]
        cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        return {
            "mode": mode, "threads": nthreads, "faults": npages,
            "faults_per_s": npages / res["elapsed_s"], "switches_per_fault": (sw1 - sw0) / npages,
            "cpu_us_per_fault": cpu / npages * 1e6, "wall_s": wall,
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


def _addr(b: bytes) -> int:
    import ctypes

    return ctypes.cast(ctypes.c_char_p(b), ctypes.c_void_p).value or 0


def wakeups(runs: int, out_dir: str, say, npages: int = 20000) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    results = []
    rows = []
    for nthreads in (1, 2, 4):
        for mode in ("read", "epoll"):
            rs = [storm(mode, nthreads, npages) for _ in range(runs)]
            results.extend(rs)
            label = f"{nthreads} thread{'s' if nthreads > 1 else ''}, {'blocking read()' if mode == 'read' else 'EPOLLEXCLUSIVE'}"
            say(f"  {label}: {statistics.median(r['faults_per_s'] for r in rs):,.0f} faults/s, "
                f"{statistics.median(r['switches_per_fault'] for r in rs):.2f} switches/fault")  # fmt: skip
            rows += [
                (f"{label}: faults/s", [r["faults_per_s"] for r in rs], ""),
                (f"{label}: switches/fault", [r["switches_per_fault"] for r in rs],
                 "target <= 1.5 with 4 threads" if mode == "epoll" and nthreads == 4 else ""),  # fmt: skip
                (f"{label}: CPU us/fault", [r["cpu_us_per_fault"] for r in rs], ""),
            ]
    medians = {name: statistics.median(v) for name, v, _ in rows}
    write_json(os.path.join(out_dir, "wakeups.json"), "wakeups", {"npages": npages, "runs": runs, "guest_threads": 4}, results, medians)
    return {"text": table(rows), "medians": medians}
