"""Run ``helpers/events_dest.py`` (a destination whose guest changes its own memory
while pages are missing) against a ``migrator source --keep-guest`` and read both
guests' memory afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from helpers import procmem

PS = 4096


class Run:
    """One destination process's result, and the source guest's RAM at the pause (its
    guest stays paused: --keep-guest) to compare with."""

    def __init__(self, dest: subprocess.Popen[str], info: dict[str, Any], nactions: int) -> None:
        self.dest = dest
        line = dest.stdout.readline() if dest.stdout else ""
        if not line:
            dest.kill()
            _, err = dest.communicate(timeout=10)
            raise AssertionError(f"the destination failed (exit {dest.returncode}):\n{err[-6000:]}")
        self.res = json.loads(line)
        self.replies: list[dict[str, Any]] = self.res["replies"]
        self.summary: dict[str, Any] = self.res["summary"]
        self.pid, self.addr = int(self.res["pid"]), int(self.res["addr"])
        self.npages = int(self.res["size"]) // PS
        assert len(self.replies) == nactions, f"only {len(self.replies)} actions ran: {self.res}"[:3000]
        src_pid = int(info["guest_pid"])
        size = self.npages * PS
        self.src = procmem.read_mem(src_pid, procmem.find_guest_ram(src_pid, size, PS), size)

    def src_page(self, p: int) -> bytes:
        return self.src[p * PS : (p + 1) * PS]

    def dst_page(self, p: int, addr: int | None = None) -> bytes:
        return procmem.read_mem(self.pid, addr if addr is not None else self.addr + p * PS, PS)

    def close(self) -> None:
        if self.dest.poll() is None:
            try:
                self.dest.communicate("\n", timeout=30)
            except subprocess.TimeoutExpired:
                self.dest.kill()


def run_dest(info: dict[str, Any], actions: list[dict[str, Any]], opts: dict[str, Any] | None = None,
             wrap: list[str] | None = None) -> Run:  # fmt: skip
    """``opts``: events_dest's OPTS (DestConfig fields, "when"); ``wrap``: a command
    prefix (setpriv, unshare) the destination runs under."""
    env = {**os.environ, "MIGRATOR_SECRET": str(info["secret"]), "PYTHONPATH": str(Path(__file__).parent.parent.parent)}
    cmd = [*(wrap or []), sys.executable, "-m", "tests.helpers.events_dest", str(info["address"]), json.dumps(actions),
           json.dumps(opts or {})]  # fmt: skip
    dest = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        return Run(dest, info, len(actions))
    except BaseException:
        dest.kill()
        raise
