"""CPU priorities on the destination: the fault path ahead, the guest behind while it waits.

On a small machine the guest's runnable vCPUs compete with the migration
pipeline for the same cores; every millisecond they take delays the pages
they are about to wait for.  Only done where it can be undone (CAP_SYS_NICE):
raising a priority back needs it.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("migrator.dest")


def deprioritize(pid: int, nice: int) -> bool:
    """Lower the guest's CPU priority while it is mostly waiting for pages.

    On a small machine the guest's runnable vCPUs compete with the migration
    pipeline for the same cores; every millisecond they take delays the pages
    they are about to wait for.  Only done where it can be undone
    (CAP_SYS_NICE): raising a priority back needs it.
    """
    if nice <= 0 or not has_cap_sys_nice():
        return False
    try:
        os.setpriority(os.PRIO_PROCESS, pid, nice)
    except OSError:
        return False
    return True


def restore_priority(pid: int, tids: list[int]) -> None:
    for tid in [pid, *tids]:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, 0)
        except OSError as exc:
            log.warning("cannot restore the priority of guest thread %d: %s", tid, exc.strerror)


def has_cap_sys_nice() -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> 23 & 1)  # CAP_SYS_NICE = 23
    except OSError:
        pass
    return False
