"""Who owns the guest, as the source sees it: the switch-over as a state machine.

::

    RUNNING --handshake--> PAUSING --paused--> PAUSED --switchover--> SWITCHED --complete--> COMPLETED
     |  ^                     |                  |                       |
     |  +---- pause failed ---+                  |                       |
     |  +---- pre-copy ended (no handshake) --+  |                       |
     +--precopy--> PRECOPY --handshake (same token)--> PAUSING           |
       ^                                         |                       |
       +---- cancel / roll-back / no switch-over in time ---+            |
       +--------------------- forced roll-back ---------------------------+

The rules (QEMU's postcopy states, libvirt's confirm-then-release), each tested
in ``tests/test_ownership.py``:

* A destination resumes its guest only after the source has recorded its
  Switchover.  So in PAUSED no copy of the guest runs anywhere: Cancel, a
  roll-back and the switch-over timeout may resume it here.
* In SWITCHED a destination may be running the guest with part of its memory,
  and the copy here is the only source of the rest.  Nothing resumes it on its
  own, Cancel is refused, and a roll-back needs ``force`` (two live guests if
  the destination's still runs).
* PRECOPY: the guest still runs here, only tracked and streamed (its own
  epoch, so that its streams end when it ends); the Handshake of the same
  token pauses it, any other destination is refused as busy.  A pre-copy that
  ends without a handshake (the destination went away) changes nothing.
* COMPLETED is final: the copy here is released.  Complete is answered again
  the same way (its reply may have been lost).
* Every migration gets a new epoch; a message naming any other epoch is
  refused, and says why that epoch ended.

Pure: no threads, no I/O, time is passed in.  The caller holds its lock around
every call and performs what a call decides (pause, resume, release) itself.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Phase(str, enum.Enum):
    RUNNING = "running"
    PRECOPY = "pre-copy"
    PAUSING = "pausing"
    PAUSED = "paused"
    SWITCHED = "switched-over"
    COMPLETED = "completed"


# Why an epoch ended; travels to the destination in the refusal's trailing
# metadata (``ENDED_KEY``) so that it can tell "ended" from "refused".
ENDED_KEY = "migrator-epoch-ended"
CANCELLED, TIMED_OUT, ROLLED_BACK, FORCED, COMPLETED_, PAUSE_FAILED, SOURCE_FAILED, PRECOPY_ENDED = (
    "cancelled", "timed-out", "rolled-back", "rolled-back-forced", "completed", "pause-failed", "source-failed",
    "precopy-ended",
)  # fmt: skip
ENDED_TEXT = {
    CANCELLED: "cancelled by the destination before its guest ran",
    TIMED_OUT: "no switch-over in time: the guest was resumed on the source",
    ROLLED_BACK: "rolled back: the guest runs on the source again",
    FORCED: "rolled back by force on the source: the guest runs there again",
    COMPLETED_: "completed: the source has released the guest",
    PAUSE_FAILED: "the source could not pause its guest",
    SOURCE_FAILED: "the source's guest died: the pages it still held are lost",
    PRECOPY_ENDED: "its pre-copy ended (the switch-over began, or the destination went away)",
}


class Refused(Exception):
    """A request this state does not allow.  ``status`` names a gRPC status code."""

    def __init__(self, status: str, message: str, ended: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.ended = ended  # why the epoch named in the request ended, if it did


@dataclass
class Ownership:
    switchover_timeout_s: float = 5.0
    phase: Phase = Phase.RUNNING
    epoch: int = 0
    token: bytes = b""
    paused_at: float = 0.0  # monotonic seconds
    ended: dict[int, str] = field(default_factory=dict)  # epoch -> why it ended

    # -- the handshake ---------------------------------------------------------------
    def begin_precopy(self, token: bytes, epoch: int) -> None:
        """RUNNING -> PRECOPY under the pre-copy's own ``epoch``."""
        if self.phase is Phase.COMPLETED:
            raise Refused("FAILED_PRECONDITION", "the guest has already migrated away from this source")
        if self.phase is not Phase.RUNNING:
            raise Refused("ALREADY_EXISTS", f"a migration is already {self.phase.value}")
        assert epoch and epoch not in self.ended
        self.phase, self.token, self.epoch = Phase.PRECOPY, token, epoch

    def end_precopy(self) -> int:
        """PRECOPY -> RUNNING (the destination went away); returns the pre-copy's epoch, or 0."""
        if self.phase is not Phase.PRECOPY:
            return 0
        self._end(PRECOPY_ENDED, Phase.RUNNING)
        return self.epoch

    def begin_pause(self, token: bytes) -> bool:
        """True: pause now (RUNNING or this token's PRECOPY -> PAUSING; a pre-copy's
        epoch is ended).  False: this token's handshake is already done: answer with
        the same manifest again."""
        if self.phase is Phase.RUNNING:
            self.phase, self.token = Phase.PAUSING, token
            return True
        if self.phase is Phase.PRECOPY and token and token == self.token:
            self.ended[self.epoch] = PRECOPY_ENDED
            self.phase = Phase.PAUSING
            return True
        if token and token == self.token and self.phase in (Phase.PAUSED, Phase.SWITCHED):
            return False
        if token and token == self.token and self.phase is Phase.PAUSING:
            # this destination asks again (a lost link) while its own pause is under way
            raise Refused("UNAVAILABLE", "the pause for this destination is under way; ask again")
        if self.phase is Phase.COMPLETED:
            raise Refused("FAILED_PRECONDITION", "the guest has already migrated away from this source")
        raise Refused("ALREADY_EXISTS", f"a migration is already {self.phase.value}")

    def pause_done(self, epoch: int, now: float) -> None:
        assert self.phase is Phase.PAUSING and epoch and epoch not in self.ended
        self.phase, self.epoch, self.paused_at = Phase.PAUSED, epoch, now

    def pause_failed(self) -> None:
        """PAUSING -> RUNNING: the caller makes sure the guest runs."""
        self.phase, self.token = Phase.RUNNING, b""

    # -- serving ---------------------------------------------------------------------
    def check(self, epoch: int) -> None:
        """Raise unless ``epoch`` is the migration (or pre-copy) being served now."""
        if epoch and epoch == self.epoch and self.phase in (Phase.PRECOPY, Phase.PAUSED, Phase.SWITCHED):
            return
        raise self._stale(epoch)

    def _stale(self, epoch: int) -> Refused:
        why = self.ended.get(epoch, "")
        if why:
            return Refused("FAILED_PRECONDITION", f"migration {epoch:016x} ended: {ENDED_TEXT[why]}", ended=why)
        if self.phase in (Phase.PAUSED, Phase.SWITCHED):
            return Refused("FAILED_PRECONDITION", f"not the migration in progress (epoch {epoch:016x})")
        return Refused("FAILED_PRECONDITION", f"no migration in progress (phase {self.phase.value})")

    def _end(self, why: str, phase: Phase) -> None:
        self.ended[self.epoch] = why
        self.phase, self.token = phase, b""

    # -- the switch-over and its endings ------------------------------------------------
    def switchover(self, epoch: int) -> bool:
        """PAUSED -> SWITCHED; True when newly recorded (repeating it is harmless)."""
        self.check(epoch)
        if self.phase is Phase.SWITCHED:
            return False
        self.phase = Phase.SWITCHED
        return True

    def cancel(self, epoch: int) -> None:
        """PAUSED -> RUNNING; the caller resumes the guest.  Refused once switched over."""
        self.check(epoch)
        if self.phase is Phase.SWITCHED:
            raise Refused(
                "FAILED_PRECONDITION",
                "cancel refused: the destination has switched over and may be running the guest",
            )
        self._end(CANCELLED, Phase.RUNNING)

    def expire(self, now: float) -> bool:
        """True (and PAUSED -> RUNNING) when no Switchover came in time after the pause."""
        if self.phase is Phase.PAUSED and now - self.paused_at > self.switchover_timeout_s:
            self._end(TIMED_OUT, Phase.RUNNING)
            return True
        return False

    def rollback(self, force: bool) -> tuple[bool, str]:
        """(resume the guest here?, what to tell the user)."""
        if self.phase is Phase.PAUSED:
            self._end(ROLLED_BACK, Phase.RUNNING)
            return True, "rolled back: the guest runs here again, from its state at the pause"
        if self.phase is Phase.SWITCHED:
            if not force:
                return False, (
                    "roll-back refused: the destination has switched over and may be running the guest "
                    "with part of its memory; the rest is only here. Roll back only if the destination's "
                    "guest is gone for good (its host is down): `migrator rollback --force` "
                    "(two live guests if it still runs)"
                )
            self._end(FORCED, Phase.RUNNING)
            return True, (
                "rolled back by force: the guest runs here again, from its state at the pause; "
                "a destination that still runs it is told to stop its copy when it next calls"
            )
        return False, f"nothing to roll back (phase {self.phase.value})"

    def source_failed(self) -> int:
        """The source's guest died: the migration in progress (if any) ends; returns its epoch."""
        if self.phase in (Phase.PRECOPY, Phase.PAUSED, Phase.SWITCHED):
            epoch = self.epoch
            self._end(SOURCE_FAILED, Phase.RUNNING)
            return epoch
        return 0

    def complete(self, epoch: int) -> bool:
        """SWITCHED -> COMPLETED; True when newly completed, False for a repeat."""
        if self.phase is Phase.COMPLETED and epoch == self.epoch:
            return False
        self.check(epoch)
        if self.phase is not Phase.SWITCHED:
            raise Refused("FAILED_PRECONDITION", "complete refused: no switch-over was recorded for this migration")
        self.ended[epoch] = COMPLETED_
        self.phase = Phase.COMPLETED
        return True

    @property
    def destination_may_run(self) -> bool:
        return self.phase is Phase.SWITCHED
