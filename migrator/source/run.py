"""`migrator source`: start a guest, serve it, release it once the destination confirms."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from dataclasses import asdict
from typing import Any

from migrator.config import SourceConfig
from migrator.errors import GuestDied
from migrator.guest import GuestProcess, GuestSpec
from migrator.security import load_secret
from migrator.source.server import SourceSession, serve

log = logging.getLogger("migrator.source")
SWITCH_INTERVAL_S = float(os.environ.get("MIGRATOR_SWITCH_INTERVAL", "0.0002"))


def run_source(cfg: SourceConfig, stop: threading.Event, say=print, rollback: threading.Event | None = None) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    g = cfg.guest
    guest = GuestProcess(
        GuestSpec(ram=g.ram, vcpus=g.vcpus, workload=g.workload, write_ratio=g.write_ratio,
                  zero_pct=g.zero_pct, text_pct=g.text_pct, seed=g.seed)
    )  # fmt: skip
    say(f"source: guest pid {guest.hello.pid} running ({g.ram >> 20} MiB, {g.vcpus} vCPUs, {g.workload})")
    return serve_guest(guest, cfg, stop, say, rollback)


def serve_guest(  # type: ignore[no-untyped-def]
    guest: GuestProcess, cfg: SourceConfig, stop: threading.Event, say=print, rollback: threading.Event | None = None
) -> dict[str, Any]:
    """Serve a running guest to one destination; release it once that one confirms.

    Until then the guest's memory stays here, paused, whatever happens to the
    destination.  If the destination is gone for good, the user may ask
    (``rollback`` set: SIGUSR1 from the CLI) to resume the guest here as it was
    at the pause; it is never resumed on its own.

    Used by `migrator source` for a guest it started, and by `migrator dest
    --listen` for the guest it just received (the next hop).
    """
    # The bulk stream's thread would hold the GIL for up to the default 5 ms
    # switch interval while a demand request waits: switch often.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    session = SourceSession(guest)
    try:
        secret, generated = load_secret(cfg.secret_file, create=True)
        server, port = serve(session, cfg.listen, secret=secret, tls=cfg.tls)
    except BaseException:
        session.close()
        guest.kill()
        raise
    host = cfg.listen.rsplit(":", 1)[0]
    info = {"address": f"{host}:{port}", "guest_pid": guest.hello.pid, "pid": os.getpid(), "ram": guest.hello.size}
    if cfg.ready_file:
        tmp = cfg.ready_file + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds the secret
        with os.fdopen(fd, "w") as f:
            json.dump({**info, "secret": secret}, f)
        os.replace(tmp, cfg.ready_file)
    if generated and cfg.secret_file:
        say(f"source: wrote a new migration secret to {cfg.secret_file}; give the destination --secret-file")
    elif generated:
        say(f"source: migration secret {secret} (give it to the destination as MIGRATOR_SECRET)")
    say(f"source: waiting for a destination on {info['address']}")
    try:
        while not stop.is_set() and not session.done.is_set():
            session.done.wait(0.2)
            if not guest.alive():
                raise GuestDied("the source guest died", exit=guest.proc.returncode)
            while not session.events.empty():
                event = session.events.get()
                if event == "lost":
                    say(f"source: the destination went away before confirming; the guest stays paused here with its "
                        f"memory as at the pause (the destination may reconnect). If it is gone for good, roll back "
                        f"with: kill -USR1 {os.getpid()}")  # fmt: skip
                else:
                    say(f"source: {event}")
            if rollback is not None and rollback.is_set():
                rollback.clear()
                if session.rollback():
                    say("source: rolled back: the guest runs here again, from its state at the pause; "
                        "it can be migrated again")
                else:
                    say(f"source: nothing to roll back (phase {session.phase})")
        if session.done.is_set():
            say("source: destination confirmed every page; releasing the guest")
            if cfg.keep_guest:
                say(f"source: --keep-guest: guest pid {guest.hello.pid} stays paused until this process stops")
                stop.wait()
        elif session.phase == "paused":
            say("source: stopped before the destination confirmed: the guest's memory on this side is dropped")
    finally:
        server.stop(grace=1).wait(2)
        session.close()
        guest.quit()
    return {"phase": session.phase, "migration_id": session.migration_id, **asdict(session.stats), **info}
