"""Two test hosts in network namespaces, joined by a veth pair.

::

    namespace mig-src-<pid>-<n>              namespace mig-dst-<pid>-<n>
    ┌──────────────────────────┐             ┌──────────────────────────┐
    │ lo up                    │    veth     │ lo up                    │
    │ to-dst  10.77.0.1/24  ───┼─────────────┼─── to-src  10.77.0.2/24  │
    └──────────────────────────┘             └──────────────────────────┘

The veth pair is created inside the source namespace with its peer placed
straight into the destination namespace, so no interface name ever exists in
the root namespace (no clash with a parallel run or anything else there).

Teardown always runs, also when the test failed: every process still inside one
of the namespaces (they are ours: we created the namespaces) is SIGKILLed, then
the namespaces are deleted, which deletes the veth.  A run that crashed without
its teardown leaves ``mig-*-<pid>-*`` namespaces behind; :func:`cleanup_stale`
removes those whose ``<pid>`` is no longer alive and is called before every new
pair is made.  Nothing outside the ``mig-`` names this module makes is touched.

Test traffic only ever goes to 10.77.0.1/10.77.0.2 inside these namespaces (or
to loopback).

Processes run through ``ip netns exec NS COMMAND``, which ``setns``es and then
``exec``s the command in place (no fork), so the pid that ``Popen`` returns is
the command itself; it starts in its own session (``start_new_session``) so the
command and its guest_sim child are killed together with ``os.killpg``.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import procs

SUBNET_PREFIX = 24
SRC_ADDR = "10.77.0.1"
DST_ADDR = "10.77.0.2"
_STALE = re.compile(r"^mig-(?:src|dst)-(\d+)-\d+$")
_counter = itertools.count()


class NetnsError(RuntimeError):
    """A namespace, link or qdisc could not be set up; the message has ip/tc's stderr."""


def _sh(*args: str, timeout: float = 20.0) -> str:
    try:
        p = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"{' '.join(args)}: {exc}") from exc
    if p.returncode != 0:
        raise NetnsError(f"{' '.join(args)}: exit {p.returncode}: {p.stderr.strip()}")
    return p.stdout


def list_namespaces() -> list[str]:
    """Names of the named network namespaces (``ip netns list``, first column)."""
    try:
        out = _sh("ip", "netns", "list")
    except NetnsError:
        return []
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def namespace_pids(ns: str) -> list[int]:
    """Processes whose network namespace is ``ns``."""
    try:
        out = _sh("ip", "netns", "pids", ns)
    except NetnsError:
        return []
    return [int(x) for x in out.split()]


def _empty_and_delete(ns: str) -> None:
    """SIGKILL everything inside ``ns`` (bounded wait), then delete the namespace."""
    deadline = time.monotonic() + 10.0
    while pids := namespace_pids(ns):
        for pid in pids:
            procs.kill_pid(pid)
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    with contextlib.suppress(NetnsError):
        _sh("ip", "netns", "delete", ns)


def cleanup_stale() -> list[str]:
    """Delete ``mig-*`` namespaces left behind by a crashed earlier run of these tests.

    Only names this module makes, and only those whose creating process is gone,
    so a concurrent test run keeps its namespaces.
    """
    removed = []
    for ns in list_namespaces():
        m = _STALE.match(ns)
        if m and not procs.alive(int(m.group(1))):
            _empty_and_delete(ns)
            removed.append(ns)
    return removed


@dataclass(frozen=True)
class Host:
    """One test host: a namespace, its end of the veth and its address."""

    ns: str
    dev: str
    addr: str

    def argv(self, args: list[str]) -> list[str]:
        """``args`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.ns, *args]

    def start(self, args: list[str], tmp: Path, name: str, env: dict[str, str] | None = None) -> procs.Cmd:
        """Start ``args`` here, in a new session, output in ``tmp/name.{out,err}``."""
        return procs.start(self.argv(args), tmp, name, env)

    @contextlib.contextmanager
    def command(self, args: list[str], tmp: Path, name: str, env: dict[str, str] | None = None) -> Iterator[procs.Cmd]:
        """:meth:`start`, and whatever happens, kill the command's process group at the end."""
        with procs.command(self.argv(args), tmp, name, env) as cmd:
            yield cmd

    def run(self, args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        """Run a short command here to completion (bounded)."""
        return procs.run(self.argv(args), timeout)

    def pids(self) -> list[int]:
        return namespace_pids(self.ns)

    def guest_sims(self) -> list[int]:
        """guest_sim processes (not zombies) in this namespace."""
        return [p for p in self.pids() if procs.alive(p) and procs.is_guest_sim(p)]


class TwoHosts:
    """Two namespaces with a veth pair between them; a context manager."""

    def __init__(self) -> None:
        n = f"{os.getpid()}-{next(_counter)}"
        self.src = Host(f"mig-src-{n}", "to-dst", SRC_ADDR)
        self.dst = Host(f"mig-dst-{n}", "to-src", DST_ADDR)
        self._made: list[str] = []

    def __enter__(self) -> TwoHosts:
        cleanup_stale()
        try:
            for h in (self.src, self.dst):
                _sh("ip", "netns", "add", h.ns)
                self._made.append(h.ns)
            _sh("ip", "-n", self.src.ns, "link", "add", self.src.dev, "type", "veth",
                "peer", "name", self.dst.dev, "netns", self.dst.ns)  # fmt: skip
            for h in (self.src, self.dst):
                _sh("ip", "-n", h.ns, "addr", "add", f"{h.addr}/{SUBNET_PREFIX}", "dev", h.dev)
                _sh("ip", "-n", h.ns, "link", "set", h.dev, "up")
                _sh("ip", "-n", h.ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        while self._made:
            _empty_and_delete(self._made.pop())

    # -- the link ----------------------------------------------------------------------
    def limit(self, rate: str, burst: str = "256kb", latency: str = "50ms") -> None:
        """Shape both ends of the veth with a token bucket (``tc qdisc ... tbf``)."""
        for h in (self.src, self.dst):
            _sh("ip", "netns", "exec", h.ns, "tc", "qdisc", "replace", "dev", h.dev, "root",
                "tbf", "rate", rate, "burst", burst, "latency", latency)  # fmt: skip

    def qdisc(self, host: Host) -> str:
        """``tc -s qdisc show`` of ``host``'s veth end (for failure messages)."""
        return _sh("ip", "netns", "exec", host.ns, "tc", "-s", "qdisc", "show", "dev", host.dev)

    def link_down(self) -> None:
        """Set both ends down: packets are dropped, sockets stay (like a pulled cable)."""
        for h in (self.src, self.dst):
            _sh("ip", "-n", h.ns, "link", "set", h.dev, "down")

    def partition(self) -> None:
        """Silently drop every packet both ways; links, routes and sockets stay (a network
        partition: only timeouts can notice).  No netem here: a token bucket whose burst
        is smaller than any packet drops them all."""
        for h in (self.src, self.dst):
            _sh("ip", "netns", "exec", h.ns, "tc", "qdisc", "replace", "dev", h.dev, "root",
                "tbf", "rate", "8bit", "burst", "10", "limit", "10")  # fmt: skip

    def delete_link(self) -> None:
        """Delete the veth pair (both ends go, with their addresses and routes)."""
        _sh("ip", "-n", self.src.ns, "link", "delete", self.src.dev)

    def pids(self) -> list[int]:
        return self.src.pids() + self.dst.pids()


@functools.cache
def unavailable_reason() -> str:
    """Why two-host tests cannot run here ("" if they can): probed by really making a pair once."""
    if os.geteuid() != 0:
        return "network namespaces need root (run the tests as root)"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed (apt-get install iproute2)"
    try:
        with TwoHosts() as hosts:
            out = hosts.dst.run(["ip", "-o", "-4", "addr", "show", "dev", hosts.dst.dev], timeout=20)
            if DST_ADDR not in out.stdout:
                return f"ip netns exec does not work here: {out.stderr.strip() or out.stdout.strip()}"
    except NetnsError as exc:
        return f"cannot create network namespaces with a veth pair here: {exc}"
    return ""


def require_netns() -> None:
    """Skip the calling test, with the reason, when namespaces cannot be made here."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def two_hosts() -> Iterator[TwoHosts]:
    """A fresh :class:`TwoHosts`; skips (saying why) where namespaces cannot be made."""
    require_netns()
    with TwoHosts() as hosts:
        yield hosts

