"""Workload policy: which page a vCPU touches next.  Pure functions.

A vCPU owns the data pages ``first + vcpu + k * nvcpus``; it reads and writes
only those, so vCPUs never race on one page and the version table stays exact.
The random generator is xorshift64: its whole state is one integer, so the vCPU
state that migrates is a few numbers.
"""

from __future__ import annotations

MASK64 = (1 << 64) - 1
WORKLOADS = ("random", "sequential", "hotset", "hotscatter")


def xorshift64(s: int) -> int:
    s ^= (s << 13) & MASK64
    s ^= s >> 7
    s ^= (s << 17) & MASK64
    return s


def owned_count(first: int, npages: int, vcpu: int, nvcpus: int) -> int:
    n = npages - first - vcpu
    return 0 if n <= 0 else (n + nvcpus - 1) // nvcpus


def next_slot(kind: str, rng: int, cursor: int, owned: int) -> tuple[int, int]:
    """Return (slot, new_cursor): slot k means the vCPU's k-th owned page."""
    if kind == "sequential":
        return cursor % owned, (cursor + 1) % owned
    if kind == "hotset":
        hot = max(1, owned // 10)
        if rng % 10:  # 90 % of accesses go to the hot tenth
            return (rng >> 8) % hot, cursor
        return (rng >> 8) % owned, cursor
    if kind == "hotscatter":  # the same, but the hot tenth is every tenth page: spread over all RAM
        hot = max(1, owned // 10)
        if rng % 10:
            return ((rng >> 8) % hot) * 10 % owned, cursor
        return (rng >> 8) % owned, cursor
    return (rng >> 8) % owned, cursor


def slot_to_page(slot: int, first: int, vcpu: int, nvcpus: int) -> int:
    return first + vcpu + slot * nvcpus
