"""One post-copy migration, destination side, from empty guest to completion.

Steps (downtime is 3 to 5; everything slow happens before the pause):

 1. describe the source's guest (no pause) and start an empty incoming guest;
    it passes its userfaultfd; UFFDIO_API + UFFDIO_REGISTER (MISSING) on it;
 2. start fault threads, the urgent stream and the bulk stream's connection;
 3. handshake: the source pauses its guest and returns the vCPU state
    (retried with the same token across a lost connection);
 4. switch-over: the source records that this side may run the guest; only
    then is it resumed here;
 5. resume the guest with that state: it runs, faulting on missing pages;
    the streams open (the map of never-touched pages comes with the first
    bulk batch);
 6. wait until every page is present, watching the guest and every thread;
 7. stop the threads, UFFDIO_UNREGISTER, close the uffd, then Complete: only
    now may the source drop its copy.  Complete is retried (``release.py``)
    until the source confirms; a complete guest is never stopped for want of
    that confirmation.

Any failure before the switch-over cancels the migration (the source resumes
its guest).  After it, the guest's memory is split between two hosts: this
side reports, stops its guest, and says how to take it back on the source.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from migrator.config import DestConfig
from migrator.dest.fault import FaultHandler, FaultThreads
from migrator.dest.install import Installer
from migrator.dest.pagetable import PageTable
from migrator.dest.channels import Channels
from migrator.dest.source_client import GrpcPageSource, PageSource
from migrator.dest.release import Release
from migrator.errors import (
    AuthError,
    GuestDied,
    GuestError,
    MigrationEnded,
    MigratorError,
    ProtocolError,
    SourceUnreachable,
    TransportError,
)
from migrator.guest import GuestProcess, GuestSpec
from migrator.stats import DestStats
from migrator.uffd import abi
from migrator.uffd.fd import Userfaultfd
from migrator.wire import migration_pb2 as pb

log = logging.getLogger("migrator.dest")
T = TypeVar("T")


@dataclass
class Progress:
    """What the live display shows; produced every ~0.2 s."""

    elapsed_s: float
    present: int
    npages: int
    demand: int
    prefetch: int
    zero: int
    ops_per_s: float
    phase: str


@dataclass
class Outcome:
    manifest: pb.Manifest
    stats: DestStats
    guest: GuestProcess
    paused_ns: int = 0
    resumed_ns: int = 0
    done_ns: int = 0
    ops: dict[str, float] = field(default_factory=dict)
    guest_stats: dict[str, Any] = field(default_factory=dict)
    verify: dict[str, Any] = field(default_factory=dict)
    compression: str = "none"
    tids: list[int] = field(default_factory=list)
    reconnects: int = 0
    release: "Release | None" = None


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def _deprioritize(pid: int, nice: int) -> bool:
    """Lower the guest's CPU priority while it is mostly waiting for pages.

    On a small machine the guest's runnable vCPUs compete with the migration
    pipeline for the same cores; every millisecond they take delays the pages
    they are about to wait for.  Only done where it can be undone
    (CAP_SYS_NICE): raising a priority back needs it.
    """
    if nice <= 0 or not _has_cap_sys_nice():
        return False
    try:
        os.setpriority(os.PRIO_PROCESS, pid, nice)
    except OSError:
        return False
    return True


def _restore_priority(pid: int, tids: list[int]) -> None:
    for tid in [pid, *tids]:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, 0)
        except OSError as exc:
            log.warning("cannot restore the priority of guest thread %d: %s", tid, exc.strerror)


def _has_cap_sys_nice() -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> 23 & 1)  # CAP_SYS_NICE = 23
    except OSError:
        pass
    return False


class DestinationSession:
    def __init__(self, cfg: DestConfig, source: PageSource | None = None) -> None:
        self.cfg = cfg
        self.source = source
        self._failure: BaseException | None = None
        self._failed = threading.Event()
        self.guest: GuestProcess | None = None
        self.uffd: Userfaultfd | None = None
        self.channels: Channels | None = None
        self.release: Release | None = None
        self.token = os.urandom(16)  # names this destination's handshake (idempotent retries)
        self.say: Callable[[str], None] = lambda m: log.warning("%s", m)

    def fail(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc
        self._failed.set()

    def _check(self) -> None:
        if self._failure is not None:
            exc = self._failure
            if isinstance(exc, MigratorError):
                raise exc
            raise MigratorError(f"internal error in a migration thread: {exc!r}") from exc
        if self.guest is not None and not self.guest.alive():
            raise GuestDied("the destination guest died", exit=self.guest.proc.returncode)

    def migrate(self, on_progress: Callable[[Progress], None] | None = None) -> Outcome:
        """Run steps 1-7; returns with the guest running on this side."""
        cfg = self.cfg
        if self.source is None:
            self.source = GrpcPageSource(cfg.source, secret=cfg.secret, tls=cfg.tls, connect_timeout=cfg.connect_timeout)
        src = self.source
        desc = src.describe()
        spec = GuestSpec(ram=desc.ram_size, page_size=desc.page_size, vcpus=desc.vcpus or 2, incoming=True)
        self.guest = guest = GuestProcess(spec)
        h = guest.hello
        assert h.uffd is not None
        self.uffd = uffd = Userfaultfd(h.uffd)
        uffd.api(abi.UFFD_FEATURE_THREAD_ID)
        uffd.register(h.addr, h.size)
        npages = h.size // h.page_size
        table = PageTable(npages)
        stats = DestStats()
        installer = Installer(uffd, table, h.addr, h.page_size, stats)
        manifest: pb.Manifest | None = None
        channels: Channels | None = None
        faults: FaultThreads | None = None
        switched = resumed = False
        try:
            # Everything that does not need the manifest is ready before the pause.
            # The zero map comes with the first bulk batch (outside the downtime);
            # until then no page is known to be zero and faults go to the source.
            loopback = _is_loopback(cfg.source) if isinstance(src, GrpcPageSource) else True
            zero_map = bytes(npages)
            channels = Channels(src, installer, table, zero_map, stats, cfg, loopback, self.fail, self.say)
            handler = FaultHandler(uffd, table, installer, zero_map, h.addr, h.page_size, channels.request, cfg.demand_window)
            channels.handler = handler
            faults = FaultThreads(uffd, handler, cfg.fault_threads, self.fail)
            faults.start()
            niced = _deprioritize(guest.hello.pid, cfg.guest_nice)  # vCPU threads inherit it

            manifest = self._retrying("handshake", lambda: src.handshake(self.token))  # the source pauses
            t_hs = time.time_ns()
            if manifest.ram_size != h.size or manifest.page_size != h.page_size:
                raise ProtocolError("manifest does not match the guest", ram=manifest.ram_size, page_size=manifest.page_size)
            state = json.loads(manifest.vcpu_state)
            # Only once the source has recorded the switch-over may the guest run here.
            self._retrying("switch-over", src.switchover)
            switched = True
            reply = guest.call("resume", state=state, write_ratio=cfg.write_ratio)
            resumed = True  # downtime ends; faults until the streams open are recorded and sent then
            channels.start()
            self.channels = channels
            out = Outcome(manifest, stats, guest, paused_ns=manifest.paused_unix_ns, resumed_ns=int(reply["resumed_ns"]))
            out.tids = list(reply.get("tids", []))
            log.debug("handshake->resume %.1f ms", (out.resumed_ns - t_hs) / 1e6)
            self._wait_all_present(table, out, on_progress)
            out.done_ns = time.time_ns()
            if niced:
                _restore_priority(guest.hello.pid, out.tids)
            stats.faults = handler.faults
            stats.faults_spurious = handler.spurious
        except BaseException as exc:
            for part in (faults, channels):
                if part is not None:
                    part.stop()
            guest.kill()
            uffd.close()
            told = self._failed_because(exc, manifest, switched, resumed)
            if told is exc:
                raise
            raise told from exc
        out.compression = channels.compression
        out.reconnects = channels.reconnects
        faults.stop()
        channels.stop()
        uffd.unregister(h.addr, h.size)
        uffd.close()
        # Every page is here: the source may release its copy.  Confirmed, or
        # retried in the background; never a reason to stop this guest.
        self.release = Release(src, table.present, self.say, self.fail)
        out.release = self.release
        self.release.start()
        return out

    def _retrying(self, what: str, call: Callable[[], T]) -> T:
        """``call`` until it answers, across a lost connection, for up to the reconnect
        deadline; a refusal (or the guest dying here) ends it at once."""
        deadline = time.monotonic() + self.cfg.reconnect_deadline
        backoff = 0.1
        said = False
        while True:
            try:
                return call()
            except (SourceUnreachable, TransportError) as exc:
                if isinstance(exc, AuthError) or time.monotonic() + backoff > deadline:
                    raise
                if not said:
                    self.say(f"source unreachable during the {what} ({exc}); retrying for up to {self.cfg.reconnect_deadline:g} s")
                    said = True
            self._check()
            time.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    def _failed_because(self, exc: BaseException, manifest: pb.Manifest | None, switched: bool, resumed: bool) -> BaseException:
        """What a failure means for the guest, in one line (the guest here is stopped)."""
        src = self.source
        assert src is not None
        if manifest is not None and not switched:
            # the guest never ran here: the source may resume its copy at once
            try:
                src.cancel(f"destination failed before the switch-over: {exc}")
            except MigratorError:
                pass  # it resumes its guest by itself after its switch-over timeout
            return exc
        if switched and not isinstance(exc, MigrationEnded) and isinstance(exc, MigratorError):
            how = "after the switch-over" if not resumed else "while pages were missing"
            where = self.cfg.source
            return type(exc)(
                f"{exc}; the destination failed {how}: its guest is stopped, and the source keeps its paused "
                f"copy: take it back there with `migrator rollback --source {where} --force`"
            )
        return exc

    def _wait_all_present(self, table: PageTable, out: Outcome, on_progress: Callable[[Progress], None] | None) -> None:
        t0 = time.monotonic()
        last_ops: tuple[float, int] | None = None
        while not table.all_present.wait(0.2):
            if self.channels is not None and self.channels.lost.is_set():
                assert self.guest is not None
                self.channels.recover(self.guest)
            self._check()
            if on_progress is not None:
                ops, now = self._guest_ops(), time.monotonic()
                rate = (ops - last_ops[1]) / (now - last_ops[0]) if last_ops else 0.0
                last_ops = (now, ops)
                s = out.stats
                on_progress(Progress(now - t0, table.present, table.npages, s.pages_demand, s.pages_prefetch, s.pages_zero, rate, "migrating"))
        self._check()
        # the guest's op counter at the last page; report.py turns it into ops/s during
        out.ops["during_ops"] = self._guest_ops()

    def _guest_ops(self) -> int:
        assert self.guest is not None
        st = self.guest.call("stats", timeout=10)
        return sum(v["ops"] for v in st["vcpus"])

    def run_after(self, out: Outcome, seconds: float | None, stop: threading.Event, on_progress: Callable[[Progress], None] | None = None) -> None:
        """Keep the guest running on this side for ``seconds`` (None: until ``stop``)."""
        guest = out.guest
        t0 = time.monotonic()
        ops0 = self._guest_ops()
        last = (t0, ops0)
        while not stop.wait(0.5):
            self._check()  # e.g. the source took the guest back by force
            now = time.monotonic()
            ops = self._guest_ops()
            if on_progress is not None:
                t = out.manifest.ram_size // out.manifest.page_size
                s = out.stats
                on_progress(Progress(now - t0, t, t, s.pages_demand, s.pages_prefetch, s.pages_zero, (ops - last[1]) / (now - last[0]), "running"))
            last = (now, ops)
            if seconds is not None and now - t0 >= seconds:
                break
        now = time.monotonic()
        ops = self._guest_ops()
        out.ops["after"] = (ops - ops0) / max(now - t0, 1e-9) if now > t0 else 0.0

    def finish(self, out: Outcome, *, keep_running: bool = False) -> None:
        """Pause the guest, let it verify every page, collect its stats; then stop
        it, or (keep_running, for the next hop) let it run on."""
        guest = out.guest
        if out.release is not None and not out.release.confirmed.is_set():
            out.release.wait(5.0)  # a last chance to hear from the source before the summary
        self._check()
        if self.cfg.verify:
            guest.call("pause", timeout=30)
            out.verify = guest.call("verify", timeout=600)
            if keep_running:
                guest.call("resume")
        out.guest_stats = guest.call("stats")
        if keep_running:
            self.guest = None  # no longer ours to kill in close()
        else:
            guest.quit()

    def close(self) -> None:
        if self.release is not None:
            self.release.stop()
        if self.guest is not None and self.guest.alive():
            self.guest.kill()
        if self.source is not None:
            self.source.close()


def guest_errors(guest_stats: dict[str, Any]) -> list[str]:
    errs: list[str] = []
    for v in guest_stats.get("vcpus", []):
        errs.extend(v.get("first_errors", []))
    return errs


__all__ = ["DestinationSession", "Outcome", "Progress", "guest_errors", "GuestError"]
