"""Signals for the CLI, safe against storms.

A Python signal handler runs between two bytecodes of the main thread, possibly
while that thread holds a lock; a handler that takes a lock itself (as
``threading.Event.set`` does) can then deadlock, and a storm of signals can
nest handlers until the recursion limit (both seen: 5,000 SIGUSR1 in a loop).
So the handlers here only add to integers; a watcher thread turns those counts
into ``threading.Event``s that the rest of the code waits on as before.
"""

from __future__ import annotations

import signal
import threading


class StopRequest(threading.Event):
    """Set after SIGINT/SIGTERM; ``interactive`` tells a Ctrl-C from an operator's SIGTERM."""

    interactive = False


class Signals:
    def __init__(self) -> None:
        self.stop = StopRequest()
        self.rollback = threading.Event()
        self._counts: dict[int, int] = {int(signal.SIGINT): 0, int(signal.SIGTERM): 0, int(signal.SIGUSR1): 0}
        self._seen = dict(self._counts)
        for sig in self._counts:
            signal.signal(sig, self._handler)
        threading.Thread(target=self._watch, name="signals", daemon=True).start()

    def _handler(self, signum: int, _frame: object) -> None:
        if signum == signal.SIGINT and self.stop.is_set() and self.stop.interactive:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now (run() prints one line)
        self._counts[signum] += 1  # nothing else here: no lock, no allocation worth the name

    def _watch(self) -> None:
        while True:
            threading.Event().wait(0.05)
            for sig, n in self._counts.items():
                if n != self._seen[sig]:
                    self._seen[sig] = n
                    if sig == signal.SIGUSR1:
                        self.rollback.set()
                    else:
                        self.stop.interactive = sig == signal.SIGINT
                        self.stop.set()
