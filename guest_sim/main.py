"""guest_sim process: RAM, vCPUs, and the control connection to its monitor.

The guest connects to the monitor's Unix socket (``--control``) and says hello
with its RAM's address and size.  In incoming mode the RAM is empty and the
guest also creates a userfaultfd for it and passes the fd along with the hello
(SCM_RIGHTS); then it closes its own copy, so the uffd lives only in the
monitor.  Only the process whose memory a uffd watches can create it; every
other uffd operation is the monitor's.

Control messages are JSON lines: pause, resume, stats, verify, set, quit; each
carries an ``id`` that its reply echoes.  When
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
from typing import Any

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
        return {"ok": True, "resumed_ns": time.time_ns(), "mono_ns": t_mono, "tids": [v.tid for v in self.vcpus]}

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
        sock.sendall(json.dumps(reply).encode() + b"\n")
    return EXIT_MONITOR_GONE


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="guest_sim", description=__doc__.splitlines()[0])
    p.add_argument("--control", required=True, help="the monitor's Unix socket")
    p.add_argument("--ram", type=int, required=True, help="RAM size in bytes")
    p.add_argument("--page-size", type=int, default=os.sysconf("SC_PAGESIZE"))
    p.add_argument("--vcpus", type=int, default=2)
    p.add_argument("--workload", default="random", choices=["random", "sequential", "hotset"])
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
        from migrator.uffd.fd import create_userfaultfd

        try:
            ufd = create_userfaultfd()
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

