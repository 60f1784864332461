"""The monitor's side of a guest: spawn guest_sim, take its hello (and uffd), talk to it.

Handshake rules, the Firecracker way: the guest must connect within a deadline,
the peer on the socket must be the very process we started (SO_PEERCRED), and
every control call has a timeout.  A guest that dies is reported as GuestDied
with its exit status, never waited on forever.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from migrator.errors import GuestDied, GuestError, GuestStalled, UnsupportedHost


@dataclass(frozen=True)
class GuestSpec:
    ram: int
    page_size: int = 4096
    vcpus: int = 2
    workload: str = "random"
    write_ratio: float = 0.5
    zero_pct: int = 40
    text_pct: int = 30
    seed: int = 1
    rate: int = 0  # operations per second per vCPU (0 = flat out)
    incoming: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)


@dataclass
class Hello:
    pid: int
    addr: int
    size: int
    page_size: int
    table_pages: int
    vcpus: int
    tids: list[int]
    uffd: int | None
    ram_fd: int | None = None  # a source guest's RAM (a memfd), to map read-only
    uffd_mode: str = ""  # "full" or "user-mode only" (see uffd/fd.py:create_uffd)


class GuestProcess:
    """A running guest_sim child and its control connection."""

    def __init__(self, spec: GuestSpec, *, connect_timeout: float = 60.0) -> None:
        self.spec = spec
        self._dir = tempfile.mkdtemp(prefix="migrator-")
        self.sock_path = os.path.join(self._dir, "control.sock")
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(self.sock_path)
        lsock.listen(1)
        cmd = [
            sys.executable, "-m", "guest_sim", "--control", self.sock_path,
            "--ram", str(spec.ram), "--page-size", str(spec.page_size),
            "--vcpus", str(spec.vcpus), "--workload", spec.workload,
            "--write-ratio", str(spec.write_ratio), "--zero-pct", str(spec.zero_pct),
            "--text-pct", str(spec.text_pct), "--seed", str(spec.seed), "--rate", str(spec.rate),
        ]  # fmt: skip
        if spec.incoming:
            cmd.append("--incoming")
        env = dict(os.environ, **spec.extra_env)
        # its own session: a Ctrl-C in the terminal is for the monitor, not the VM
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        self._lock = threading.Lock()
        try:
            self.sock = self._accept(lsock, connect_timeout)
            self.hello = self._read_hello()
        except BaseException:
            self.kill()
            raise
        finally:
            lsock.close()

    # -- handshake -------------------------------------------------------------
    def _accept(self, lsock: socket.socket, timeout: float) -> socket.socket:
        deadline = time.monotonic() + timeout
        lsock.settimeout(0.2)
        while True:
            try:
                conn, _ = lsock.accept()
                break
            except socket.timeout:
                if self.proc.poll() is not None:
                    raise GuestDied("guest exited before it connected", exit=self.proc.returncode) from None
                if time.monotonic() > deadline:
                    raise GuestError("guest did not connect in time", timeout=timeout) from None
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, _uid, _gid = struct.unpack("3i", creds)
        if pid != self.proc.pid:
            conn.close()
            raise GuestError("control socket peer is not our guest", peer_pid=pid, guest_pid=self.proc.pid)
        conn.settimeout(timeout)
        return conn

    def _read_hello(self) -> Hello:
        msg, fds, _flags, _addr = socket.recv_fds(self.sock, 65536, 4)
        while not msg.endswith(b"\n") and msg:
            more = self.sock.recv(65536)
            if not more:
                break
            msg += more
        if not msg:
            rc = self.proc.wait(timeout=5)
            raise GuestDied("guest closed its control socket during the handshake", exit=rc)
        data = json.loads(msg)
        if "error" in data:
            for fd in fds:
                os.close(fd)
            self.proc.wait(timeout=5)
            raise UnsupportedHost(f"guest: {data['error']}", errno=data.get("errno"))
        uffd = ram_fd = None
        if self.spec.incoming:
            if len(fds) != 1:
                raise GuestError("incoming guest did not pass exactly one userfaultfd", fds=len(fds))
            uffd = fds[0]
        elif fds:
            if data.get("ram_fd") and len(fds) == 1:
                ram_fd = fds[0]
            else:
                for fd in fds:
                    os.close(fd)
        self._buf = bytearray()
        self._fds: list[int] = []  # descriptors that came with the reply being read
        self._next_id = 0
        return Hello(
            pid=data["pid"], addr=data["addr"], size=data["size"], page_size=data["page_size"],
            table_pages=data["table_pages"], vcpus=data["vcpus"], tids=data.get("tids", []), uffd=uffd,
            ram_fd=ram_fd, uffd_mode=data.get("uffd_mode", ""),
        )  # fmt: skip

    # -- control -----------------------------------------------------------------
    def call(self, cmd: str, timeout: float = 30.0, **kw: Any) -> dict[str, Any]:
        """Send one control command and return its reply.

        Every command carries an id that the guest echoes; a reply that comes
        after its call timed out is recognised by its id and dropped, so a slow
        guest never desynchronises the channel.  Raises GuestStalled when no
        reply came within ``timeout`` s (the guest may just be slow: the channel
        stays usable), GuestDied/GuestError when the guest is gone.
        """
        deadline = time.monotonic() + timeout
        if not self._lock.acquire(timeout=timeout):
            raise GuestStalled(f"guest control channel busy for {timeout:g} s (another call waits for the guest)", cmd=cmd)
        try:
            self._next_id += 1
            cid = self._next_id
            try:
                self.sock.settimeout(max(0.05, deadline - time.monotonic()))
                self.sock.sendall(json.dumps({"cmd": cmd, "id": cid, **kw}).encode() + b"\n")
            except socket.timeout:
                raise GuestStalled(f"guest did not take the control command {cmd!r} within {timeout:g} s", cmd=cmd) from None
            except OSError as exc:
                raise self._gone(f"guest control call {cmd!r} failed: {exc}") from exc
            while True:
                line = self._readline(cmd, deadline, timeout)
                reply: dict[str, Any] = json.loads(line)
                if reply.get("id") == cid:
                    break
                # a late reply to a call that timed out: already given up on
        finally:
            self._lock.release()
        if not reply.get("ok"):
            raise GuestError(f"guest refused {cmd!r}: {reply.get('error')}")
        return reply

    def call_fd(self, cmd: str, timeout: float = 30.0, **kw: Any) -> tuple[dict[str, Any], int]:
        """Like :meth:`call` for a command whose reply carries one descriptor (``track``):
        returns (reply, fd), the fd now the caller's.  Raises GuestError if none came."""
        with self._lock:
            for fd in self._fds:
                os.close(fd)
            self._fds = []
        reply = self.call(cmd, timeout, **kw)
        with self._lock:
            fds, self._fds = self._fds, []
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise GuestError(f"guest's reply to {cmd!r} carried {len(fds)} descriptors, not 1")
        return reply, fds[0]

    def _readline(self, cmd: str, deadline: float, timeout: float) -> bytes:
        """One reply line from the guest, waiting until ``deadline`` (monotonic)."""
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[: nl + 1])
                del self._buf[: nl + 1]
                return line
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GuestStalled(f"guest did not answer {cmd!r} within {timeout:g} s (stalled?)", cmd=cmd)
            self.sock.settimeout(remaining)
            try:
                chunk, fds, _flags, _addr = socket.recv_fds(self.sock, 65536, 4)
                self._fds.extend(fds)
            except socket.timeout:
                continue
            except OSError as exc:
                raise self._gone(f"guest control call {cmd!r} failed: {exc}") from exc
            if not chunk:
                raise self._gone(f"guest closed its control connection during {cmd!r}")
            self._buf += chunk

    def _gone(self, why: str) -> GuestError:
        try:
            rc = self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            return GuestError(why)
        return GuestDied(why, exit=rc)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def quit(self, timeout: float = 5.0) -> int | None:
        if self.alive():
            try:
                self.call("quit", timeout=timeout)
            except GuestError:
                pass
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None
        finally:
            self.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.close()

    def close(self) -> None:
        hello = getattr(self, "hello", None)
        if hello is not None and hello.ram_fd is not None:
            try:
                os.close(hello.ram_fd)
            except OSError:
                pass
            hello.ram_fd = None
        sock = getattr(self, "sock", None)
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
        try:
            os.unlink(self.sock_path)
            os.rmdir(self._dir)
        except OSError:
            pass
