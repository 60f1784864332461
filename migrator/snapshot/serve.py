"""`migrator serve DIR`: an image served over the migration protocol, so that a
remote `migrator dest --source ADDR` restores it with nothing new on its side.

The source's code serves it unchanged (``source/run.py``'s ``serve_guest``,
its session, its urgent and lane workers): an image is a guest that is always
paused.  :class:`ImageGuest` answers the guest calls the source makes (pause
returns the image's vCPU state; resume, a roll-back, a release change
nothing) and hands the workers the image's RAM file as the RAM descriptor
they map read-only (``MappedRam``: holes read as zeros); :class:`ImageSession`
takes the never-touched map from the image's holes instead of a pagemap.
Each destination gets a new session (a new epoch); the image is never
changed, so it can be restored any number of times.  The image is checked
(``open_image``) before anything listens; page checksums are checked by the
destination per batch (XXH3-64 of what was read), not against the image's
table: ``migrator restore --verify-image`` does that locally.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from migrator.config import SourceConfig
from migrator.guest import GuestProcess, GuestSpec, Hello
from migrator.snapshot.image import Image, open_image
from migrator.snapshot.restore import raw_state
from migrator.source.run import serve_guest
from migrator.source.session import SourceSession


class ImageGuest(GuestProcess):
    """A guest that is an image: always paused, nothing to run."""

    def __init__(self, image: Image) -> None:  # no process: nothing of GuestProcess.__init__ applies
        self.image = image
        self.state = image.vcpu_state or raw_state()
        self.spec = GuestSpec(ram=image.ram_size, page_size=image.page_size)
        fd = os.open(image.ram_path, os.O_RDONLY | os.O_CLOEXEC)
        vcpus = int(self.state["config"].get("nvcpus", 2))
        self.hello = Hello(pid=os.getpid(), addr=0, size=image.ram_size, page_size=image.page_size, table_pages=0,
                           vcpus=vcpus, tids=[], uffd=None, ram_fd=fd)  # fmt: skip

    def call(self, cmd: str, timeout: float = 30.0, **kw: Any) -> dict[str, Any]:
        if cmd == "pause":
            return {"ok": True, "paused_ns": time.time_ns(), "state": self.state}
        if cmd == "stats":
            return {"ok": True, "mono_ns": time.monotonic_ns(), "vcpus": [{"ops": 0} for _ in range(self.hello.vcpus)]}
        return {"ok": True}

    def alive(self) -> bool:
        return True

    def quit(self, timeout: float = 5.0) -> int | None:
        self.close()
        return 0

    def kill(self) -> None:
        self.close()

    def close(self) -> None:
        if self.hello.ram_fd is not None:
            os.close(self.hello.ram_fd)
            self.hello.ram_fd = None


class _HolesReader:
    """What SourceSession reads from a guest's /proc files, for an image."""

    def __init__(self, image: Image) -> None:
        self.image = image
        self.mem_fd = os.open(image.ram_path, os.O_RDONLY | os.O_CLOEXEC)

    def untouched_map(self) -> bytes:
        return self.image.holes

    def close(self) -> None:
        os.close(self.mem_fd)


class ImageSession(SourceSession):
    guest: ImageGuest

    def _open_reader(self) -> Any:
        return _HolesReader(self.guest.image)


def serve_image(path: str, cfg: SourceConfig, stop: threading.Event, say: Callable[[str], None] = print,
                once: bool = False) -> int:  # fmt: skip
    """Serve the image at ``path`` to one destination after another (``once``: one); returns
    how many restores completed.  Raises ImageError before listening if the image is unusable."""
    image = open_image(path)
    say(f"serve: image {path} ({image.ram_size >> 20} MiB, {image.data_pages} data pages, id {image.id})")
    served = 0
    while not stop.is_set():
        result = serve_guest(ImageGuest(image), cfg, stop, say, session_class=ImageSession)
        if result.get("phase") == "completed":
            served += 1
            if once:
                break
        cfg = replace(cfg, listen=str(result["address"]))  # the same port for the next one
    return served
