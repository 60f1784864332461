"""Real processes for end-to-end tests: start, wait (always bounded), clean up.

Every command starts in its own session, so it and everything it starts (its
guest_sim child inherits the process group) can be found and killed by process
group, even after the parent died and the children were re-parented.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

_BIN = Path(sys.executable).with_name("migrator")
#: How a user runs the tool: the console script of this venv (or ``python -m migrator``).
MIGRATOR: list[str] = [str(_BIN)] if _BIN.exists() else [sys.executable, "-m", "migrator"]


def wait_for(pred: Callable[[], Any], timeout: float, interval: float = 0.02, what: str = "condition") -> Any:
    """Poll ``pred`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    """A loopback TCP port nobody listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- /proc ----------------------------------------------------------------------------
def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgid) of a process, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = raw[raw.rindex(")") + 2 :].split()
    return rest[0], int(rest[1]), int(rest[2])


def alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def _all_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``."""
    out = []
    for pid in _all_pids():
        st = _stat(pid)
        if st is not None and st[2] == pgid and st[0] not in ("Z", "X"):
            out.append(pid)
    return out


def children(pid: int) -> list[int]:
    """Live direct children of ``pid``."""
    out = []
    for p in _all_pids():
        st = _stat(p)
        if st is not None and st[1] == pid and st[0] not in ("Z", "X"):
            out.append(p)
    return out


def is_guest_sim(pid: int) -> bool:
    argv = cmdline(pid)
    return "guest_sim" in argv or any(a.endswith("guest_sim/__main__.py") for a in argv)


def guest_children(pid: int) -> list[int]:
    """guest_sim processes started by ``pid``."""
    return [c for c in children(pid) if is_guest_sim(c)]


def thread_count(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def kill_pid(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


# -- commands -------------------------------------------------------------------------
@dataclass
class Cmd:
    """A running command with stdout/stderr captured to files (no pipe can fill up)."""

    proc: subprocess.Popen[bytes]
    out_path: Path
    err_path: Path
    _files: tuple[IO[bytes], IO[bytes]]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait(self, timeout: float) -> int:
        """Exit code; fails the test (after killing the group) if it takes longer."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            raise AssertionError(
                f"{self.proc.args!r} did not exit within {timeout:g}s\nstderr:\n{self.stderr()}"
            ) from None

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            kill_pid(self.proc.pid, sig)

    def kill_group(self) -> None:
        """SIGKILL the command and everything in its process group, and reap it."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in group_members(self.proc.pid):  # belt and braces: re-parented stragglers
            kill_pid(pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)

    def close(self) -> None:
        self.kill_group()
        for f in self._files:
            f.close()

    def leftovers(self, timeout: float = 5.0) -> list[int]:
        """Processes of this command's group still alive after ``timeout`` (waits for them to go)."""
        deadline = time.monotonic() + timeout
        while True:
            left = group_members(self.proc.pid)
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.05)


def start(args: list[str], tmp: Path, name: str, env: dict[str, str] | None = None) -> Cmd:
    """Start ``args`` in a new session with its output in ``tmp/name.{out,err}``."""
    out_path, err_path = tmp / f"{name}.out", tmp / f"{name}.err"
    fout, ferr = open(out_path, "wb"), open(err_path, "wb")
    try:
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=fout, stderr=ferr, start_new_session=True,
            env=dict(os.environ, **(env or {})),
        )  # fmt: skip
    except BaseException:
        fout.close()
        ferr.close()
        raise
    return Cmd(proc, out_path, err_path, (fout, ferr))


@contextlib.contextmanager
def command(args: list[str], tmp: Path, name: str, env: dict[str, str] | None = None) -> Iterator[Cmd]:
    """:func:`start`, and whatever happens, kill the command's whole process group at the end."""
    cmd = start(args, tmp, name, env)
    try:
        yield cmd
    finally:
        cmd.close()


def run(args: list[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a short command to completion (own session; its group is killed on timeout)."""
    proc = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, env=dict(os.environ, **(env or {})),
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{args!r} did not exit within {timeout:g}s\nstderr:\n{err}") from None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


# -- a source --------------------------------------------------------------------------
def source_args(ready: Path, ram: str = "64MiB", *extra: str) -> list[str]:
    return [*MIGRATOR, "source", "--listen", "127.0.0.1:0", "--ready-file", str(ready), "--ram", ram, *extra]


def wait_ready(cmd: Cmd, ready: Path, timeout: float = 60.0) -> dict[str, Any]:
    """Wait for a source's ready file ({address, guest_pid, ...}); fail if the source dies first."""

    def check() -> bool:
        if cmd.proc.poll() is not None:
            raise AssertionError(f"source exited with {cmd.proc.returncode} before it was ready:\n{cmd.stderr()}")
        return ready.exists()

    wait_for(check, timeout, what="the source's ready file")
    info: dict[str, Any] = json.loads(ready.read_text())
    return info


@contextlib.contextmanager
def running_source(tmp: Path, ram: str = "64MiB", *extra: str) -> Iterator[tuple[Cmd, dict[str, Any]]]:
    """A ``migrator source`` on a free loopback port, ready; killed (with its guest) at the end."""
    ready = tmp / "source-ready.json"
    with command(source_args(ready, ram, *extra), tmp, "source") as cmd:
        info = wait_ready(cmd, ready)
        yield cmd, info
