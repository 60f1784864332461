"""A real ``migrator source`` (its own process, ``--keep-guest``: its guest stays paused
after the migration, a reference to compare with) migrated to a destination run
through the library in the test's process; everything cleaned up after."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from helpers import procs
from migrator.config import DestConfig
from migrator.dest.session import DestinationSession, Outcome


@contextlib.contextmanager
def migrated(tmp: Path, ram: str, cfg_kw: Mapping[str, object], *source_args: str,
             warmup_s: float = 0.5) -> Iterator[tuple[procs.Cmd, dict[str, object], DestinationSession, Outcome]]:  # fmt: skip
    """Yields (source command, its ready info, the session, its outcome) once
    ``migrate()`` returned; ``warmup_s``: the guest runs on the source first."""
    with procs.running_source(tmp, ram, "--keep-guest", *source_args) as (src, info):
        time.sleep(warmup_s)
        assert src.proc.poll() is None, f"the source exited early:\n{src.stderr()}"
        session = DestinationSession(DestConfig(source=str(info["address"]), progress=False, **cfg_kw))  # type: ignore[arg-type]
        out: Outcome | None = None
        try:
            out = session.migrate()
            yield src, info, session, out
        finally:
            session.close()
            if out is not None:
                out.guest.close()  # idempotent; finish() may not have run
