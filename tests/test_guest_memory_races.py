"""A fault handled while a guest memory event is queued (issue 11, found in review).

The fault threads read the uffd under the gate, then handle the faults they read
*after* letting the gate go.  If, in between, another guest thread starts a
madvise(DONTNEED) (or munmap/mremap), the kernel queues the event and raises
``mmap_changing``: every UFFDIO_COPY/ZEROPAGE fails with EAGAIN until someone
*reads* the event.  With one fault thread (the default) that someone is the very
thread now trying to install:

* ``Installer.install_discarded`` (a fault on a DISCARDED page, or a PRESENT one)
  does not catch RetryLater at all: the fault thread dies with it and the
  migration is failed ("fatal").
* ``Installer.install_zero`` (a fault on a known-zero page) goes through
  ``_gated``, which waits for *another* thread to read the events
  (``wait_for_events``): nobody does, so it waits MAX_WAITS * 0.2 s = 10 s with the
  vCPU and the madvising thread both stuck, then raises: fatal too.

Real kernel, real uffd, a real multi-threaded guest process; the only stand-in is
a sleep in the fault handler between the read and the handling (the thread
being preempted there: 2 cores, a guest that runs).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from migrator.dest.fault import FaultHandler, FaultThreads
from migrator.dest.gate import Gate
from migrator.dest.install import Installer
from migrator.dest.pagestate import DISCARDED, PRESENT, ZERO_READY, PageState
from migrator.probe import probe
from migrator.uffd.fd import MIGRATION_FEATURES, Fault, Userfaultfd

NPAGES = 64
ROOT = Path(__file__).parent.parent

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module", autouse=True)
def _userfaultfd() -> None:
    result = probe()
    if not result.ok:
        pytest.skip(result.message)


class Child:
    def __init__(self) -> None:
        a, b = socket.socketpair()
        self.sock = a
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.helpers.review_child", str(b.fileno()), str(NPAGES)],
                                     pass_fds=[b.fileno()], cwd=ROOT)  # fmt: skip
        b.close()
        a.settimeout(10)
        msg, fds, _f, _a = socket.recv_fds(a, 4096, 1)
        hello = json.loads(msg)
        a.settimeout(None)
        self.addr, self.ps = int(hello["addr"]), int(hello["page_size"])
        self.uffd = Userfaultfd(fds[0])
        self.uffd.api(MIGRATION_FEATURES)
        self.uffd.register(self.addr, NPAGES * self.ps)
        self._ids = 0
        self._replies: dict[int, dict[str, Any]] = {}
        self._cv = threading.Condition()
        threading.Thread(target=self._rx, daemon=True).start()

    def _rx(self) -> None:
        try:
            with self.sock.makefile("rb") as f:
                for line in f:
                    r = json.loads(line)
                    with self._cv:
                        self._replies[r["id"]] = r
                        self._cv.notify_all()
        except (OSError, ValueError):
            pass  # closed

    def send(self, op: str, **kw: Any) -> int:
        self._ids += 1
        self.sock.sendall(json.dumps({"op": op, "id": self._ids, **kw}).encode() + b"\n")
        return self._ids

    def wait(self, i: int, timeout: float) -> dict[str, Any] | None:
        with self._cv:
            self._cv.wait_for(lambda: i in self._replies, timeout)
            return self._replies.get(i)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.sock.close()
        self.uffd.close()


class Racy(FaultHandler):
    """The real handler, preempted between the read and the handling of its first
    fault while another guest thread starts a madvise(DONTNEED) elsewhere."""

    child: Child

    def __call__(self, f: Fault) -> None:
        if not getattr(self, "_done", False):
            self._done = True
            self.child.send("madvise", page=40, count=1)
            time.sleep(0.3)  # the madvise is now blocked in the kernel: its REMOVE event is queued, unread
        super().__call__(f)


def setup(kind: str) -> tuple[Child, PageState, FaultThreads, list[BaseException]]:
    child = Child()
    ps = PageState.create(NPAGES)
    gate = Gate(ps.fd, ps.words)
    installer = Installer(child.uffd, ps, child.addr, child.ps, ps.counters(0), gate, 0)
    handler = Racy(child.uffd, ps, installer, child.addr, child.ps, lambda first, n: None, 1, [0], ps.counters(0))
    handler.child = child
    if kind == "discarded":
        ps.state[3] = DISCARDED  # the guest gave page 3 up earlier
    elif kind == "present-zapped":
        ps.state[3] = PRESENT  # installed earlier, then zapped (the README's row 2)
    else:  # known zero on the source
        ps.zero[3] = 1
        ps.words[ZERO_READY] = 1
    errors: list[BaseException] = []

    def on_error(exc: BaseException) -> None:
        exc.at = time.monotonic()  # type: ignore[attr-defined]
        errors.append(exc)

    ft = FaultThreads(child.uffd, handler, 1, on_error, gate, 0)
    ft.start()
    return child, ps, ft, errors


@pytest.mark.parametrize("kind", ["discarded", "present-zapped", "known-zero"])
def test_a_fault_handled_while_a_discard_is_queued_is_served(kind: str) -> None:
    child, ps, ft, errors = setup(kind)
    try:
        t0 = time.monotonic()
        rd = child.send("read", page=3)
        got = child.wait(rd, 15)
        elapsed = time.monotonic() - t0
        md = child.wait(2, 15)
        assert not errors, (f"the fault thread died {errors[0].at - t0:.1f} s after the fault: {errors[0]!r}; "  # type: ignore[attr-defined]
                            f"vCPU served: {got is not None}, madvise returned: {md is not None}")
        assert got is not None and got["zero"], f"the vCPU was not served within 15 s: {got}"
        assert md is not None and md["rc"] == 0, md
        assert elapsed < 2, f"the vCPU waited {elapsed:.1f} s"
    finally:
        ft.stop()
        child.close()
        ps.close()


def test_a_grown_mremap_tail_is_served() -> None:
    """mremap that grows a piece of guest RAM (new_len > old_len): the tail is part of
    the moved, still-registered VMA, so the guest's first touch of it is a MISSING
    fault at an address that is no page of ours.  FaultHandler answers UFFDIO_WAKE
    ("spurious"): the thread faults again at once, forever: a livelock."""
    child = Child()
    ps = PageState.create(NPAGES)
    gate = Gate(ps.fd, ps.words)
    c = ps.counters(0)
    installer = Installer(child.uffd, ps, child.addr, child.ps, c, gate, 0)
    handler = FaultHandler(child.uffd, ps, installer, child.addr, child.ps, lambda first, n: None, 1, [0], c)
    errors: list[BaseException] = []
    ft = FaultThreads(child.uffd, handler, 1, errors.append, gate, 0)
    ft.start()
    try:
        mv = child.wait(child.send("mremap", page=60, count=4, grow=4), 10)
        assert mv is not None and mv["new"] not in (None, 2**64 - 1), mv
        new = int(mv["new"])
        t0 = time.monotonic()
        got = child.wait(child.send("read-addr", address=new + 6 * child.ps), 3)
        spurious = c.get("faults_spurious")
        assert not errors, errors
        assert got is not None and got["zero"], (
            f"the guest thread touching the grown tail was not served in {time.monotonic() - t0:.1f} s; "
            f"{spurious} spurious faults meanwhile")
    finally:
        ft.stop()
        child.close()
        ps.close()


def test_a_discard_under_a_vcpu_blocked_on_a_requested_page_serves_zeros() -> None:
    """A vCPU waits on page 7 (REQUESTED; the reply never comes); another guest thread
    discards it: the vCPU must be woken and read zeros, the discard must return,
    and the reply, if it ever came, must not be installed."""
    child = Child()
    ps = PageState.create(NPAGES)
    gate = Gate(ps.fd, ps.words)
    c = ps.counters(0)
    installer = Installer(child.uffd, ps, child.addr, child.ps, c, gate, 0)
    asked: list[tuple[int, int]] = []
    handler = FaultHandler(child.uffd, ps, installer, child.addr, child.ps, lambda first, n: asked.append((first, n)), 1,
                           [0], c)  # fmt: skip
    errors: list[BaseException] = []
    ft = FaultThreads(child.uffd, handler, 1, errors.append, gate, 0)
    ft.start()
    try:
        rd = child.send("read", page=7)
        time.sleep(0.3)
        assert asked == [(7, 1)] and ps.state[7] == 1, (asked, ps.state[7])  # REQUESTED, the vCPU blocked
        md = child.wait(child.send("madvise", page=7, count=1), 5)
        got = child.wait(rd, 5)
        assert not errors, errors
        assert md is not None and md["rc"] == 0, md
        assert got is not None and got["zero"], got
    finally:
        ft.stop()
        child.close()
        ps.close()
