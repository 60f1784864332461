"""The last step: Complete, until the source confirms it has released its copy.

Every page is installed here and the userfaultfd is gone: the guest no longer
needs the source.  What is left is telling it, so that it releases its paused
copy, and knowing that it did.  Complete is idempotent on the source, so it is
simply sent again (with backoff, across reconnections) until a reply arrives;
then an ``ack`` tells the source it may stop answering.  Nothing here ever
stops the guest, except the one answer that means a second copy runs on the
source: the migration was rolled back there by force (MigrationEnded).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from migrator.dest.source_client import Control
from migrator.errors import MigrationEnded, MigratorError

BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 2.0


class Release:
    def __init__(
        self, src: Control, installed: int, say: Callable[[str], None], on_fatal: Callable[[BaseException], None]
    ) -> None:
        self.src, self.installed, self.say, self.on_fatal = src, installed, say, on_fatal
        self.confirmed = threading.Event()
        self.attempts = 0
        self.last_error = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Try once now (the common case: confirmed at once), else keep trying in the background."""
        if self._attempt() or self._stop.is_set():
            return
        self.say(f"the source has not confirmed the release yet ({self.last_error}); the guest keeps running "
                 f"here with every page; retrying")  # fmt: skip
        self._thread = threading.Thread(target=self._run, name="release", daemon=True)
        self._thread.start()

    def _attempt(self) -> bool:
        self.attempts += 1
        try:
            self.src.complete(self.installed)
        except MigrationEnded as exc:
            self.on_fatal(MigrationEnded(f"{exc}: a copy of the guest runs on the source; stopping this one"))
            self._stop.set()
            return False
        except MigratorError as exc:
            self.last_error = str(exc)
            return False
        self.confirmed.set()
        try:
            self.src.complete(self.installed, ack=True)  # best effort: the source stops waiting for a repeat
        except MigratorError:
            pass
        return True

    def _run(self) -> None:
        backoff = BACKOFF_FIRST_S
        while not self._stop.wait(backoff):
            if self._attempt():
                self.say(f"the source confirmed the release (after {self.attempts} attempts)")
                return
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    def wait(self, timeout: float) -> bool:
        return self.confirmed.wait(timeout)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    @property
    def state(self) -> str:
        if self.confirmed.is_set():
            return "confirmed"
        return f"not confirmed after {self.attempts} attempts ({self.last_error})"

