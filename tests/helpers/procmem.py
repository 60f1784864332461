"""Independent evidence about a process's memory, straight from /proc.

Nothing here uses migrator code: guest RAM is read through ``/proc/PID/mem``,
located by its self-describing pages and checked page by page through
``/proc/PID/pagemap`` (which shows page frame numbers to root).
"""

from __future__ import annotations

import ctypes
import mmap
import os
from array import array
from dataclasses import dataclass

PM_PRESENT = 1 << 63
PM_SWAPPED = 1 << 62
PM_PFN_MASK = (1 << 55) - 1


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    perms: str
    path: str
    vmflags: frozenset[str]

    @property
    def size(self) -> int:
        return self.end - self.start


def mappings(pid: int) -> list[Mapping]:
    """Every mapping of ``pid`` with its VmFlags (from smaps)."""
    out: list[Mapping] = []
    cur: dict[str, object] | None = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                fields = line.split(None, 5)
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                cur = {"start": lo, "end": hi, "perms": fields[1], "path": fields[5].strip() if len(fields) > 5 else ""}
            elif head == "VmFlags:" and cur is not None:
                out.append(Mapping(vmflags=frozenset(line.split()[1:]), **cur))  # type: ignore[arg-type]
                cur = None
    return out


def find_guest_ram(pid: int, size: int, page_size: int = mmap.PAGESIZE) -> int:
    """Address of guest_sim's RAM of ``size`` bytes in process ``pid``, found by its contents.

    The RAM is one anonymous mapping, but the kernel may merge it with a
    neighbour (a thread stack with the same flags), so its size alone does not
    find it.  Its data pages do: each written page starts with guest_sim's magic
    and its own page index, so a page at address ``a`` holding index ``k`` says
    the RAM starts at ``a - k * page_size``.  The start most pages agree on wins.
    """
    from collections import Counter

    from guest_sim import pages

    magic = pages.MAGIC.to_bytes(4, "little")
    votes: Counter[int] = Counter()
    for m in mappings(pid):
        # anonymous memory, or a source guest's memfd (memfd:guest-ram)
        if m.size < size or not m.perms.startswith("rw") or not (m.path in ("", "[heap]") or "guest-ram" in m.path):
            continue
        data = read_mem(pid, m.start, m.size)
        for off in range(0, m.size, page_size):
            if data[off : off + 4] == magic:
                _magic, _crc, idx, _ver, _kind, _writer = pages.HEADER.unpack_from(data, off)
                start = m.start + off - idx * page_size
                if m.start <= start and start + size <= m.end:
                    votes[start] += 1
    if not votes:
        raise AssertionError(f"no guest RAM of {size} bytes found in pid {pid}")
    (start, n), *rest = votes.most_common(2)
    assert not rest or rest[0][1] * 100 < n, f"ambiguous guest RAM location in pid {pid}: {votes.most_common(3)}"
    return start


def read_mem(pid: int, addr: int, size: int) -> bytes:
    """``size`` bytes of ``pid``'s memory at ``addr``."""
    buf = bytearray(size)
    mv = memoryview(buf)
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    try:
        done = 0
        while done < size:
            n = os.preadv(fd, [mv[done:]], addr + done)
            if n <= 0:
                raise AssertionError(f"short read of /proc/{pid}/mem at {addr + done:#x}")
            done += n
    finally:
        os.close(fd)
    return bytes(buf)


def pagemap(pid: int, addr: int, npages: int, page_size: int = mmap.PAGESIZE) -> array:
    """The 64-bit pagemap entries of ``npages`` pages from ``addr``."""
    want = npages * 8
    raw = bytearray()
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        off = addr // page_size * 8
        while len(raw) < want:
            chunk = os.pread(fd, want - len(raw), off + len(raw))
            if not chunk:
                raise AssertionError(f"short read of /proc/{pid}/pagemap")
            raw += chunk
    finally:
        os.close(fd)
    entries = array("Q")
    entries.frombytes(bytes(raw))
    return entries


def zero_page_pfn() -> int:
    """PFN of the kernel's shared zero page (0 if pagemap hides PFNs from us).

    A read fault on a fresh private anonymous page maps the shared zero page;
    our own pagemap then shows its frame number.
    """
    m = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    anchor = ctypes.c_char.from_buffer(m)
    try:
        addr = ctypes.addressof(anchor)
        assert ctypes.c_char.from_address(addr).value == b"\x00"  # the read fault
        (entry,) = pagemap(os.getpid(), addr, 1)
        return entry & PM_PFN_MASK if entry & PM_PRESENT else 0
    finally:
        del anchor
        m.close()


def mismatching_pages(a: bytes, b: bytes, page_size: int, limit: int = 20) -> tuple[int, list[int]]:
    """(number of differing pages, the first ``limit`` of their indexes)."""
    assert len(a) == len(b)
    if a == b:
        return 0, []
    bad = [i for i in range(len(a) // page_size) if a[i * page_size : (i + 1) * page_size] != b[i * page_size : (i + 1) * page_size]]
    return len(bad), bad[:limit]
