"""Two real nodes: migrations between two network-namespace hosts, over shaped,
cut and delayed links.

The hosts (``helpers/netns.py``): source 10.77.0.1, destination 10.77.0.2, a
veth pair between them; ``tc tbf`` limits the link (there is no netem here),
and a user-space delay proxy (``helpers/delay_proxy.py``) adds latency.  Every
process runs as a user would run it, the venv's ``migrator`` console script,
inside its namespace with ``ip netns exec``.  Evidence comes from outside the
migrator where it can: the veth's own byte counters, the guest's self-check
of every page, the processes left in each namespace.

Run ``pytest tests/test_netns.py -s`` to see the measured tables.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import procs
from helpers.delay_proxy import DelayProxy
from helpers.netns import SRC_ADDR, Host, NetnsError, TwoHosts, two_hosts  # noqa: F401 - fixture

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.usefixtures("userfaultfd_required")]

PORT = 7000
SOURCE = f"{SRC_ADDR}:{PORT}"
RATES = {"1gbit": 1e9, "100mbit": 100e6}


# -- helpers -------------------------------------------------------------------------------
def source_args(listen: str, ready: Path, ram: str, *extra: str) -> list[str]:
    return [*procs.MIGRATOR, "source", "--listen", listen, "--ram", ram, "--ready-file", str(ready), *extra]


def dest_args(source: str, *extra: str) -> list[str]:
    return [*procs.MIGRATOR, "dest", "--source", source, "--json", *extra]


@contextlib.contextmanager
def source_on(host: Host, tmp: Path, ram: str, *extra: str) -> Iterator[procs.Cmd]:
    """``migrator source`` listening on the source host, ready; its group is killed at the end."""
    ready = tmp / "source-ready.json"
    with host.command(source_args(f"{host.addr}:{PORT}", ready, ram, *extra), tmp, "source") as cmd:
        info = procs.wait_ready(cmd, ready)
        assert info["address"] == f"{host.addr}:{PORT}"
        yield cmd


def summary_of(r: Any) -> dict[str, Any]:
    """The destination's JSON summary; fails with its stderr if it did not exit 0."""
    assert r.returncode == 0, f"dest exited {r.returncode}\nstderr:\n{r.stderr}"
    s: dict[str, Any] = json.loads(r.stdout)
    return s


def assert_migrated(s: dict[str, Any], ram: int) -> None:
    assert s["ok"] is True, s["error"]
    assert s["pages"] * s["page_size"] == ram
    assert s["verified_pages"] == s["pages"], s["verify_errors"][:5]
    assert s["verify_errors"] == []
    assert s["pages_demand"] + s["pages_prefetch"] + s["pages_zero"] == s["pages"]


def veth_bytes(host: Host, what: str) -> int:
    """A counter of ``host``'s veth end, read from the kernel (``tx_bytes``, ``rx_bytes``)."""
    r = host.run(["cat", f"/sys/class/net/{host.dev}/statistics/{what}"], timeout=10)
    return int(r.stdout)


def assert_no_processes(hosts: TwoHosts) -> None:
    """Nothing is left running in either namespace (waits up to 5 s for exits to finish)."""
    try:
        procs.wait_for(lambda: not hosts.pids(), 5.0, what="both namespaces to be empty")
    except AssertionError:
        raise AssertionError(f"left over: {[(p, procs.cmdline(p)) for p in hosts.pids()]}") from None


def shape(hosts: TwoHosts, how: str, rate: str = "") -> None:
    """``hosts.limit(rate)`` or ``hosts.partition()``; skips where the kernel has no tbf."""
    try:
        hosts.partition() if how == "partition" else hosts.limit(rate)
    except NetnsError as exc:
        pytest.skip(f"tc tbf is not available here: {exc}")


def migrate(hosts: TwoHosts, tmp: Path, ram: str, *dest_extra: str) -> dict[str, Any]:
    """One migration source host -> dest host; checks both exit 0 and nothing is left."""
    with source_on(hosts.src, tmp, ram) as src:
        r = hosts.dst.run(dest_args(SOURCE, "--quiet", *dest_extra), timeout=150)
        s = summary_of(r)
        assert src.wait(30) == 0, src.stderr()  # 0: the destination confirmed every page
    assert_no_processes(hosts)
    return s


# -- 1. a plain migration between the two hosts ----------------------------------------------
def test_migration_between_two_hosts(two_hosts: TwoHosts, tmp_path: Path) -> None:
    tx0 = veth_bytes(two_hosts.src, "tx_bytes")
    s = migrate(two_hosts, tmp_path, "64MiB", "--run-for", "1")
    assert_migrated(s, 64 << 20)
    # the pages really crossed the veth: the kernel counted at least the wire bytes
    sent = veth_bytes(two_hosts.src, "tx_bytes") - tx0
    assert sent >= s["wire_bytes"], (sent, s["wire_bytes"])


# -- 2. over a tbf-limited link -------------------------------------------------------------
@pytest.mark.parametrize("rate", ["1gbit", "100mbit"])
def test_migration_over_limited_link(two_hosts: TwoHosts, tmp_path: Path, rate: str) -> None:
    shape(two_hosts, "limit", rate)
    s = migrate(two_hosts, tmp_path, "64MiB", "--run-for", "0")
    assert_migrated(s, 64 << 20)
    link_ms = s["wire_bytes"] * 8 / RATES[rate] * 1e3
    print(f"\n[netns] {rate:>7s}: total {s['total_ms']:7.0f} ms, wire {s['wire_bytes'] / (1 << 20):5.1f} MiB "
          f"({s['compression']}), link needs {link_ms:6.0f} ms -> total/link {s['total_ms'] / link_ms:.2f}; "
          f"fault p50 {s['fault_p50_us']:.0f} us")  # fmt: skip
    # the limit applied: the wire bytes cannot have crossed faster than the link allows
    assert s["total_ms"] >= 0.8 * link_ms, (s["total_ms"], link_ms, two_hosts.qdisc(two_hosts.src))


# -- 3. the link disappears mid-migration ---------------------------------------------------
@pytest.mark.parametrize("cut", ["delete", "down", "partition"])
def test_link_lost_mid_migration(two_hosts: TwoHosts, tmp_path: Path, cut: str) -> None:
    """A 256 MiB guest over 100 Mbit/s takes well over ten seconds; about a second
    into it the veth is deleted, or set down, or silently drops everything (a
    partition: no error anywhere, only keepalives can tell): the destination
    must say so in one line and exit 4 within 10 s, leaving no guest behind; the source, stopped
    with SIGTERM, leaves none either and exits."""
    shape(two_hosts, "limit", "100mbit")
    with source_on(two_hosts.src, tmp_path, "256MiB") as src:
        tx0 = veth_bytes(two_hosts.src, "tx_bytes")
        args = dest_args(SOURCE, "--quiet", "--compress", "none", "--run-for", "0", "--reconnect-deadline", "3")
        with two_hosts.dst.command(args, tmp_path, "dest") as dest:

            def pages_flowing() -> bool:
                if dest.proc.poll() is not None:
                    raise AssertionError(f"dest exited {dest.proc.returncode} before migrating:\n{dest.stderr()}")
                return veth_bytes(two_hosts.src, "tx_bytes") - tx0 > (1 << 20)

            procs.wait_for(pages_flowing, 60, interval=0.05, what="pages to cross the link")
            time.sleep(1.0)
            assert dest.proc.poll() is None, f"migration already over after 1 s:\n{dest.stderr()}"
            if cut == "partition":
                shape(two_hosts, "partition")
            else:
                two_hosts.delete_link() if cut == "delete" else two_hosts.link_down()
            t_cut = time.monotonic()
            rc = dest.wait(10.0)
            took = time.monotonic() - t_cut
            err = dest.stderr()
            print(f"\n[netns] link {cut}: dest exit {rc} after {took:.1f} s: {err.strip()}")
            assert rc == 4, err
            # --quiet: the one line is all there is, and no traceback
            # one warning when the source became unreachable, then one final error at the deadline
            lines = [ln for ln in err.splitlines() if ln.strip()]
            assert "Traceback" not in err and lines[-1].startswith("migrator: error: source unreachable"), err
            assert [ln for ln in lines if ln.startswith("migrator: error:")] == [lines[-1]], err
            assert any("source unreachable" in ln and "reconnecting" in ln for ln in lines[:-1]), err
            procs.wait_for(lambda: not two_hosts.dst.guest_sims(), 5.0, what="no guest_sim left on the destination")
        # stop the source as an operator would; its guest must go with it
        src.signal(signal.SIGTERM)
        procs.wait_for(lambda: not two_hosts.src.guest_sims(), 10.0, what="no guest_sim left on the source")
        try:
            src_rc = src.wait(10.0)  # kills the group if it hangs
        except AssertionError:
            pytest.xfail("core: `migrator source` hangs at exit after SIGTERM once its destination vanished "
                         "(a page-server thread stays blocked sending on the dead connection)")
        assert "Traceback" not in src.stderr(), src.stderr()
        assert src_rc != 0, src.stderr()  # it never got the destination's confirmation
    assert_no_processes(two_hosts)


# -- 4. latency: a delay proxy between the two ------------------------------------------------
def test_demand_latency_with_delay(tmp_path: Path) -> None:
    """Source on loopback, the destination reaches it through the delay proxy.  A
    demand fault needs one round trip, so with 10 ms one way its p50 latency is at
    least 20 ms: proof the proxy delays both directions of every connection."""
    rows = []
    for delay_ms in (0, 1, 10):
        tmp = tmp_path / f"delay{delay_ms}"
        tmp.mkdir()
        with procs.running_source(tmp, "64MiB") as (src, info):
            host, port = info["address"].rsplit(":", 1)
            with DelayProxy((host, int(port)), delay_ms / 1e3, lifetime_s=150) as proxy:
                r = procs.run(dest_args(proxy.address, "--quiet", "--run-for", "0"), timeout=150)
            s = summary_of(r)
            assert_migrated(s, 64 << 20)
            assert proxy.connections >= 2, "urgent and bulk are two connections"
            assert proxy.errors == []
            assert src.wait(30) == 0, src.stderr()
        rows.append((delay_ms, s))
    print("\n[delay] one-way ms  faults  fault p50 us  fault p99 us  total ms  demand pages  wire MiB")
    for delay_ms, s in rows:
        print(f"[delay] {delay_ms:11d}  {s['faults']:6d}  {s['fault_p50_us']:12.0f}  {s['fault_p99_us']:12.0f}  "
              f"{s['total_ms']:8.0f}  {s['pages_demand']:12d}  {s['wire_bytes'] / (1 << 20):8.1f}")  # fmt: skip
    by = dict(rows)
    assert by[10]["faults"] > 0
    # a fault that needs the network costs at least one round trip (2 x 10 ms);
    # some faults need none (known-zero pages, pages already arriving in bulk)
    assert by[10]["fault_p99_us"] >= 20_000, by[10]["fault_p99_us"]

    def slow_share(s: dict) -> float:
        """Share of faults that took longer than ~16 ms (a 10 ms one-way round trip is 20 ms)."""
        hist = s["fault_hist"]
        slow = sum(n for k, n in hist.items() if int(k[2:-2]) >= 32768)
        return slow / max(1, sum(hist.values()))

    assert slow_share(by[10]) >= 0.1, (slow_share(by[10]), by[10]["fault_hist"])
    assert slow_share(by[10]) > slow_share(by[0]), (by[0]["fault_hist"], by[10]["fault_hist"])
