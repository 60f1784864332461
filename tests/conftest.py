"""Shared fixtures.

Keep this file small; each helper has a name that says what it is for.
"""

from __future__ import annotations

import functools

import pytest


@functools.cache
def userfaultfd_probe() -> tuple[bool, str]:
    """(usable, message) from the same probe that backs ``migrator check``."""
    from migrator.probe import probe

    result = probe()
    return result.ok, result.message


def require_userfaultfd() -> None:
    """Skip the calling test when userfaultfd cannot be used here; the probe says why."""
    ok, message = userfaultfd_probe()
    if not ok:
        pytest.skip(message)


@pytest.fixture
def userfaultfd_required() -> None:
    """Fixture form of :func:`require_userfaultfd`."""
    require_userfaultfd()


def pytest_configure(config: pytest.Config) -> None:
    """One migration secret for the whole run: every `migrator source` and
    `migrator dest` the tests start (and DestConfig's default) read it from
    $MIGRATOR_SECRET, as a user's two terminals would."""
    import os
    import secrets

    os.environ.setdefault("MIGRATOR_SECRET", "test-" + secrets.token_hex(12))
