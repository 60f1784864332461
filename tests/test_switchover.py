"""The switch-over and its endings (issue 8): never two live guests, never none.

One test per way a migration can end, with real processes: a `migrator
source`, a `migrator dest` (or a destination played call by call with the real
gRPC client, `helpers.raw_client`), and a proxy that resets the link at a
chosen call (`helpers.h2_proxy`).  Each ends with exactly one live guest
holding correct memory (checked by the guest's own full verify), or with a
clear message and a paused guest that can be rolled back.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from tests.conftest import require_userfaultfd
from tests.helpers import procs
from tests.helpers.h2_proxy import H2Proxy
from tests.helpers.raw_client import RawClient, ended_reason

pytestmark = pytest.mark.slow


def _dest(address: str, *extra: str) -> list[str]:
    return [*procs.MIGRATOR, "dest", "--source", address, "--run-for", "0.5", "--json", "--quiet", *extra]


def _verified(dest: procs.Cmd | subprocess.CompletedProcess[str], rc: int | None = None) -> dict:
    out = dest.stdout() if isinstance(dest, procs.Cmd) else dest.stdout
    err = dest.stderr() if isinstance(dest, procs.Cmd) else dest.stderr
    s = json.loads(out)
    assert s["ok"] and s["verified_pages"] == s["pages"] and s["verify_errors"] == [] and s["guest_errors"] == [], err
    return s


def _target(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)


def _migrate_again_and_verify(tmp: Path, address: str, name: str = "again") -> dict:
    with procs.command(_dest(address), tmp, name) as d:
        assert d.wait(120) == 0, d.stderr()
        return _verified(d)


def _lanes(dest: procs.Cmd) -> list[int]:
    return [c for c in procs.children(dest.pid) if "migrator.dest.lane" in procs.cmdline(c)]


def _hold_the_bulk(dest: procs.Cmd, sig: int = signal.SIGSTOP) -> None:
    """Stop (or continue) the destination's lane processes: pages stay missing, the
    guest keeps faulting them in through the fault process."""
    lanes = procs.wait_for(lambda: _lanes(dest), 30, what="the destination's lanes")
    for pid in lanes:
        procs.kill_pid(pid, sig)


# -- a normal migration ------------------------------------------------------------------
def test_normal_migrations_say_nothing_alarming(tmp_path: Path) -> None:
    """A successful migration ends with the release confirmed on both sides, and the
    source never suggests a roll-back (it used to, every time)."""
    require_userfaultfd()
    for i in range(3):
        with procs.running_source(tmp_path, "64MiB", "--json") as (src, info):
            with procs.command(_dest(info["address"]), tmp_path, f"dest{i}") as d:
                assert d.wait(120) == 0, d.stderr()
                s = _verified(d)
            assert s["release"] == "confirmed"
            assert src.wait(30) == 0, src.stderr()
            err = src.stderr()
            assert "went away" not in err and "rollback" not in err and "USR1" not in err, err
            assert "confirmed every page" in err
            assert json.loads(src.stdout()[src.stdout().index("{") :])["phase"] == "completed"
        (tmp_path / "source-ready.json").unlink()


# -- a roll-back while the destination runs the guest -----------------------------------
def test_sigusr1_while_the_destination_fetches_is_refused(tmp_path: Path) -> None:
    require_userfaultfd()
    with procs.running_source(tmp_path, "512MiB") as (src, info):
        with procs.command(_dest(info["address"], "--batch-pages", "32"), tmp_path, "dest") as d:
            procs.wait_for(lambda: "switch-over" in src.stderr(), 60, what="the switch-over")
            _hold_the_bulk(d)
            src.signal(signal.SIGUSR1)
            procs.wait_for(lambda: "roll-back refused" in src.stderr(), 10, what="the refusal")
            _hold_the_bulk(d, signal.SIGCONT)
            assert d.wait(120) == 0, d.stderr()
            _verified(d)
        assert src.wait(30) == 0, src.stderr()
        assert "rolled back" not in src.stderr()


def test_forced_rollback_stops_the_destinations_copy(tmp_path: Path) -> None:
    """`migrator rollback --force` while pages are missing: the source runs the guest
    again and the destination stops its copy (exit 4, one line): one live guest."""
    require_userfaultfd()
    with procs.running_source(tmp_path, "512MiB") as (src, info):
        addr = info["address"]
        with procs.command(_dest(addr, "--batch-pages", "32"), tmp_path, "dest") as d:
            procs.wait_for(lambda: "switch-over" in src.stderr(), 60, what="the switch-over")
            _hold_the_bulk(d)
            refused = procs.run([*procs.MIGRATOR, "rollback", "--source", addr], timeout=30)
            assert refused.returncode == 1 and "--force" in refused.stdout, refused
            forced = procs.run([*procs.MIGRATOR, "rollback", "--source", addr, "--force"], timeout=30)
            assert forced.returncode == 0 and "rolled back by force" in forced.stdout, forced
            assert d.wait(60) == 4, d.stderr()
            err = d.stderr().strip().splitlines()
            assert len(err) == 1 and "ended this migration" in err[0] and "Traceback" not in d.stderr(), err
            dest_guests = procs.guest_children(d.pid)
        assert dest_guests == [] or not any(procs.alive(g) for g in dest_guests)
        assert procs.alive(int(info["guest_pid"]))
        time.sleep(0.5)  # the guest runs (and writes) on the source again
        _migrate_again_and_verify(tmp_path, addr)
        assert src.wait(30) == 0, src.stderr()


# -- the link resets during Complete ----------------------------------------------------
@pytest.mark.parametrize("when", ["request", "response"])
def test_link_reset_during_complete(tmp_path: Path, when: str) -> None:
    """The request lost (the source never heard it) or the reply lost (it released its
    copy): either way the destination keeps its complete guest, asks again, and both
    sides end with the release confirmed."""
    require_userfaultfd()
    with procs.running_source(tmp_path, "64MiB", "--json") as (src, info):
        with H2Proxy(_target(info["address"])) as proxy:
            cut = proxy.cut_at("Complete", when=when)
            with procs.command(_dest(proxy.address), tmp_path, "dest") as d:
                assert d.wait(120) == 0, d.stderr()
                s = _verified(d)
            assert cut.is_set(), proxy.paths
        assert s["release"] == "confirmed", s["release"]
        assert src.wait(30) == 0, src.stderr()
        assert json.loads(src.stdout()[src.stdout().index("{") :])["phase"] == "completed"


# -- the destination vanishes right after the handshake ----------------------------------
def test_destination_gone_after_the_handshake(tmp_path: Path) -> None:
    """A destination that paused the guest and then vanished: the source says so within
    seconds and runs the guest again (no one else ever ran it)."""
    require_userfaultfd()
    with procs.running_source(tmp_path, "64MiB", "--switchover-timeout", "2") as (src, info):
        with RawClient(info["address"], info["secret"]) as c:
            c.describe()
            c.handshake()
        t0 = time.monotonic()
        procs.wait_for(lambda: "runs here again" in src.stderr(), 10, what="the source to resume its guest")
        assert time.monotonic() - t0 < 5
        assert "went away before taking the guest" in src.stderr() or "did not take the guest" in src.stderr()
        s = _migrate_again_and_verify(tmp_path, info["address"])
        assert s["ops_before"] > 0  # it really ran on the source again before this migration


def test_link_reset_during_the_handshake_reply(tmp_path: Path) -> None:
    """The reply to the pausing handshake is lost: the destination asks again with the
    same token, gets the same migration, and completes it."""
    require_userfaultfd()
    with procs.running_source(tmp_path, "64MiB") as (src, info):
        with H2Proxy(_target(info["address"])) as proxy:
            cut = proxy.cut_at("Handshake", when="response")
            with procs.command(_dest(proxy.address), tmp_path, "dest") as d:
                assert d.wait(120) == 0, d.stderr()
                _verified(d)
            assert cut.is_set()
            assert proxy.paths.count("/migrator.wire.Migration/Handshake") >= 2
        assert "retrying" in d.stderr()
        assert src.wait(30) == 0, src.stderr()
        assert "runs here again" not in src.stderr()


# -- a stalled source guest -------------------------------------------------------------
def test_source_guest_stalled_before_a_migration(tmp_path: Path) -> None:
    """A guest stopped for longer than any control timeout, then continued: the source
    keeps a usable control channel and the next migration works."""
    require_userfaultfd()
    with procs.running_source(tmp_path, "64MiB") as (src, info):
        guest = int(info["guest_pid"])
        procs.kill_pid(guest, signal.SIGSTOP)
        time.sleep(7)
        procs.kill_pid(guest, signal.SIGCONT)
        _migrate_again_and_verify(tmp_path, info["address"])
        assert src.wait(30) == 0, src.stderr()


def test_source_guest_stalled_during_the_pause(tmp_path: Path) -> None:
    """The guest does not answer the pause: the migration is refused in one line, the
    guest keeps running on the source (no wedge in "pausing"), and a later one works."""
    require_userfaultfd()
    with procs.running_source(tmp_path, "64MiB") as (src, info):
        guest = int(info["guest_pid"])
        procs.kill_pid(guest, signal.SIGSTOP)
        try:
            failed = procs.run(_dest(info["address"]), timeout=60)
        finally:
            procs.kill_pid(guest, signal.SIGCONT)
        assert failed.returncode == 4, failed
        lines = failed.stderr.strip().splitlines()
        assert len(lines) == 1 and "could not pause its guest" in lines[0], lines
        procs.wait_for(lambda: "keeps running here" in src.stderr(), 10, what="the source to say so")
        _migrate_again_and_verify(tmp_path, info["address"])
        assert src.wait(30) == 0, src.stderr()


# -- nothing between the pause and "paused" needs a new descriptor ---------------------------
def test_descriptor_exhaustion_after_connecting(tmp_path: Path) -> None:
    """The source cannot open one more file: a connected destination still pauses,
    fetches and cancels cleanly (everything it needs was opened before the pause)."""
    require_userfaultfd()
    with procs.running_source(tmp_path, "64MiB") as (src, info):
        with RawClient(info["address"], info["secret"]) as c:
            c.describe()  # the connection is up
            nfds = len(list(Path(f"/proc/{src.pid}/fd").iterdir()))
            soft = subprocess.run(["prlimit", f"--pid={src.pid}", "--nofile", "--raw", "--noheadings", "-o", "SOFT"],
                                  check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
            subprocess.run(["prlimit", f"--pid={src.pid}", f"--nofile={nfds}:"], check=True)  # the soft limit only
            try:
                c.handshake()
                batch = c.demand(100, 8)
                assert batch.count == 8
                c.cancel("test: descriptors exhausted")
            finally:
                subprocess.run(["prlimit", f"--pid={src.pid}", f"--nofile={soft}:"], check=True)
        procs.wait_for(lambda: "runs here again" in src.stderr(), 10, what="the cancel")
        _migrate_again_and_verify(tmp_path, info["address"])


# -- Cancel after the guest ran ------------------------------------------------------------
def test_cancel_after_the_switchover_is_refused(tmp_path: Path) -> None:
    require_userfaultfd()
    with procs.running_source(tmp_path, "64MiB") as (src, info):
        with RawClient(info["address"], info["secret"]) as c:
            c.handshake()
            c.switchover()
            with pytest.raises(grpc.RpcError) as err:
                c.cancel("a destination whose guest already ran")
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "switched over" in err.value.details()
            assert "runs here again" not in src.stderr()
        forced = procs.run([*procs.MIGRATOR, "rollback", "--source", info["address"], "--force"], timeout=30)
        assert forced.returncode == 0, forced
        _migrate_again_and_verify(tmp_path, info["address"])


# -- a stream of an ended epoch ------------------------------------------------------------
def test_stream_of_a_rolled_back_migration_is_ended_at_once(tmp_path: Path) -> None:
    """Batches already on the wire may still arrive, but none is read from the guest
    after the roll-back, the stream ends within a second or two, and its epoch is
    refused from then on (it used to drain the next migration's pages)."""
    require_userfaultfd()
    with procs.running_source(tmp_path, "256MiB") as (src, info):
        with RawClient(info["address"], info["secret"]) as c:
            c.handshake()
            stream = c.stream(batch_pages=1)
            it = iter(stream)
            next(it)  # served while the migration is on
            # not switched over: the roll-back is allowed without force
            r = procs.run([*procs.MIGRATOR, "rollback", "--source", info["address"]], timeout=30)
            t_reply = time.time_ns()
            assert r.returncode == 0 and "rolled back" in r.stdout, r
            t0 = time.monotonic()
            last_sent = 0
            with pytest.raises(grpc.RpcError):
                for batch in it:
                    last_sent = max(last_sent, batch.sent_unix_ns)
            assert time.monotonic() - t0 < 2
            assert last_sent < t_reply, "a batch was read from the guest after the roll-back"
            with pytest.raises(grpc.RpcError) as err:
                next(iter(c.stream()))
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and ended_reason(err.value) == "rolled-back"
            # the next migration is not drained by the old stream
            s = _migrate_again_and_verify(tmp_path, info["address"])
        assert s["pages_demand"] < 5_000, s["pages_demand"]  # ~1,700 normally; 5,000-11,000 when drained


# -- options that can fail are checked before the migration -------------------------------
def test_failing_options_are_refused_before_the_source_pauses(tmp_path: Path) -> None:
    require_userfaultfd()
    shadow = tmp_path / "shadow"
    (shadow / "matplotlib").mkdir(parents=True)
    (shadow / "matplotlib" / "__init__.py").write_text("raise ImportError('matplotlib is hidden by this test')\n")
    with procs.running_source(tmp_path, "64MiB") as (src, info):
        for extra, env in (
            (["--listen", "127.0.0.1:0", "--plot", str(tmp_path / "t.png")], {"PYTHONPATH": str(shadow)}),
            (["--plot", str(tmp_path / "no-such-dir" / "t.png")], {}),
            (["--listen", "127.0.0.1:0", "--ready-file", str(tmp_path / "no-such-dir" / "r.json")], {}),
        ):
            r = procs.run(_dest(info["address"], *extra), timeout=60, env=env)
            assert r.returncode == 2, r
            assert "Traceback" not in r.stderr
        time.sleep(0.3)
        assert "switch-over" not in src.stderr() and src.proc.poll() is None
        _migrate_again_and_verify(tmp_path, info["address"])
