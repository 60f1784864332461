"""The destination validates what it receives: a source that lies is refused,
loudly, within a deadline, and nothing it sent is installed."""

from __future__ import annotations

import os

import pytest

from tests.conftest import require_userfaultfd
from tests.helpers import evil_source, procs

CASES = {
    "page-size": "manifest does not match the guest",
    "bad-crc": "failed its checksum",
    "unasked": "not asked for",
    "truncated": "truncated or oversized",
    "oversized": "truncated or oversized",
    "bad-zstd": "cannot decompress",
    "zero-map-bomb": "bad zero map",  # a frame declaring 1 TiB: refused before allocating
    "zero-map-big": "bad zero map",
}


@pytest.mark.parametrize("mode", sorted(CASES))
def test_lying_source_is_refused(mode: str) -> None:
    require_userfaultfd()
    server, address = evil_source.start(mode, 16 << 20, os.environ["MIGRATOR_SECRET"])
    try:
        extra = ["--reconnect-deadline", "2"]
        r = procs.run([*procs.MIGRATOR, "dest", "--source", address, "--run-for", "0", "--quiet", *extra], timeout=60)
    finally:
        server.stop(0)
    assert r.returncode == 6, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in r.stderr and lines[-1].startswith("migrator: error:"), r.stderr
    assert CASES[mode] in lines[-1], lines[-1]
