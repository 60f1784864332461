"""guest_sim process: RAM, vCPUs, and the control connection to its monitor.

The guest connects to the monitor's Unix socket (``--control``) and says hello
with its RAM's address and size.  In incoming mode the RAM is empty and the
guest also creates a userfaultfd for it and passes the fd along with the hello
(SCM_RIGHTS); then it closes its own copy, so the uffd lives only in the
monitor.  Only the process whose memory a uffd watches can create it; every
other uffd operation is the monitor's.

Control messages are JSON lines: pause, resume, stats, verify, set, track,
drop, quit, and the commands that change the guest's own memory (discard,
map-over, remap; read-page, syscall-read, fork-read read it in three ways);
each carries an ``id`` that its reply echoes.  ``track`` creates a second
userfaultfd (for the monitor's dirty tracker, ``migrator/uffd/dirty.py``) and
passes it with the reply; ``drop`` (and ``resume`` with ``drop``) takes runs of
pages [first, count] away (MADV_DONTNEED) before any vCPU runs: an incoming
guest's pre-copied pages that changed on the source since (they fault and
arrive again, like QEMU's discard list; unlike ``discard``, the guest still
expects their contents).  When
the monitor goes away (EOF, or its death via PR_SET_PDEATHSIG) the guest exits:
a guest without its monitor could only fault forever or read zeros.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import signal
import socket
import sys
import time
from typing import Any, cast

from guest_sim import pages
from guest_sim.ram import GuestRam
from guest_sim.vcpu import TRACE_EVERY, PauseControl, Vcpu, VcpuConfig, VcpuState, load_blob, state_blob

EXIT_NO_UFFD = 3
EXIT_MONITOR_GONE = 70


class Guest:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.ram = GuestRam(args.ram, args.page_size, shared=not args.incoming)
        self.cfg = VcpuConfig(
            workload=args.workload,
            write_permille=int(round(args.write_ratio * 1000)),
            zero_pct=args.zero_pct,
            text_pct=args.text_pct,
            nvcpus=args.vcpus,
            rate=args.rate,
        )
        rng = random.Random(args.seed)
        self.states = [VcpuState(rng=rng.getrandbits(63) | 1) for _ in range(args.vcpus)]
        self.ctl = PauseControl(args.vcpus)
        self.vcpus: list[Vcpu] = []

    def start_vcpus(self) -> None:
        self.ctl.resume()
        self.vcpus = [Vcpu(i, self.ram, self.cfg, s, self.ctl) for i, s in enumerate(self.states)]
        for v in self.vcpus:
            v.start()
        for v in self.vcpus:
            v.started_evt.wait(5)

    # -- commands ------------------------------------------------------------
    def cmd_pause(self, msg: dict[str, Any]) -> dict[str, Any]:
        t = time.time_ns()
        alive = sum(v.is_alive() for v in self.vcpus)
        if not self.ctl.pause(float(msg.get("timeout", 10)), alive):
            return {"ok": False, "error": "vCPUs did not park within the timeout"}
        return {"ok": True, "paused_ns": t, "state": state_blob(self.cfg, self.states)}

    def cmd_resume(self, msg: dict[str, Any]) -> dict[str, Any]:
        dropped = 0
        if msg.get("drop"):
            if self.vcpus and not self.ctl.pause_req:
                return {"ok": False, "error": "drop needs paused vCPUs"}
            dropped = self.ram.drop([(int(a), int(n)) for a, n in msg["drop"]])
        t_mono = time.monotonic_ns()  # before any vCPU runs: "first access" is measured from here
        if "state" in msg and msg["state"] is not None:
            if self.vcpus:
                return {"ok": False, "error": "cannot load vCPU state into running vCPUs"}
            self.cfg, self.states = load_blob(msg["state"])
        if "write_ratio" in msg and msg["write_ratio"] is not None:
            self.cfg.write_permille = int(round(float(msg["write_ratio"]) * 1000))
        if self.vcpus:
            self.ctl.resume()
        else:
            self.start_vcpus()
        return {"ok": True, "resumed_ns": time.time_ns(), "mono_ns": t_mono, "tids": [v.tid for v in self.vcpus],
                "dropped": dropped}

    def cmd_drop(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Drop runs of pages [first, count] (an incoming guest's pre-copied pages that went
        stale) before the vCPUs run."""
        if self.vcpus and not self.ctl.pause_req:
            return {"ok": False, "error": "drop needs paused vCPUs"}
        t = time.perf_counter()
        n = self.ram.drop([(int(a), int(c)) for a, c in msg.get("runs", [])])
        return {"ok": True, "dropped": n, "ms": (time.perf_counter() - t) * 1e3}

    def cmd_track(self, _msg: dict[str, Any]) -> dict[str, Any]:
        """A userfaultfd for this RAM, for the monitor's dirty tracker (sent with the reply)."""
        from migrator.uffd.fd import create_userfaultfd

        try:
            fd = create_userfaultfd()
        except OSError as exc:
            return {"ok": False, "error": f"cannot create a userfaultfd: {exc.strerror or exc}"}
        return {"ok": True, "_fds": [fd]}

    def cmd_stats(self, _msg: dict[str, Any]) -> dict[str, Any]:
        per = []
        tids = [v.tid for v in self.vcpus] or [0] * len(self.states)
        for tid, s in zip(tids, self.states):
            per.append(
                {
                    "tid": tid,
                    "ops": s.ops,
                    "reads": s.reads,
                    "writes": s.writes,
                    "stalls": s.stalls,
                    "stall_ns": s.stall_ns,
                    "stall_max_ns": s.stall_max_ns,
                    "hist": s.hist,
                    "errors": s.errors,
                    "first_errors": s.first_errors,
                    "first_op_ns": s.first_op_ns,
                    **({"trace": s.trace[:], "trace_every": TRACE_EVERY} if _msg.get("trace") else {}),
                }
            )
        return {"ok": True, "mono_ns": time.monotonic_ns(), "vcpus": per, "paused": self.ctl.pause_req}

    def cmd_verify(self, _msg: dict[str, Any]) -> dict[str, Any]:
        if self.vcpus and not self.ctl.pause_req:
            return {"ok": False, "error": "pause the guest before a full verify"}
        checked, errors = self.ram.verify_all()
        return {"ok": True, "checked": checked, "errors": errors}

    def cmd_set(self, msg: dict[str, Any]) -> dict[str, Any]:
        if "write_ratio" in msg:
            self.cfg.write_permille = int(round(float(msg["write_ratio"]) * 1000))
        return {"ok": True}

    # -- the guest changes its own memory (issue 11: what a balloon, a fork, a remap do) -----
    def _paused(self, fn: Any) -> dict[str, Any]:
        """Run ``fn`` with the vCPUs parked (they must not touch a range while it moves)."""
        running = bool(self.vcpus) and not self.ctl.pause_req
        if running and not self.ctl.pause(10.0, sum(v.is_alive() for v in self.vcpus)):
            return {"ok": False, "error": "vCPUs did not park within the timeout"}
        try:
            return {"ok": True, **(fn() or {})}
        except (OSError, ValueError) as exc:
            return {"ok": False, "error": str(exc)}
        finally:
            if running:
                self.ctl.resume()

    def cmd_discard(self, msg: dict[str, Any]) -> dict[str, Any]:
        return self._paused(lambda: self.ram.discard(int(msg["first"]), int(msg["count"])))

    def cmd_map_over(self, msg: dict[str, Any]) -> dict[str, Any]:
        return self._paused(lambda: self.ram.map_over(int(msg["first"]), int(msg["count"])))

    def cmd_remap(self, msg: dict[str, Any]) -> dict[str, Any]:
        return self._paused(lambda: {"address": self.ram.remap(int(msg["first"]), int(msg["count"]))})

    def cmd_read_page(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Read one page the way a vCPU does (it may fault) and check it against the table."""
        idx = int(msg["page"])
        page, version = self._read(idx)
        return {"ok": True, "check": pages.check_page(page, idx, version), "zero": page == bytes(len(page))}

    def cmd_syscall_read(self, msg: dict[str, Any]) -> dict[str, Any]:
        """write(2) one page of RAM to a pipe: the kernel reads guest RAM on the guest's
        behalf (a fault in kernel mode).  Then check what came out of the pipe."""
        idx = int(msg["page"])
        ps = self.ram.page_size
        r, w = os.pipe()
        try:
            os.set_blocking(w, True)
            try:
                written = os.write(w, (ctypes.c_char * ps).from_address(self.ram.page_addr[idx]))
            except OSError as exc:
                return {"ok": True, "errno": exc.errno, "error": exc.strerror}
            data = os.read(r, ps)
        finally:
            os.close(r)
            os.close(w)
        version = self._version(idx)
        return {"ok": True, "written": written, "check": pages.check_page(data, idx, version)}

    def cmd_fork_read(self, msg: dict[str, Any]) -> dict[str, Any]:
        """fork() a child that reads one page of RAM; say how the child fared."""
        addr, ps = self.ram.page_addr[int(msg["page"])], self.ram.page_size
        pid = os.fork()
        if pid == 0:  # the child: read the page, exit 0 if it could
            buf = (ctypes.c_char * ps)()
            ctypes.memmove(buf, addr, ps)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            return {"ok": True, "child": signal.Signals(os.WTERMSIG(status)).name}
        return {"ok": True, "child": f"exit {os.WEXITSTATUS(status)}"}

    def _version(self, idx: int) -> int:
        ver = ctypes.c_uint32()
        ctypes.memmove(ctypes.byref(ver), self.ram.table_addr + 4 * idx, 4)
        return ver.value

    def _read(self, idx: int) -> tuple[bytes, int]:
        ps = self.ram.page_size
        buf = (ctypes.c_char * ps)()
        version = self._version(idx)
        ctypes.memmove(buf, self.ram.page_addr[idx], ps)
        return bytes(buf), version


def _hello(guest: Guest, incoming: bool) -> dict[str, Any]:
    r = guest.ram
    return {
        "type": "hello",
        "pid": os.getpid(),
        "addr": r.addr,
        "size": r.size,
        "page_size": r.page_size,
        "table_pages": r.first_data,
        "vcpus": guest.cfg.nvcpus,
        "incoming": incoming,
    }


def _serve(guest: Guest, sock: socket.socket) -> int:
    handlers = {
        "pause": guest.cmd_pause,
        "resume": guest.cmd_resume,
        "stats": guest.cmd_stats,
        "verify": guest.cmd_verify,
        "set": guest.cmd_set,
        "discard": guest.cmd_discard,
        "map-over": guest.cmd_map_over,
        "remap": guest.cmd_remap,
        "read-page": guest.cmd_read_page,
        "syscall-read": guest.cmd_syscall_read,
        "fork-read": guest.cmd_fork_read,
        "track": guest.cmd_track,
        "drop": guest.cmd_drop,
    }
    f = sock.makefile("rb")
    for line in f:
        cid = None
        try:
            msg = json.loads(line)
            cmd, cid = msg.get("cmd"), msg.get("id")
            if cmd == "quit":
                sock.sendall(json.dumps({"ok": True, "id": cid}).encode() + b"\n")
                return 0
            handler = handlers.get(cmd)
            reply = handler(msg) if handler else {"ok": False, "error": f"unknown command {cmd!r}"}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            reply = {"ok": False, "error": f"bad control message: {exc}"}
        reply["id"] = cid  # the monitor matches replies to calls by it
        fds = cast("list[int]", reply.pop("_fds", None) or [])
        if fds:
            socket.send_fds(sock, [json.dumps(reply).encode() + b"\n"], fds)
            for fd in fds:
                os.close(fd)  # only the monitor holds it now
        else:
            sock.sendall(json.dumps(reply).encode() + b"\n")
    return EXIT_MONITOR_GONE


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="guest_sim", description=__doc__.splitlines()[0])
    p.add_argument("--control", required=True, help="the monitor's Unix socket")
    p.add_argument("--ram", type=int, required=True, help="RAM size in bytes")
    p.add_argument("--page-size", type=int, default=os.sysconf("SC_PAGESIZE"))
    p.add_argument("--vcpus", type=int, default=2)
    p.add_argument("--workload", default="random", choices=["random", "sequential", "hotset", "hotscatter"])
    p.add_argument("--write-ratio", type=float, default=0.5)
    p.add_argument("--zero-pct", type=int, default=40)
    p.add_argument("--text-pct", type=int, default=30)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--rate", type=int, default=0, help="operations per second per vCPU (0 = flat out)")
    p.add_argument("--incoming", action="store_true", help="empty RAM, handed to the monitor's uffd")
    p.add_argument("--switch-interval", type=float, default=0.0005)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Die with the monitor: a guest left alone would fault forever.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:
        return EXIT_MONITOR_GONE
    sys.setswitchinterval(args.switch_interval)
    # Like a VM process: the terminal's Ctrl-C is for the monitor, which stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    guest = Guest(args)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(args.control)
    hello = _hello(guest, args.incoming)
    if args.incoming:
        from migrator.uffd.fd import create_uffd

        try:
            ufd, hello["uffd_mode"] = create_uffd()
        except OSError as exc:
            hello["error"] = f"cannot create a userfaultfd: {exc.strerror or exc}"
            hello["errno"] = exc.errno
            sock.sendall(json.dumps(hello).encode() + b"\n")
            return EXIT_NO_UFFD
        socket.send_fds(sock, [json.dumps(hello).encode() + b"\n"], [ufd])
        os.close(ufd)
    else:
        hello["filled"] = guest.ram.fill(args.zero_pct, args.text_pct, args.seed)
        guest.start_vcpus()
        hello["tids"] = [v.tid for v in guest.vcpus]
        hello["ram_fd"] = True  # the monitor may map it (read-only) instead of reading /proc/PID/mem
        socket.send_fds(sock, [json.dumps(hello).encode() + b"\n"], [guest.ram.memfd])
    rc = _serve(guest, sock)
    guest.ctl.stop()
    return rc

