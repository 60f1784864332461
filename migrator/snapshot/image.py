"""A RAM image on disk: what `migrator snapshot` writes and `migrator restore` reads.

Layout of an image folder (QEMU's mapped-ram idea, CRIU's pages-N.img idea:
a page's place in the file is its place in guest RAM)::

    manifest.json  format, version, id, RAM and page size, counts, and the
                   XXH3-64 of the two files below (so neither can be swapped)
    ram.img        guest RAM at its own offsets, sparse: a page that was never
                   touched or is all zero is a hole (never written, never read)
    pages.xxh3     one little-endian u64 per page: XXH3-64 of the page's bytes
                   (a hole's is the zero page's)
    vcpu.json      the guest's vCPU state (guest_sim's JSON); absent for a raw
                   memory file imported with ``--raw``

Holes are found with ``lseek(SEEK_DATA/SEEK_HOLE)``, a few syscalls per
extent, never by reading.  :func:`open_image` checks everything that can be
checked without reading RAM (files present, sizes, the manifest's hashes, a
hole only where the page's checksum is the zero page's) and raises
:class:`~migrator.errors.ImageError` with one line naming what is wrong; the
page data itself is checked page by page as it is read (:class:`CheckedReader`),
or all at once with :func:`verify_pages`.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from array import array
from dataclasses import dataclass
from typing import Any

import xxhash

from migrator.errors import ImageError

FORMAT, VERSION = "migrator-image", 1
MANIFEST, RAM, SUMS, VCPU = "manifest.json", "ram.img", "pages.xxh3", "vcpu.json"
SEEK_DATA, SEEK_HOLE = getattr(os, "SEEK_DATA", 3), getattr(os, "SEEK_HOLE", 4)
READ_CHUNK = 256  # pages per read when checking a whole image


def page_hash(page: bytes | bytearray | memoryview) -> int:
    return xxhash.xxh3_64_intdigest(page)


def zero_hash(page_size: int) -> int:
    return page_hash(bytes(page_size))


@dataclass(frozen=True)
class Image:
    """An opened, structurally checked image.

    ``holes``: one byte per page, 1 = a hole (zero, never read); ``sums``: the
    XXH3-64 of every page; ``vcpu_state``: guest_sim's state, or None (raw).
    """

    path: str
    manifest: dict[str, Any]
    ram_path: str
    page_size: int
    npages: int
    holes: bytes
    sums: array  # array("Q")
    vcpu_state: dict[str, Any] | None

    @property
    def ram_size(self) -> int:
        return self.npages * self.page_size

    @property
    def id(self) -> str:
        return str(self.manifest["id"])

    @property
    def data_pages(self) -> int:
        return self.npages - self.holes.count(1)


def holes_map(fd: int, npages: int, page_size: int) -> bytes:
    """One byte per page, 1 = entirely inside a hole of the file (SEEK_DATA/SEEK_HOLE)."""
    size = npages * page_size
    out = bytearray(b"\x01" * npages)
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            break
        if data >= size:
            break
        hole = min(os.lseek(fd, data, SEEK_HOLE), size)
        first, end = data // page_size, (hole + page_size - 1) // page_size
        out[first:end] = bytes(end - first)
        pos = hole
    return bytes(out)


def open_sized(path: str, what: str) -> tuple[int, int]:
    """(read-only descriptor, size in bytes) of ``path``; raises ImageError naming ``what``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ImageError(f"cannot open {what}: {exc.strerror}", path=path) from None
    return fd, os.fstat(fd).st_size


def _read_json(path: str, what: str) -> Any:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ImageError(f"not an image: {what} is missing", path=path) from None
    except OSError as exc:
        raise ImageError(f"cannot read {what}: {exc.strerror}", path=path) from None
    try:
        return json.loads(raw), raw
    except ValueError:
        raise ImageError(f"corrupt image: {what} is not valid JSON", path=path) from None


def open_image(path: str) -> Image:
    """Open the image folder ``path`` and check its structure (no RAM is read).

    Raises ImageError: a file missing, the wrong format or version, a file
    shorter or longer than the manifest says (truncated), a file whose hash
    is not the manifest's (corrupt), a hole where a page has data.
    """
    (m, _raw) = _read_json(os.path.join(path, MANIFEST), MANIFEST)
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ImageError(f"not a migrator image: {MANIFEST} has no format {FORMAT!r}", path=path)
    if m.get("version") != VERSION:
        raise ImageError(f"image format version {m.get('version')} not supported (this migrator reads {VERSION})")
    try:
        page_size, npages = int(m["page_size"]), int(m["npages"])
        ram_size, sums_hash = int(m["ram_size"]), int(m["pages_xxh3"], 16)
        str(m["id"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ImageError(f"corrupt image: {MANIFEST} lacks a valid {exc}") from None
    if page_size < 512 or page_size & (page_size - 1) or npages <= 0 or ram_size != npages * page_size:
        raise ImageError("corrupt image: inconsistent sizes in the manifest", page_size=page_size, npages=npages, ram_size=ram_size)
    ram_name = str(m.get("ram", RAM))
    if os.path.basename(ram_name) != ram_name or ram_name in ("", ".", ".."):
        raise ImageError("corrupt image: the manifest's RAM file must be a file of the image folder", ram=ram_name)
    ram_path = os.path.join(path, ram_name)
    fd, size = open_sized(ram_path, "the image's RAM file")
    try:
        if size != ram_size:
            what = "truncated" if size < ram_size else "longer than its manifest"
            raise ImageError(f"{what} image: {RAM} has {size} bytes, the manifest says {ram_size}", path=ram_path)
        holes = holes_map(fd, npages, page_size)
    finally:
        os.close(fd)
    sums = _read_sums(os.path.join(path, SUMS), npages, sums_hash)
    zh = array("Q", [zero_hash(page_size)]).tobytes()
    raw_sums = sums.tobytes()
    i = holes.find(1)
    while i >= 0:  # every hole's page must be the zero page
        j = holes.find(0, i)
        j = npages if j < 0 else j
        if raw_sums[i * 8 : j * 8] != zh * (j - i):
            bad = next(k for k in range(i, j) if raw_sums[k * 8 : k * 8 + 8] != zh)
            raise ImageError("corrupt image: a page with data is a hole in ram.img (truncated and re-extended?)", page=bad)
        i = holes.find(1, j)
    vcpu = None
    if m.get("vcpu_xxh3"):
        state, raw = _read_json(os.path.join(path, VCPU), VCPU)
        if f"{xxhash.xxh3_64_intdigest(raw):016x}" != m["vcpu_xxh3"]:
            raise ImageError(f"corrupt image: {VCPU} does not match its hash in the manifest")
        vcpu = state
    return Image(path, m, ram_path, page_size, npages, holes, sums, vcpu)


def _read_sums(path: str, npages: int, want: int) -> array:
    try:
        with open(path, "rb") as f:
            raw = f.read(npages * 8 + 1)
    except FileNotFoundError:
        raise ImageError(f"not an image: {SUMS} is missing", path=path) from None
    if len(raw) != npages * 8:
        what = "truncated" if len(raw) < npages * 8 else "longer than its manifest"
        raise ImageError(f"{what} image: {SUMS} has {len(raw)} bytes, {npages * 8} expected", path=path)
    if xxhash.xxh3_64_intdigest(raw) != want:
        raise ImageError(f"corrupt image: {SUMS} does not match its hash in the manifest", path=path)
    sums = array("Q")
    sums.frombytes(raw)
    return sums


class CheckedReader:
    """Pages of an image, each checked against its XXH3-64 as it is read (a PageReader).

    Raises ImageError naming the first page that does not match.
    """

    def __init__(self, image: Image) -> None:
        self.image = image
        self.page_size = image.page_size
        self.fd = os.open(image.ram_path, os.O_RDONLY | os.O_CLOEXEC)

    def read_into(self, first: int, buf: memoryview) -> None:
        ps = self.page_size
        done = 0
        while done < len(buf):
            n = os.preadv(self.fd, [buf[done:]], first * ps + done)
            if n <= 0:
                raise ImageError("image RAM file shrank while in use", page=first + done // ps)
            done += n
        sums = self.image.sums
        for k in range(len(buf) // ps):
            if xxhash.xxh3_64_intdigest(buf[k * ps : (k + 1) * ps]) != sums[first + k]:
                raise ImageError("corrupt image: a page does not match its checksum", page=first + k)

    def close(self) -> None:
        os.close(self.fd)


def verify_pages(image: Image) -> int:
    """Read every data page and check its checksum; returns pages read.  Raises ImageError."""
    reader = CheckedReader(image)
    buf = bytearray(READ_CHUNK * image.page_size)
    view = memoryview(buf)
    n = 0
    try:
        for first, count in runs(image.holes, 0):
            for p in range(first, first + count, READ_CHUNK):
                k = min(READ_CHUNK, first + count - p)
                reader.read_into(p, view[: k * image.page_size])
                n += k
    finally:
        reader.close()
    return n


def runs(m: bytes, value: int) -> list[tuple[int, int]]:
    """(first, count) of every run of ``value`` bytes in ``m``."""
    out = []
    other = 1 - value
    i = m.find(value)
    while i >= 0:
        j = m.find(other, i)
        j = len(m) if j < 0 else j
        out.append((i, j - i))
        i = m.find(value, j)
    return out


class ImageWriter:
    """Writes an image folder: pages at their offsets (zero pages never written), then the manifest.

    ``write(first, flags_data)`` takes runs of pages; the manifest is written
    last (by :meth:`finish`), so a folder without one is an unfinished image.
    """

    def __init__(self, path: str, ram_size: int, page_size: int) -> None:
        if ram_size % page_size:
            raise ImageError(f"RAM size {ram_size} is not a multiple of the page size {page_size}")
        os.makedirs(path, exist_ok=True)
        if os.path.exists(os.path.join(path, MANIFEST)):
            raise ImageError("an image is already there (remove it first)", path=path)
        self.path, self.page_size = path, page_size
        self.npages = ram_size // page_size
        self.fd = os.open(os.path.join(path, RAM), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.ftruncate(self.fd, ram_size)  # all holes until written
        self.sums = array("Q", [zero_hash(page_size)]) * self.npages
        self.written = bytearray(self.npages)  # 1 = data written
        self._zero = bytes(page_size)

    def write(self, first: int, data: bytes | bytearray | memoryview) -> int:
        """Write the pages ``data`` holds from page ``first`` on; all-zero pages stay holes.  Returns pages written."""
        ps = self.page_size
        n = len(data) // ps
        mv = memoryview(data)
        written = k = 0
        while k < n:  # one pwrite per run of non-zero pages
            if mv[k * ps : (k + 1) * ps] == self._zero:
                k += 1
                continue
            j = k
            while j < n and (j == k or mv[j * ps : (j + 1) * ps] != self._zero):
                self.sums[first + j] = page_hash(mv[j * ps : (j + 1) * ps])
                j += 1
            off, chunk = 0, mv[k * ps : j * ps]
            while off < len(chunk):
                off += os.pwrite(self.fd, chunk[off:], (first + k) * ps + off)
            self.written[first + k : first + j] = b"\x01" * (j - k)
            written += j - k
            k = j
        return written

    def finish(self, *, vcpu_state: dict[str, Any] | None, vcpus: int, origin: dict[str, Any]) -> dict[str, Any]:
        """fsync the pages, write pages.xxh3, vcpu.json and, last, the manifest; returns the manifest."""
        os.fsync(self.fd)
        os.close(self.fd)
        sums = self.sums.tobytes()
        _write_file(os.path.join(self.path, SUMS), sums)
        vhash = None
        if vcpu_state is not None:
            raw = json.dumps(vcpu_state).encode()
            _write_file(os.path.join(self.path, VCPU), raw)
            vhash = f"{xxhash.xxh3_64_intdigest(raw):016x}"
        data = self.written.count(1)
        m = {"format": FORMAT, "version": VERSION, "id": secrets.token_hex(8), "ram_size": self.npages * self.page_size,
             "page_size": self.page_size, "npages": self.npages, "vcpus": vcpus,
             "guest": "guest_sim" if vcpu_state is not None else "raw", "data_pages": data,
             "zero_pages": self.npages - data, "checksum": "xxh3-64", "ram": RAM,
             "pages_xxh3": f"{xxhash.xxh3_64_intdigest(sums):016x}", "vcpu_xxh3": vhash,
             "created_unix": time.time(), "origin": origin}  # fmt: skip
        _write_file(os.path.join(self.path, MANIFEST), json.dumps(m, indent=2).encode() + b"\n")
        return m

    def abort(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


def _write_file(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
