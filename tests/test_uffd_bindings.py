"""migrator.uffd.fd against a real userfaultfd, with the faulting RAM in a child process.

The child (tests/uffd_child.py) owns the memory and creates the uffd; this test
process is the handler: it does UFFDIO_API/REGISTER on the received fd, reads
faults and resolves them.  Every result is checked against independent
evidence: the bytes the child reads and /proc/<child>/pagemap, never the
migrator's own counters.  Every wait has a deadline and the child is killed in
teardown, so a broken binding fails instead of hanging.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import pathlib
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from migrator.errors import PageExists, RetryLater, UffdError
from migrator.uffd import abi
from migrator.uffd.fd import Fault, Userfaultfd

CHILD = pathlib.Path(__file__).with_name("uffd_child.py")
NPAGES = 64
TIMEOUT = 5.0
PAGEMAP_PRESENT = 1 << 63


class ChildGuest:
    """Handler-side view of one child: its RAM, its uffd, its command socket."""

    def __init__(self, features: int) -> None:
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock = parent_sock
        self._buf = b""
        self.uffd: Userfaultfd | None = None
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD), str(child_sock.fileno()), str(NPAGES)],
            pass_fds=[child_sock.fileno()],
        )
        child_sock.close()
        try:
            self.sock.settimeout(TIMEOUT)
            msg, fds, _flags, _addr = socket.recv_fds(self.sock, 4096, 1)
            assert len(fds) == 1, f"child sent no uffd (msg={msg!r})"
            self._buf = msg
            hello = self._line()
            self.addr: int = hello["addr"]
            self.size: int = hello["size"]
            self.ps: int = hello["page_size"]
            self.pid: int = hello["pid"]
            self.uffd = Userfaultfd(fds[0])
            self.features = self.uffd.api(features)
            self.uffd.register(self.addr, self.size)
        except BaseException:
            self.close()
            raise

    # -- the child's side ------------------------------------------------------
    def _line(self) -> dict:
        deadline = time.monotonic() + TIMEOUT
        while b"\n" not in self._buf:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError(f"child exited (rc={self.proc.poll()})")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def send(self, **cmd: object) -> None:
        self.sock.sendall(json.dumps(cmd).encode() + b"\n")

    def reply(self) -> dict:
        """The child's answer to the last command, within the deadline."""
        return self._line()

    def no_reply_within(self, seconds: float) -> bool:
        r, _, _ = select.select([self.sock], [], [], seconds)
        return not r and b"\n" not in self._buf

    # -- the handler's side ----------------------------------------------------
    def page_addr(self, page: int) -> int:
        return self.addr + page * self.ps

    def wait_faults(self, timeout: float = TIMEOUT) -> list[Fault]:
        assert self.uffd is not None
        poller = select.poll()
        poller.register(self.uffd.fd, select.POLLIN)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("no fault arrived within the deadline")
            if poller.poll(left * 1000):
                faults = self.uffd.read_faults()
                if faults:
                    return faults

    def no_fault_within(self, seconds: float) -> bool:
        assert self.uffd is not None
        poller = select.poll()
        poller.register(self.uffd.fd, select.POLLIN)
        return not poller.poll(seconds * 1000)

    def present(self, page: int) -> bool:
        """Bit 63 of the page's entry in /proc/<child>/pagemap (independent of migrator)."""
        with open(f"/proc/{self.pid}/pagemap", "rb") as f:
            f.seek(self.page_addr(page) // self.ps * 8)
            (entry,) = struct.unpack("<Q", f.read(8))
        return bool(entry & PAGEMAP_PRESENT)

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(timeout=TIMEOUT)
        finally:
            if self.uffd is not None:
                self.uffd.close()
            self.sock.close()


@pytest.fixture
def spawn_child_guest(userfaultfd_required: None) -> Iterator[Callable[..., ChildGuest]]:
    """Factory: spawn_child_guest(features=...) -> a registered ChildGuest; killed at teardown."""
    children: list[ChildGuest] = []

    def spawn(features: int = abi.UFFD_FEATURE_THREAD_ID) -> ChildGuest:
        child = ChildGuest(features)
        children.append(child)
        return child

    yield spawn
    for child in children:
        child.close()


@pytest.fixture
def guest(spawn_child_guest: Callable[..., ChildGuest]) -> ChildGuest:
    return spawn_child_guest()


def pattern(page: int, ps: int, salt: int = 0) -> bytes:
    """Distinct, recognisable contents for one page."""
    seed = hashlib.sha256(f"{page}:{salt}".encode()).digest()
    return (seed * (ps // len(seed) + 1))[:ps]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class SrcBuffer:
    """Source pages at a stable address for UFFDIO_COPY."""

    def __init__(self, data: bytes) -> None:
        self.buf = ctypes.create_string_buffer(data, len(data))
        self.addr = ctypes.addressof(self.buf)


# -- faults -------------------------------------------------------------------------


def test_read_fault_has_address_and_no_write_flag(guest: ChildGuest) -> None:
    assert guest.uffd is not None
    guest.send(op="read", page=3, count=1)
    faults = guest.wait_faults()
    assert len(faults) == 1
    assert faults[0].address == guest.page_addr(3)
    assert faults[0].write is False
    data = pattern(3, guest.ps)
    src = SrcBuffer(data)
    guest.uffd.copy_page(guest.page_addr(3), src.addr, guest.ps)
    assert guest.reply()["sha256"] == [sha(data)]


def test_write_fault_sets_write_flag(guest: ChildGuest) -> None:
    assert guest.uffd is not None
    guest.send(op="write", page=5, offset=100, byte=0x41)
    faults = guest.wait_faults()
    assert len(faults) == 1
    # without UFFD_FEATURE_EXACT_ADDRESS the kernel reports the page's address
    assert faults[0].address == guest.page_addr(5)
    assert faults[0].write is True
    src = SrcBuffer(bytes(guest.ps))
    guest.uffd.copy_page(guest.page_addr(5), src.addr, guest.ps)
    guest.reply()
    guest.send(op="read", page=5, count=1)
    expected = bytearray(guest.ps)
    expected[100] = 0x41
    assert guest.reply()["sha256"] == [sha(bytes(expected))]


def test_read_faults_is_empty_when_nothing_is_pending(guest: ChildGuest) -> None:
    assert guest.uffd is not None
    assert guest.uffd.read_faults() == []


def test_ptid_is_the_faulting_thread(guest: ChildGuest) -> None:
    assert guest.uffd is not None
    assert guest.features & abi.UFFD_FEATURE_THREAD_ID
    guest.send(op="read", page=7, count=1)
    (fault,) = guest.wait_faults()
    guest.uffd.zeropage(guest.page_addr(7), guest.ps)
    tid = guest.reply()["tid"]
    assert fault.ptid == tid
    assert tid != guest.pid  # a vCPU thread, not the child's main thread


def test_ptid_is_zero_without_thread_id_feature(spawn_child_guest: Callable[..., ChildGuest]) -> None:
    guest = spawn_child_guest(features=0)
    assert guest.uffd is not None
    guest.send(op="read", page=2, count=1)
    (fault,) = guest.wait_faults()
    guest.uffd.zeropage(guest.page_addr(2), guest.ps)
    guest.reply()
    assert fault.ptid == 0


def test_api_reports_only_the_features_enabled(spawn_child_guest: Callable[..., ChildGuest]) -> None:
    guest = spawn_child_guest(features=0)
    assert guest.features == 0


# -- UFFDIO_COPY ------------------------------------------------------------------


def test_copy_run_installs_exactly_those_bytes(guest: ChildGuest) -> None:
    assert guest.uffd is not None
    ps = guest.ps
    data = b"".join(pattern(p, ps) for p in range(8, 12))
    src = SrcBuffer(data)
    assert not any(guest.present(p) for p in range(7, 13))
    assert guest.uffd.copy(guest.page_addr(8), src.addr, 4 * ps) == 4 * ps
    # pagemap: exactly the run is present, its neighbours are not
    assert [guest.present(p) for p in range(7, 13)] == [False, True, True, True, True, False]
    guest.send(op="read", page=8, count=4)
    assert guest.reply()["sha256"] == [sha(pattern(p, ps)) for p in range(8, 12)]
    assert guest.no_fault_within(0.05)


def test_copy_run_resolves_a_fault_and_wakes_the_thread(guest: ChildGuest) -> None:
    assert guest.uffd is not None
    ps = guest.ps
    guest.send(op="read", page=16, count=4)
    (fault,) = guest.wait_faults()
    assert fault.address == guest.page_addr(16)
    data = b"".join(pattern(p, ps, salt=1) for p in range(16, 20))
    src = SrcBuffer(data)
    assert guest.uffd.copy(guest.page_addr(16), src.addr, 4 * ps) == 4 * ps
    assert guest.reply()["sha256"] == [sha(pattern(p, ps, salt=1)) for p in range(16, 20)]
    assert guest.no_fault_within(0.05)  # the other three pages never faulted
    assert all(guest.present(p) for p in range(16, 20))


def test_copy_page_dontwake_then_wake(guest: ChildGuest) -> None:
    assert guest.uffd is not None
    guest.send(op="read", page=9, count=1)
    guest.wait_faults()
    data = pattern(9, guest.ps)
    src = SrcBuffer(data)
    guest.uffd.copy_page(guest.page_addr(9), src.addr, guest.ps, wake=False)
    assert guest.present(9)
    assert guest.no_reply_within(0.2), "UFFDIO_COPY_MODE_DONTWAKE woke the thread"
    guest.uffd.wake(guest.page_addr(9), guest.ps)
    assert guest.reply()["sha256"] == [sha(data)]


# -- UFFDIO_ZEROPAGE --------------------------------------------------------------


def test_zeropage_yields_zeros(guest: ChildGuest) -> None:
    assert guest.uffd is not None
    ps = guest.ps
    assert guest.uffd.zeropage(guest.page_addr(20), 2 * ps) == 2 * ps
    assert guest.present(20) and guest.present(21) and not guest.present(22)
    guest.send(op="read", page=20, count=2)
    assert guest.reply()["sha256"] == [sha(bytes(ps))] * 2
    assert guest.no_fault_within(0.05)


def test_zeropage_resolves_fault_and_later_write_is_not_a_uffd_fault(guest: ChildGuest) -> None:
    assert guest.uffd is not None
    ps = guest.ps
    guest.send(op="read", page=24, count=1)
    (fault,) = guest.wait_faults()
    assert fault.address == guest.page_addr(24) and not fault.write
    guest.uffd.zeropage(guest.page_addr(24), ps)
    assert guest.reply()["sha256"] == [sha(bytes(ps))]
    # writing the shared zero page is a copy-on-write handled by the kernel alone
    guest.send(op="write", page=24, offset=0, byte=0x7F)
    guest.reply()
    assert guest.no_fault_within(0.05)


# -- races: EEXIST ------------------------------------------------------------------


def test_copy_page_into_present_page_raises_page_exists(guest: ChildGuest) -> None:
    assert guest.uffd is not None
    ps = guest.ps
    first, second = SrcBuffer(pattern(30, ps)), SrcBuffer(pattern(30, ps, salt=9))
    guest.uffd.copy_page(guest.page_addr(30), first.addr, ps)
    with pytest.raises(PageExists) as info:
        guest.uffd.copy_page(guest.page_addr(30), second.addr, ps)
    assert info.value.errno == errno.EEXIST
    assert "EEXIST" in str(info.value)
    guest.send(op="read", page=30, count=1)
    assert guest.reply()["sha256"] == [sha(pattern(30, ps))]  # the first copy stays


def test_copy_run_starting_at_present_page_raises_page_exists_with_nothing_copied(guest: ChildGuest) -> None:
    assert guest.uffd is not None
    ps = guest.ps
    guest.uffd.zeropage(guest.page_addr(32), ps)
    src = SrcBuffer(b"".join(pattern(p, ps) for p in range(32, 35)))
    with pytest.raises(PageExists) as info:
        guest.uffd.copy(guest.page_addr(32), src.addr, 3 * ps)
    assert info.value.copied == 0  # type: ignore[attr-defined]
    assert not guest.present(33) and not guest.present(34)


def test_copy_run_over_present_middle_page_reports_bytes_copied_before_it(guest: ChildGuest) -> None:
    """A run that meets an existing page stops there and reports what it copied.

    The kernel (mm/userfaultfd.c: mfill_atomic returns the partial count, and
    userfaultfd_copy turns a short copy into -EAGAIN) fails such an ioctl with
    EAGAIN, not EEXIST, and writes the bytes copied into ``uffdio_copy.copy``.
    So the binding raises RetryLater with ``copied`` = the bytes before the
    present page; retrying from there then raises PageExists with nothing
    copied.  The installer relies on exactly this sequence.
    """
    assert guest.uffd is not None
    ps = guest.ps
    old = SrcBuffer(pattern(42, ps, salt=7))
    guest.uffd.copy_page(guest.page_addr(42), old.addr, ps)
    new = b"".join(pattern(p, ps) for p in range(40, 45))
    src = SrcBuffer(new)
    with pytest.raises(RetryLater) as info:
        guest.uffd.copy(guest.page_addr(40), src.addr, 5 * ps)
    assert info.value.errno == errno.EAGAIN
    assert info.value.copied == 2 * ps  # type: ignore[attr-defined]
    assert info.value.fields["copied"] == 2 * ps
    assert [guest.present(p) for p in range(40, 45)] == [True, True, True, False, False]
    with pytest.raises(PageExists) as again:
        guest.uffd.copy(guest.page_addr(42), src.addr + 2 * ps, 3 * ps)
    assert again.value.copied == 0  # type: ignore[attr-defined]
    guest.send(op="read", page=40, count=3)
    expected = [sha(pattern(40, ps)), sha(pattern(41, ps)), sha(pattern(42, ps, salt=7))]
    assert guest.reply()["sha256"] == expected


def test_zeropage_over_present_page_raises_page_exists(guest: ChildGuest) -> None:
    assert guest.uffd is not None
    ps = guest.ps
    src = SrcBuffer(pattern(46, ps))
    guest.uffd.copy_page(guest.page_addr(46), src.addr, ps)
    with pytest.raises(PageExists) as info:
        guest.uffd.zeropage(guest.page_addr(46), ps)
    assert info.value.copied == 0  # type: ignore[attr-defined]
    guest.send(op="read", page=46, count=1)
    assert guest.reply()["sha256"] == [sha(pattern(46, ps))]


# -- UFFDIO_WAKE / UNREGISTER / misuse -----------------------------------------------


def test_wake_on_present_page_is_harmless(guest: ChildGuest) -> None:
    assert guest.uffd is not None
    ps = guest.ps
    src = SrcBuffer(pattern(50, ps))
    guest.uffd.copy_page(guest.page_addr(50), src.addr, ps)
    guest.uffd.wake(guest.page_addr(50), ps)
    guest.uffd.wake(guest.page_addr(50), 4 * ps)  # includes missing pages nobody waits on
    assert guest.no_fault_within(0.05)
    guest.send(op="read", page=50, count=1)
    assert guest.reply()["sha256"] == [sha(pattern(50, ps))]
    assert not guest.present(51)


def test_unregister_leaves_missing_pages_to_the_kernel(guest: ChildGuest) -> None:
    assert guest.uffd is not None
    guest.uffd.unregister(guest.addr, guest.size)
    guest.send(op="read", page=60, count=1)
    assert guest.reply()["sha256"] == [sha(bytes(guest.ps))]
    assert guest.no_fault_within(0.05)


def test_copy_outside_registered_range_is_a_plain_uffd_error(guest: ChildGuest) -> None:
    assert guest.uffd is not None
    ps = guest.ps
    src = SrcBuffer(bytes(ps))
    with pytest.raises(UffdError) as info:
        guest.uffd.copy_page(guest.addr + guest.size + 1024 * ps, src.addr, ps)
    assert not isinstance(info.value, (PageExists, RetryLater))
    assert info.value.errno != 0


def test_received_fd_is_nonblocking_and_closes_once(guest: ChildGuest) -> None:
    assert guest.uffd is not None
    assert os.get_blocking(guest.uffd.fd) is False
    fd = guest.uffd.fd
    guest.uffd.close()
    guest.uffd.close()  # idempotent
    with pytest.raises(OSError):
        os.fstat(fd)
    guest.uffd = None


# -- the installer on a real uffd ------------------------------------------------------


def _installer_for(guest: ChildGuest):  # type: ignore[no-untyped-def]
    from migrator.dest.install import Installer
    from migrator.dest.pagestate import PageState

    assert guest.uffd is not None
    ps = PageState.create(NPAGES)
    return Installer(guest.uffd, ps, guest.addr, guest.ps, ps.counters(0))


def _batch(inst, first: int, flags: bytes, data: bytes):  # type: ignore[no-untyped-def]
    """A serialized batch of these pages, validated by the installer (as the lanes do)."""
    import xxhash

    from migrator.wire import migration_pb2 as pb

    b = pb.PageBatch(epoch=1, first_page=first, count=len(flags), flags=flags, data=data, raw_size=len(data),
                     xxh3=xxhash.xxh3_64_intdigest(data) if data else 0)  # fmt: skip
    return inst.decode(b.SerializeToString(), 1)


def test_installer_installs_a_mixed_batch_exactly(guest: ChildGuest) -> None:
    from migrator.pagemaps import FLAG_DATA, FLAG_OMITTED, FLAG_ZERO

    inst = _installer_for(guest)
    ps = guest.ps
    flags = bytes([FLAG_DATA, FLAG_DATA, FLAG_ZERO, FLAG_OMITTED, FLAG_DATA, FLAG_ZERO, FLAG_ZERO])
    first = 10
    data = b"".join(pattern(first + i, ps) for i, f in enumerate(flags) if f == FLAG_DATA)
    assert inst.install(_batch(inst, first, flags, data), "bulk") == 6
    assert [guest.present(first + i) for i in range(len(flags))] == [f != FLAG_OMITTED for f in flags]
    guest.send(op="read", page=first, count=3)
    assert guest.reply()["sha256"] == [sha(pattern(10, ps)), sha(pattern(11, ps)), sha(bytes(ps))]
    guest.send(op="read", page=first + 4, count=3)
    assert guest.reply()["sha256"] == [sha(pattern(14, ps)), sha(bytes(ps)), sha(bytes(ps))]
    assert inst.c.get("data_pages") == 3 and inst.c.get("zero_pages") == 3 and inst.c.get("installed") == 6
    # the same batch again: every page is a duplicate, nothing reaches the kernel
    assert inst.install(_batch(inst, first, flags, data), "demand") == 0
    assert inst.c.get("duplicates") == 6
    assert inst.c.get("kernel_eexist") == 0


def test_installer_skips_a_page_the_kernel_already_has(guest: ChildGuest) -> None:
    """A page another process mapped first (EEXIST mid-run) is skipped; the rest of the run lands."""
    from migrator.pagemaps import FLAG_DATA

    inst = _installer_for(guest)
    ps = guest.ps
    squatter = SrcBuffer(pattern(22, ps, salt=3))
    assert guest.uffd is not None
    guest.uffd.copy_page(guest.page_addr(22), squatter.addr, ps)
    flags = bytes([FLAG_DATA] * 5)
    data = b"".join(pattern(p, ps) for p in range(20, 25))
    assert inst.install(_batch(inst, 20, flags, data), "bulk") == 4  # the kernel took four; one was there
    assert all(guest.present(p) for p in range(20, 25))
    guest.send(op="read", page=20, count=5)
    expected = [sha(pattern(p, ps)) for p in (20, 21)] + [sha(pattern(22, ps, salt=3))]
    expected += [sha(pattern(p, ps)) for p in (23, 24)]
    assert guest.reply()["sha256"] == expected
    assert inst.c.get("kernel_eexist") == 1 and inst.c.get("duplicates") == 1
    assert all(inst.ps.state[p] == 3 for p in range(20, 25))


@pytest.mark.parametrize("write", [False, True])
def test_install_zero_resolves_a_fault(guest: ChildGuest, write: bool) -> None:
    inst = _installer_for(guest)
    page = 33
    if write:
        guest.send(op="write", page=page, offset=8, byte=0x11)
    else:
        guest.send(op="read", page=page, count=1)
    (fault,) = guest.wait_faults()
    assert fault.write is write
    assert inst.install_zero(page, fault.write)
    reply = guest.reply()
    assert reply["tid"] == fault.ptid
    assert inst.c.get("zero_local") == 1
    assert inst.ps.state[page] == 3 and inst.ps.installed_at(page) > 0
    assert guest.present(page)
    guest.send(op="read", page=page, count=1)
    expected = bytearray(guest.ps)
    if write:
        expected[8] = 0x11
    assert guest.reply()["sha256"] == [sha(bytes(expected))]
