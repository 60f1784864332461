"""A tiny multi-threaded 'guest' for tests/test_review_issue11_race.py (review of acc59aa).

    python -m tests.helpers.review_child SOCK_FD NPAGES

Maps NPAGES of anonymous private RAM, creates a userfaultfd, sends
{"addr", "size", "page_size", "pid"} + the uffd over the socket, closes its copy,
then serves commands (one JSON object a line), each in a thread of its own so
that one blocked in a fault or in madvise never stops the others:

    {"op": "read", "page": P, "id": I}                 -> {"id", "zero", "head"}
    {"op": "madvise", "page": P, "count": N, "id": I}  -> {"id", "rc"}
    {"op": "mremap", "page": P, "count": N, "grow": G, "id": I} -> {"id", "new"}  (moved, N + G pages long)
    {"op": "read-addr", "address": A, "id": I}         -> {"id", "zero"}
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import socket
import sys
import threading

from migrator.uffd.fd import create_userfaultfd

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.mremap.restype = ctypes.c_void_p
_libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]


def main() -> int:
    sock = socket.socket(fileno=int(sys.argv[1]))
    npages = int(sys.argv[2])
    ps = mmap.PAGESIZE
    ram = mmap.mmap(-1, npages * ps, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    ram.madvise(mmap.MADV_NOHUGEPAGE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(ram))
    uffd = create_userfaultfd()
    socket.send_fds(sock, [json.dumps({"addr": addr, "size": npages * ps, "page_size": ps, "pid": os.getpid()}).encode()
                           + b"\n"], [uffd])  # fmt: skip
    os.close(uffd)
    lock = threading.Lock()

    def reply(obj: dict[str, object]) -> None:
        with lock:
            sock.sendall(json.dumps(obj).encode() + b"\n")

    def run(cmd: dict[str, object]) -> None:
        op, i = cmd["op"], cmd["id"]
        p = int(cmd.get("page", 0))  # type: ignore[arg-type]
        if op == "read-addr":
            buf = (ctypes.c_char * ps)()
            ctypes.memmove(buf, int(cmd["address"]), ps)  # type: ignore[arg-type]
            reply({"id": i, "zero": bytes(buf) == bytes(ps)})
        elif op == "read":
            buf = (ctypes.c_char * ps)()
            ctypes.memmove(buf, addr + p * ps, ps)
            raw = bytes(buf)
            reply({"id": i, "zero": raw == bytes(ps), "head": raw[:16].hex()})
        elif op == "madvise":
            rc = _libc.madvise(ctypes.c_void_p(addr + p * ps), int(cmd["count"]) * ps, 4)  # type: ignore[arg-type]
            reply({"id": i, "rc": rc})
        elif op == "mremap":
            n = int(cmd["count"]) * ps  # type: ignore[arg-type]
            grown = n + int(cmd.get("grow", 0)) * ps  # type: ignore[arg-type]
            spot = _libc.mmap(None, grown, 0, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
            new = _libc.mremap(ctypes.c_void_p(addr + p * ps), n, grown, 3, ctypes.c_void_p(spot))
            reply({"id": i, "new": new})

    for line in sock.makefile("rb"):
        cmd = json.loads(line)
        if cmd["op"] == "exit":
            break
        threading.Thread(target=run, args=(cmd,), daemon=True).start()
    return 0


if __name__ == "__main__":
    sys.exit(main())
