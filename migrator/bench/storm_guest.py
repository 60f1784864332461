"""The fault-storm guest for `migrator bench wakeups`: a separate process whose
threads touch every page of an empty, uffd-registered mapping.

    python -m migrator.bench.storm_guest SOCKET NPAGES NTHREADS NSENTINELS

Protocol over the Unix socket: send {"addr", "npages"} + the uffd (SCM_RIGHTS);
wait for "go"; NTHREADS threads each read their share of the pages (ctypes
memmove: the GIL is released while a thread waits for its page); reply
{"elapsed_s"}; wait for "stop"; touch NSENTINELS extra pages one by one (each
ends one blocking-read handler thread); exit.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import socket
import sys
import threading
import time

from migrator.uffd.fd import create_userfaultfd


def main() -> int:
    path, npages, nthreads, nsent = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    ps = mmap.PAGESIZE
    total = npages + nsent
    m = mmap.mmap(-1, total * ps, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_NOHUGEPAGE)
    anchor = ctypes.c_char.from_buffer(m)
    base = ctypes.addressof(anchor)
    ufd = create_userfaultfd()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    socket.send_fds(sock, [json.dumps({"addr": base, "npages": total}).encode() + b"\n"], [ufd])
    os.close(ufd)
    f = sock.makefile("rb")
    if f.readline().strip() != b"go":
        return 1

    def worker(k: int) -> None:
        buf = (ctypes.c_char * 8)()
        for i in range(k, npages, nthreads):
            ctypes.memmove(buf, base + i * ps, 8)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(nthreads)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    sock.sendall(json.dumps({"elapsed_s": elapsed}).encode() + b"\n")
    if f.readline().strip() != b"stop":
        return 1
    buf = (ctypes.c_char * 8)()
    for i in range(npages, total):
        ctypes.memmove(buf, base + i * ps, 8)
    sock.sendall(b"done\n")
    return 0


if __name__ == "__main__":
    sys.stdout.flush()
    os._exit(main())
