"""A tiny 'guest' for tests/test_uffd_bindings.py: owns RAM that faults, never handles faults.

The hard rule of the project: RAM that faults and the code that resolves its
faults never share a Python process.  This script is the RAM side.

    python tests/uffd_child.py SOCK_FD NPAGES

It maps NPAGES of anonymous private memory, creates a userfaultfd for it, sends
``{"addr", "size", "page_size", "pid"}`` plus the uffd (SCM_RIGHTS) over the
socket, closes its own copy of the uffd, and then serves commands, one JSON
object per line:

    {"op": "read", "page": P, "count": N}   -> {"tid", "sha256": [...], "head": [...]}
    {"op": "write", "page": P, "offset": O, "byte": B} -> {"tid"}
    {"op": "exit"}

Every access runs in a fresh thread through ctypes (``memmove``/``memset``
release the GIL), and the reply carries that thread's native id, so the test
can compare it with the ``ptid`` of the fault.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
import socket
import sys
import threading

from migrator.uffd.fd import create_userfaultfd


def main() -> int:
    sock = socket.socket(fileno=int(sys.argv[1]))
    npages = int(sys.argv[2])
    ps = mmap.PAGESIZE
    size = npages * ps
    ram = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    ram.madvise(mmap.MADV_NOHUGEPAGE)
    anchor = ctypes.c_char.from_buffer(ram)
    addr = ctypes.addressof(anchor)
    uffd = create_userfaultfd()
    hello = json.dumps({"addr": addr, "size": size, "page_size": ps, "pid": os.getpid()}).encode() + b"\n"
    socket.send_fds(sock, [hello], [uffd])
    os.close(uffd)

    send_lock = threading.Lock()

    def reply(obj: dict[str, object]) -> None:
        with send_lock:
            sock.sendall(json.dumps(obj).encode() + b"\n")

    def do_read(page: int, count: int) -> None:
        buf = (ctypes.c_char * (count * ps))()
        ctypes.memmove(buf, addr + page * ps, count * ps)
        raw = bytes(buf)
        pages = [raw[i * ps : (i + 1) * ps] for i in range(count)]
        reply(
            {
                "tid": threading.get_native_id(),
                "sha256": [hashlib.sha256(p).hexdigest() for p in pages],
                "head": [p[:16].hex() for p in pages],
            }
        )

    def do_write(page: int, offset: int, byte: int) -> None:
        ctypes.memset(addr + page * ps + offset, byte, 1)
        reply({"tid": threading.get_native_id()})

    stream = sock.makefile("rb")
    for line in stream:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "exit":
            break
        if op == "read":
            target, args = do_read, (cmd["page"], cmd["count"])
        elif op == "write":
            target, args = do_write, (cmd["page"], cmd["offset"], cmd["byte"])
        else:
            raise SystemExit(f"unknown op {op!r}")
        threading.Thread(target=target, args=args, name=f"vcpu-{op}", daemon=True).start()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
