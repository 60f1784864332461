"""A destination whose guest changes its own memory while pages are still missing.

Run as a process of its own (so that a test can run it with fewer privileges:
``setpriv``, ``unshare``)::

    python -m tests.helpers.events_dest SOURCE_ADDRESS ACTIONS_JSON [OPTS_JSON]

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

OPTS: DestConfig fields (prefetch_delay, fault_threads, lanes, ...) and
``"when"``: "first" (the default: the actions run at the first progress
report, the session waiting) or "thread" (from a thread of their own while the
session keeps polling; the output then says how many ran before the end).
"""

from __future__ import annotations

import json
import sys
import threading
import time
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
    opts = {"prefetch_delay": PREFETCH_DELAY_S, **(json.loads(sys.argv[3]) if len(sys.argv) > 3 else {})}
    when = opts.pop("when", "first")
    session = DestinationSession(DestConfig(source=address, progress=False, run_for=0,
                                            write_ratio=opts.pop("write_ratio", 0.0), **opts))  # fmt: skip
    replies: list[dict[str, Any]] = []
    started: list[bool] = []
    threads: list[threading.Thread] = []
    t_actions: list[float] = []
    lock = threading.Lock()

    def run_actions() -> None:
        h = session.guest.hello  # type: ignore[union-attr]
        t0 = time.monotonic()
        for a in actions:
            a = dict(a)
            cmd = a.pop("cmd")
            if cmd == "present":
                replies.append({"present": present(h.pid, h.addr, h.page_size, a["pages"])})
            elif cmd == "sleep":
                time.sleep(float(a["s"]))
                replies.append({"ok": True})
            else:
                with lock:
                    replies.append(session.guest.call(cmd, timeout=60, **a))  # type: ignore[union-attr]
        t_actions.append(time.monotonic() - t0)

    def on_progress(_p: Progress) -> None:
        if started or session.guest is None:
            return
        started.append(True)
        if when == "thread":
            threads.append(threading.Thread(target=run_actions, daemon=True))
            threads[0].start()
        else:
            run_actions()

    try:
        out = session.migrate(on_progress)
        done_before_end = len(replies)  # actions done while pages were still missing
        for t in threads:
            t.join()
        session.finish(out, keep_running=True)
        summary = build_summary(out)
        h = out.guest.hello
        print(json.dumps({"replies": replies, "summary": asdict(summary), "pid": h.pid, "addr": h.addr,
                          "page_size": h.page_size, "size": h.size, "actions_s": t_actions,
                          "actions_done_before_end": done_before_end}), flush=True)  # fmt: skip
        out.guest.call("pause")
        sys.stdin.readline()
        out.guest.quit()
    finally:
        session.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
