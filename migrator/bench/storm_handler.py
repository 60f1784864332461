"""One fault handler *process* for `migrator bench wakeups`.

    python -m migrator.bench.storm_handler MODE UFFD_FD STOP_FD BASE NPAGES BATCH

Several of these share one userfaultfd (inherited fd), each with its own GIL,
so what is measured is the kernel's wake-up policy, not GIL contention between
Python threads.  MODE ``read``: wait in a blocking read() (the fd's O_NONBLOCK is
cleared by the parent); exits after serving a sentinel page (index >= NPAGES).
MODE ``epoll``: its own epoll instance with the uffd added EPOLLEXCLUSIVE, plus
the stop eventfd; drains the queue after each wake-up.
Prints "ready" before waiting and the number of faults it served at exit.
"""

from __future__ import annotations

import mmap
import os
import select
import sys

from migrator.uffd.fd import Userfaultfd


def main() -> int:
    mode, ufd, stopfd, base, npages, batch = sys.argv[1], *map(int, sys.argv[2:7])
    ps = mmap.PAGESIZE
    page = bytes(range(256)) * (ps // 256)
    import ctypes

    src = ctypes.cast(ctypes.c_char_p(page), ctypes.c_void_p).value or 0
    uffd = Userfaultfd(ufd)
    served = 0

    def serve(address: int) -> bool:
        p = (address - base) // ps
        uffd.copy_page(base + p * ps, src, ps)
        return p >= npages

    sys.stdout.write("ready\n")
    sys.stdout.flush()
    if mode == "read":
        while True:
            done = False
            for f in uffd.read_faults(batch):
                served += 1
                done = serve(f.address) or done
            if done:
                break
    else:
        ep = select.epoll()
        ep.register(ufd, select.EPOLLIN | select.EPOLLEXCLUSIVE)
        ep.register(stopfd, select.EPOLLIN)
        while True:
            if any(fd == stopfd for fd, _ in ep.poll()):
                break
            while faults := uffd.read_faults(batch):
                for f in faults:
                    served += 1
                    serve(f.address)
    sys.stdout.write(f"{served}\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    os._exit(main())
