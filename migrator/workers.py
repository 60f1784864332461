"""Worker processes: one process per flow, each started and commanded by a session.

Why processes: every flow of a migration (the fault path, each bulk lane, the
urgent server, each bulk server) is Python, and flows sharing a process take
turns on one GIL; a demand page then waits for a bulk batch's protobuf copy
rather than for the network.  Separate processes let the kernel schedule
them, with priorities (the urgent path first), on the machine's cores.

The protocol between a session and a worker (a Unix socketpair, JSON lines):

* the worker is ``python -m <module>`` with its descriptors passed
  (``pass_fds``); its first control message is its configuration, never its
  command line (which ``ps`` shows: the configuration holds the secret);
* the session sends commands ``{"cmd": name, "id": n, ...}``; the worker
  answers each one ``{"re": n, "ok": true|false, ...}``;
* the worker sends events ``{"event": name, ...}`` whenever it likes;
* a worker exits when its control socket closes, and dies with its session
  (PR_SET_PDEATHSIG), so no worker outlives the migration.

Names: each worker names its process and threads (``/proc/PID/task/*/comm``)
so ``top -H`` and the tests can tell them apart.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import queue
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from migrator.errors import MigratorError

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_NAME, PR_SET_PDEATHSIG = 15, 1
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt(3)


def set_thread_name(name: str) -> None:
    """Name the calling OS thread (15 bytes at most): /proc/PID/task/TID/comm."""
    _libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


class WorkerError(MigratorError):
    """A worker process failed or did not answer."""


class Worker:
    """The session's handle on one worker process."""

    def __init__(
        self,
        module: str,
        name: str,
        config: dict[str, Any],
        fds: list[int] = (),  # type: ignore[assignment]
        events: queue.SimpleQueue[tuple[str, dict[str, Any]]] | None = None,
        nice: int = 0,
    ) -> None:
        self.name = name
        self.events = events if events is not None else queue.SimpleQueue()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ, MIGRATOR_WORKER_FD=str(theirs.fileno()), MIGRATOR_WORKER_NAME=name)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module],
            pass_fds=[theirs.fileno(), *fds],
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=False,
            preexec_fn=(lambda: os.nice(nice)) if nice > 0 else None,
        )
        theirs.close()
        if nice < 0:
            try:
                os.setpriority(os.PRIO_PROCESS, self.proc.pid, nice)
            except OSError:
                pass  # no CAP_SYS_NICE: the default priority
        self.sock = ours
        self._lock = threading.Lock()
        self._replies: dict[int, dict[str, Any]] = {}
        self._cond = threading.Condition()
        self._next = 0
        self._closed = False
        self._send({"config": config})
        self._reader = threading.Thread(target=self._read, name=f"ctl-{name}", daemon=True)
        self._reader.start()

    def _send(self, msg: dict[str, Any]) -> None:
        data = json.dumps(msg).encode() + b"\n"
        with self._lock:
            try:
                self.sock.sendall(data)
            except OSError as exc:
                raise WorkerError(f"worker {self.name} is gone ({exc})") from None

    def _read(self) -> None:
        buf = b""
        try:
            while True:
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    msg = json.loads(line)
                    if "re" in msg:
                        with self._cond:
                            self._replies[msg["re"]] = msg
                            self._cond.notify_all()
                    else:
                        self.events.put((self.name, msg))
        except (OSError, ValueError):
            pass
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self.events.put((self.name, {"event": "exited"}))

    def send(self, cmd: str, **kw: Any) -> int:
        """Send a command without waiting for its answer; returns its id."""
        with self._cond:
            self._next += 1
            cid = self._next
        self._send({"cmd": cmd, "id": cid, **kw})
        return cid

    def wait(self, cid: int, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while cid not in self._replies:
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    what = "exited" if self._closed else f"did not answer within {timeout:g} s"
                    raise WorkerError(f"worker {self.name} {what}", exit=self.proc.poll())
                self._cond.wait(left)
            reply = self._replies.pop(cid)
        if not reply.get("ok", False):
            raise WorkerError(f"worker {self.name}: {reply.get('error', 'failed')}")
        return reply

    def call(self, cmd: str, timeout: float = 10.0, **kw: Any) -> dict[str, Any]:
        return self.wait(self.send(cmd, **kw), timeout)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 5.0) -> dict[str, Any] | None:
        """Ask the worker to finish (its final report), then make sure it is gone."""
        reply = None
        if self.alive():
            try:
                reply = self.call("stop", timeout=timeout)
            except WorkerError:
                pass
        self.close(timeout)
        return reply

    def close(self, timeout: float = 5.0) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=2)
        self.sock.close()


class WorkerSide:
    """The worker's end of the control socket: its configuration, commands, events.

    ``serve(handlers)`` runs in the worker's main thread: each command is
    answered by its handler's return value (a dict merged into the reply), or
    by the exception's text.  It returns when the session says "stop" (after
    answering it with ``on_stop()``'s report) or goes away.
    """

    def __init__(self) -> None:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # The data path allocates many short-lived objects and makes no cycles worth
        # chasing: without this the collector scanned every module's objects again and
        # again (17 % of a source lane's CPU, measured with py-spy).
        gc.freeze()
        gc.set_threshold(100_000, 50, 100)
        self.name = os.environ.get("MIGRATOR_WORKER_NAME", "worker")
        set_thread_name(self.name)
        fd = int(os.environ["MIGRATOR_WORKER_FD"])
        self.sock = socket.socket(fileno=fd)
        self._file = self.sock.makefile("rb")
        self._lock = threading.Lock()
        first = self._file.readline()
        if not first:
            raise SystemExit(0)
        self.config: dict[str, Any] = json.loads(first)["config"]
        # Every batch is a buffer of up to a few MiB, allocated and freed again and
        # again: left to glibc's defaults each one is mmap'ed, faulted in, zeroed and
        # unmapped (a tenth of a lane's CPU, measured with perf).  Keep them on the heap,
        # and keep this much free heap before giving memory back: a receiving lane
        # churns through hundreds of MiB (512 measured best); a server facing unknown
        # peers keeps less (what a flood made it allocate must not stay).
        _libc.mallopt(M_MMAP_THRESHOLD, 16 << 20)
        _libc.mallopt(M_TRIM_THRESHOLD, int(self.config.get("heap_keep_mib", 64)) << 20)
        if os.getppid() == 1:
            raise SystemExit(0)  # the session died before we got here

    def event(self, name: str, **kw: Any) -> None:
        self._write({"event": name, **kw})

    def _write(self, msg: dict[str, Any]) -> None:
        data = json.dumps(msg).encode() + b"\n"
        with self._lock:
            try:
                self.sock.sendall(data)
            except OSError:
                pass  # the session is gone; PDEATHSIG follows

    def serve(self, handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any] | None]],
              on_stop: Callable[[], dict[str, Any]]) -> None:  # fmt: skip
        for line in self._file:
            msg = json.loads(line)
            cmd, cid = msg.get("cmd"), msg.get("id")
            if cmd == "stop":
                report = on_stop()
                ru = resource.getrusage(resource.RUSAGE_SELF)
                self._write({"re": cid, "ok": True, "cpu_s": ru.ru_utime + ru.ru_stime, **report})
                return
            try:
                handler = handlers[cmd]
                out = handler(msg) or {}
                self._write({"re": cid, "ok": True, **out})
            except Exception as exc:  # noqa: BLE001 - every failure goes back to the session
                self._write({"re": cid, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
