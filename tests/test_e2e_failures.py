"""End to end: expected failures end fast, with one line and a distinct exit code.

Exit codes (migrator/cli.py): 2 usage, 3 cannot run here, 4 source unreachable
or gone, 5 guest failure.  Every case is bounded by a deadline; a hang or a
Python traceback is a failure.  Each test also checks that no guest_sim
process outlives the command that started it.
"""

from __future__ import annotations

import contextlib
import platform
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import procs
from migrator.probe import probe

pytestmark = pytest.mark.timeout(90)

DENY_UFFD = Path(__file__).with_name("helpers") / "deny_uffd.py"


def needs_userfaultfd() -> None:
    result = probe()
    if not result.ok:
        pytest.skip(result.message)


def assert_one_line_error(stderr: str, *mentions: str) -> str:
    """The last stderr line is ``migrator: error: ...`` naming ``mentions``; no traceback anywhere."""
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines, "no error message on stderr"
    errors = [ln for ln in lines if ln.startswith("migrator: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], f"want exactly one final 'migrator: error:' line:\n{stderr}"
    for word in mentions:
        assert word.lower() in errors[0].lower(), f"{word!r} not in {errors[0]!r}"
    return errors[0]


def wait_dest_migrating(dest: procs.Cmd, timeout: float = 30.0) -> int:
    """Wait until the destination has resumed its guest (post-copy in progress); return the guest's pid.

    An incoming guest_sim has only its main thread until the destination resumes
    it with the source's vCPU state; then its vCPU threads appear.
    """

    def resumed() -> int:
        if dest.proc.poll() is not None:
            raise AssertionError(f"destination exited with {dest.proc.returncode} before resuming:\n{dest.stderr()}")
        for pid in procs.guest_children(dest.pid):
            if procs.thread_count(pid) >= 3:  # main + 2 vCPUs
                return pid
        return 0

    return int(procs.wait_for(resumed, timeout, interval=0.005, what="the destination guest to resume"))


# -- transport -------------------------------------------------------------------------
def test_source_unreachable(tmp_path: Path) -> None:
    needs_userfaultfd()
    port = procs.free_port()
    t0 = time.monotonic()
    with procs.command([*procs.MIGRATOR, "dest", "--source", f"127.0.0.1:{port}", "--quiet"], tmp_path, "dest") as dest:
        rc = dest.wait(timeout=15)
        assert rc == 4, dest.stderr()
        assert time.monotonic() - t0 < 15
        assert_one_line_error(dest.stderr(), "source", f"127.0.0.1:{port}")
        assert dest.stdout() == ""
        assert dest.leftovers() == []


def test_source_killed_mid_migration(tmp_path: Path) -> None:
    needs_userfaultfd()
    with procs.running_source(tmp_path, "256MiB") as (src, info):
        # the destination waits for a lost source (recovery), up to a deadline: short here
        args = [*procs.MIGRATOR, "dest", "--source", str(info["address"]), "--run-for", "5", "--quiet",
                "--reconnect-deadline", "3"]  # fmt: skip
        with procs.command(args, tmp_path, "dest") as dest:
            dest_guest = wait_dest_migrating(dest)
            src.kill_group()  # SIGKILL the source and its guest
            t_kill = time.monotonic()
            src_guest = int(info["guest_pid"])
            procs.wait_for(lambda: not procs.alive(src_guest), 5, what="the source guest to die")
            rc = dest.wait(timeout=10)
            assert time.monotonic() - t_kill < 10
            assert rc == 4, f"exit {rc}, want 4 (source gone):\n{dest.stderr()}"
            assert "source unreachable" in dest.stderr() and "reconnecting for up to 3 s" in dest.stderr()
            assert_one_line_error(dest.stderr(), "source unreachable for 3 s, giving up")
            procs.wait_for(lambda: not procs.alive(dest_guest), 5, what="the destination's guest to go")
            assert dest.leftovers() == []


class _Peer:
    """A TCP listener on loopback that is not a migrator source: silent, or answering garbage."""

    def __init__(self, reply: bytes | None) -> None:
        self.reply = reply
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._run, name="fake-peer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            if self.reply is not None:
                with contextlib.suppress(OSError):
                    conn.sendall(self.reply)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(timeout=5)
        for c in self.conns:
            c.close()


@pytest.mark.parametrize(
    "reply", [None, b"HTTP/1.1 400 Bad Request\r\n\r\n\x00\xffgarbage" * 8], ids=["silent", "garbage"]
)
def test_peer_is_not_a_source(tmp_path: Path, reply: bytes | None) -> None:
    """A peer that accepts the connection but never speaks gRPC: no hang, exit 4."""
    needs_userfaultfd()
    peer = _Peer(reply)
    try:
        res = procs.run([*procs.MIGRATOR, "dest", "--source", f"127.0.0.1:{peer.port}", "--quiet"], timeout=20)
    finally:
        peer.close()
    assert res.returncode == 4, res
    assert_one_line_error(res.stderr, "source", f"127.0.0.1:{peer.port}")


def test_second_destination_is_refused(tmp_path: Path) -> None:
    """A source serves one destination; a second one gets a clear refusal (exit 6), not a crash."""
    needs_userfaultfd()
    with procs.running_source(tmp_path, "32MiB", "--keep-guest") as (src, info):
        dest = [*procs.MIGRATOR, "dest", "--source", str(info["address"]), "--run-for", "0", "--no-verify", "--quiet"]
        first = procs.run(dest, timeout=60)
        assert first.returncode == 0, first.stderr
        second = procs.run(dest, timeout=30)
        assert second.returncode == 6, second
        assert_one_line_error(second.stderr, "handshake")
        assert src.proc.poll() is None  # the source is not disturbed by the refused peer


def test_destination_killed_mid_migration(tmp_path: Path) -> None:
    """kill -9 of the destination: its guest dies with it (PDEATHSIG); the source keeps
    its paused guest (memory may only be dropped after Complete) until it is stopped
    (a first Ctrl-C is refused: a destination may still be running the guest)."""
    needs_userfaultfd()
    with procs.running_source(tmp_path, "256MiB") as (src, info):
        args = [*procs.MIGRATOR, "dest", "--source", str(info["address"]), "--run-for", "5", "--quiet"]
        with procs.command(args, tmp_path, "dest") as dest:
            dest_guest = wait_dest_migrating(dest)
            dest.signal(signal.SIGKILL)
            dest.wait(timeout=5)
            procs.wait_for(lambda: not procs.alive(dest_guest), 5, what="the orphaned destination guest to die")
        time.sleep(0.5)
        assert src.proc.poll() is None, f"source exited ({src.proc.returncode}):\n{src.stderr()}"
        assert procs.alive(int(info["guest_pid"])), "the source dropped its guest before any Complete"
        # a destination may still run the guest: a first Ctrl-C is refused, with a warning
        src.signal(signal.SIGINT)
        procs.wait_for(lambda: "not stopping" in src.stderr(), 10, what="the refused stop")
        time.sleep(0.5)
        assert src.proc.poll() is None and procs.alive(int(info["guest_pid"]))
        src.signal(signal.SIGTERM)  # an operator's SIGTERM stops it, and says what that costs
        rc = src.wait(timeout=15)
        assert "that guest will fail" in src.stderr()
        assert rc == 4, f"exit {rc}: a migration stopped half way is a transport failure\n{src.stderr()}"
        assert "Traceback" not in src.stderr()
        assert src.leftovers() == []


@pytest.fixture(scope="module")
def source_guest_killed(tmp_path_factory: pytest.TempPathFactory) -> tuple[procs.Cmd, procs.Cmd, float]:
    """(source, dest, seconds the dest took to exit) after the source's guest was killed mid-migration."""
    needs_userfaultfd()
    tmp = tmp_path_factory.mktemp("source-guest-killed")
    with procs.running_source(tmp, "256MiB") as (src, info):
        args = [*procs.MIGRATOR, "dest", "--source", str(info["address"]), "--run-for", "5", "--quiet",
                "--reconnect-deadline", "3"]  # fmt: skip
        with procs.command(args, tmp, "dest") as dest:
            wait_dest_migrating(dest)
            procs.kill_pid(int(info["guest_pid"]))
            t0 = time.monotonic()
            dest.wait(timeout=15)
            took = time.monotonic() - t0
            src.wait(timeout=15)
            assert src.leftovers() == [] and dest.leftovers() == []
            return src, dest, took


def test_source_guest_killed_fails_the_destination(source_guest_killed: tuple[procs.Cmd, procs.Cmd, float]) -> None:
    _src, dest, took = source_guest_killed
    assert took < 10
    assert dest.proc.returncode in (4, 5, 6), dest.stderr()
    assert_one_line_error(dest.stderr())


def test_source_guest_killed_reported_in_one_line(source_guest_killed: tuple[procs.Cmd, procs.Cmd, float]) -> None:
    src, _dest, _took = source_guest_killed
    assert src.proc.returncode == 5, src.stderr()
    assert_one_line_error(src.stderr(), "guest")


# -- guest -----------------------------------------------------------------------------
def test_destination_guest_killed_mid_migration(tmp_path: Path) -> None:
    needs_userfaultfd()
    with procs.running_source(tmp_path, "256MiB") as (src, info):
        args = [*procs.MIGRATOR, "dest", "--source", str(info["address"]), "--run-for", "5", "--quiet"]
        with procs.command(args, tmp_path, "dest") as dest:
            dest_guest = wait_dest_migrating(dest)
            procs.kill_pid(dest_guest)
            rc = dest.wait(timeout=10)
            assert rc == 5, f"exit {rc}, want 5 (guest failure):\n{dest.stderr()}"
            assert_one_line_error(dest.stderr(), "guest")
            assert dest.leftovers() == []
        # the source keeps its (paused) guest: the destination never confirmed completion
        assert src.proc.poll() is None, f"source exited with {src.proc.returncode}:\n{src.stderr()}"
        assert procs.alive(int(info["guest_pid"]))


# -- cannot run here -----------------------------------------------------------------------
needs_x86_64 = pytest.mark.skipif(platform.machine() != "x86_64", reason="the seccomp filter is written for x86_64")


@needs_x86_64
def test_deny_uffd_helper_refuses_exactly_userfaultfd() -> None:
    """The filter itself: both ways to create a uffd fail with EPERM, other syscalls work."""
    code = (
        "import ctypes, errno, fcntl, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "r = libc.syscall(323, os.O_CLOEXEC)\n"
        "print('syscall', r, errno.errorcode.get(ctypes.get_errno()))\n"
        "try:\n"
        "    fd = os.open('/dev/userfaultfd', os.O_RDWR)\n"
        "except OSError as e:\n"
        "    print('ioctl', 'nodev')\n"
        "else:\n"
        "    try:\n"
        "        fcntl.ioctl(fd, 0xAA00, os.O_CLOEXEC); print('ioctl', 'ok')\n"
        "    except OSError as e:\n"
        "        print('ioctl', errno.errorcode[e.errno])\n"
        "r, w = os.pipe(); print('fionread', fcntl.ioctl(r, 0x541B, b'\\0\\0\\0\\0'))\n"
        "print(open('/proc/self/status').read().split('Seccomp:')[1].split()[0])\n"
    )
    res = procs.run([sys.executable, str(DENY_UFFD), sys.executable, "-c", code], timeout=30)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "syscall -1 EPERM"
    assert lines[1] in ("ioctl EPERM", "ioctl nodev")
    assert lines[2].startswith("fionread")  # an unrelated ioctl still works
    assert lines[3] == "2"  # Seccomp: filter mode


@needs_x86_64
def test_check_under_seccomp() -> None:
    res = procs.run([sys.executable, str(DENY_UFFD), *procs.MIGRATOR, "check"], timeout=30)
    assert res.returncode == 3, res
    assert "seccomp" in res.stdout.lower(), res.stdout
    assert "Traceback" not in res.stderr


@needs_x86_64
def test_dest_under_seccomp() -> None:
    res = procs.run([sys.executable, str(DENY_UFFD), *procs.MIGRATOR, "dest", "--source", "127.0.0.1:1"], timeout=30)
    assert res.returncode == 3, res
    assert_one_line_error(res.stderr, "seccomp")
    assert res.stderr.count("\n") == 1


# -- usage -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "mention"),
    [
        (["source", "--ram", "banana"], "banana"),
        (["dest", "--compress", "bogus"], "bogus"),
        (["source", "--zero-pct", "80", "--text-pct", "80"], "--zero-pct"),
    ],
)
def test_bad_cli_input(args: list[str], mention: str) -> None:
    res = procs.run([*procs.MIGRATOR, *args], timeout=30)
    assert res.returncode == 2, res
    assert "Traceback" not in res.stderr
    assert mention in res.stderr, res.stderr
    assert "Error:" in res.stderr  # click's usage error line
    assert res.stdout == ""


def test_sigterm_stops_a_waiting_source(tmp_path: Path) -> None:
    """A source nobody migrates stops on SIGTERM (exit 0, phase running) and takes its guest along."""
    with procs.running_source(tmp_path, "32MiB") as (src, info):
        src.signal(signal.SIGTERM)
        assert src.wait(timeout=15) == 0, src.stderr()
        assert "running" in src.stdout()
        assert src.leftovers() == []
        assert not procs.alive(int(info["guest_pid"]))
