"""A destination whose guest changes its own memory while pages are still missing.

Run as a process of its own (so that a test can run it with fewer privileges:
``setpriv``, ``unshare``)::

    python -m tests.helpers.events_dest SOURCE_ADDRESS ACTIONS_JSON

It migrates the source's guest here with the bulk stream held back
(``--prefetch-delay``), so that the guest runs on an almost empty RAM; at the
first progress report it sends the guest the control commands in ACTIONS (a
JSON list of {"cmd": ..., args...}: guest_sim's discard, map-over, remap,
read-page, syscall-read, fork-read), each reply recorded; also {"cmd":
"present", "pages": [...]} (the destination guest's pagemap: are they mapped
now?).  Then it waits for the migration to end, lets the guest verify every
page, and prints one JSON object: the replies, the summary, the guest's pid and
its RAM's address, and the addresses of pages the guest moved.  The guest is
left running (paused) until this process reads a line from stdin, so that the
test can read its memory through /proc/PID/mem.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from typing import Any

from migrator.config import DestConfig
from migrator.dest.session import DestinationSession, Progress
from migrator.report import build_summary

PREFETCH_DELAY_S = 3.0


def present(pid: int, addr: int, page_size: int, pages: list[int]) -> list[bool]:
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        out = []
        for p in pages:
            f.seek((addr // page_size + p) * 8)
            out.append(bool(int.from_bytes(f.read(8), "little") >> 63))
        return out


def main() -> int:
    address, actions = sys.argv[1], json.loads(sys.argv[2])
    session = DestinationSession(DestConfig(source=address, progress=False, prefetch_delay=PREFETCH_DELAY_S,
                                            write_ratio=0.0, run_for=0))  # fmt: skip
    replies: list[dict[str, Any]] = []

    def on_progress(_p: Progress) -> None:
        if replies or session.guest is None:
            return
        h = session.guest.hello
        for a in actions:
            a = dict(a)
            cmd = a.pop("cmd")
            if cmd == "present":
                replies.append({"present": present(h.pid, h.addr, h.page_size, a["pages"])})
            else:
                replies.append(session.guest.call(cmd, timeout=30, **a))

    try:
        out = session.migrate(on_progress)
        session.finish(out, keep_running=True)
        summary = build_summary(out)
        h = out.guest.hello
        print(json.dumps({"replies": replies, "summary": asdict(summary), "pid": h.pid, "addr": h.addr,
                          "page_size": h.page_size, "size": h.size}), flush=True)  # fmt: skip
        out.guest.call("pause")
        sys.stdin.readline()
        out.guest.quit()
    finally:
        session.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
