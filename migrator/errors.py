"""Every error migrator raises on purpose, in one tree.

::

    MigratorError                     exit code 1 unless a subclass says otherwise
    ├── UnsupportedHost               3  userfaultfd cannot be used here (probe says why)
    ├── TransportError                4  the peer cannot be reached, or went away
    │   ├── SourceUnreachable         4
    │   └── AuthError                 8  the peer refused our secret or certificate
    ├── MigrationEnded                4  the source ended this migration (roll-back, timeout,
    │                                    cancel): the guest runs there, not here
    ├── SourceFailed                  4  the source could not do its part (its guest died or
    │                                    would not pause); retrying cannot help
    ├── SourceBusy                    4  the source migrates its guest to another destination
    ├── ProtocolError                 6  the peer sent something we refuse (version,
    │   │                                size, checksum, a page we did not ask for)
    │   └── IntegrityError            6  a page failed its checksum
    ├── GuestError                    5  the guest process died or failed its own checks
    │   ├── GuestDied                 5
    │   └── GuestStalled              5  no reply within the deadline (the channel stays usable)
    ├── ImageError                    9  a RAM image (snapshot) is missing, truncated or corrupt,
    │                                    or does not fit what it is used with
    └── UffdError                     7  an ioctl on the userfaultfd failed unexpectedly
        ├── PageExists                   EEXIST: the page is already mapped (benign race)
        ├── RetryLater                   EAGAIN: the mm is changing, try again
        └── GuestGone                 5  ESRCH/ENOSPC: the guest's mm has gone

Errors carry fields and print them (``page=... addr=0x... errno=...``), so a
one-line message is always enough to tell what happened.  Benign races
(PageExists, RetryLater) are caught one level up and become counters.
"""

from __future__ import annotations

import errno as _errno
import os


class MigratorError(Exception):
    exit_code = 1

    def __init__(self, message: str, **fields: object) -> None:
        self.message = message
        self.fields = fields
        super().__init__(message)

    def __str__(self) -> str:
        if not self.fields:
            return self.message
        extra = " ".join(
            f"{k}={hex(v) if k in ('addr', 'address') and isinstance(v, int) else v}"
            for k, v in self.fields.items()
        )
        return f"{self.message} ({extra})"


class UnsupportedHost(MigratorError):
    exit_code = 3


class TransportError(MigratorError):
    exit_code = 4


class SourceUnreachable(TransportError):
    pass


class AuthError(TransportError):
    exit_code = 8


class MigrationEnded(MigratorError):
    """The source ended the migration we are part of; retrying cannot help."""

    exit_code = 4


class SourceFailed(MigratorError):
    exit_code = 4


class SourceBusy(MigratorError):
    exit_code = 4


class ProtocolError(MigratorError):
    exit_code = 6


class IntegrityError(ProtocolError):
    pass


class GuestError(MigratorError):
    exit_code = 5


class GuestDied(GuestError):
    pass


class GuestStalled(GuestError):
    """The guest did not answer a control call in time; it may only be slow."""


class ImageError(MigratorError):
    """A snapshot image that cannot be used as it is (``snapshot/image.py``)."""

    exit_code = 9


class UffdError(MigratorError):
    exit_code = 7

    def __init__(self, message: str, *, err: int = 0, **fields: object) -> None:
        if err:
            fields["errno"] = _errno.errorcode.get(err, str(err))
        super().__init__(message, **fields)
        self.errno = err


class PageExists(UffdError):
    pass


class RetryLater(UffdError):
    pass


class GuestGone(UffdError):
    exit_code = 5


class Unmapped(UffdError):
    """ENOENT: no registered mapping there (the guest unmapped or replaced it)."""


def uffd_error(op: str, err: int | None, **fields: object) -> UffdError:
    """Map an errno from a userfaultfd ioctl to the matching exception."""
    err = err or 0
    if err == _errno.EEXIST:
        return PageExists(f"{op}: page already present", err=err, **fields)
    if err == _errno.EAGAIN:
        return RetryLater(f"{op}: address space changing, retry", err=err, **fields)
    if err == _errno.ENOENT:
        return Unmapped(f"{op}: not guest RAM there any more (unmapped)", err=err, **fields)
    if err in (_errno.ESRCH, _errno.ENOSPC):
        return GuestGone(f"{op}: the guest's address space is gone", err=err, **fields)
    return UffdError(f"{op} failed: {os.strerror(err)}", err=err, **fields)
