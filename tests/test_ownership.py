"""The source's ownership state machine, pure: every rule of ownership.py's docstring."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migrator.source.ownership import FORCED, ROLLED_BACK, TIMED_OUT, Ownership, Phase, Refused

TOKEN, OTHER = b"t" * 16, b"o" * 16
E1, E2 = 0x1111, 0x2222


def paused(timeout: float = 5.0) -> Ownership:
    o = Ownership(timeout)
    assert o.begin_pause(TOKEN)
    o.pause_done(E1, now=100.0)
    return o


def switched() -> Ownership:
    o = paused()
    assert o.switchover(E1)
    return o


def test_a_handshake_pauses_once_and_its_token_gets_the_same_answer_again() -> None:
    o = paused()
    assert o.phase is Phase.PAUSED
    assert o.begin_pause(TOKEN) is False  # replay: same manifest
    with pytest.raises(Refused) as err:
        o.begin_pause(OTHER)
    assert err.value.status == "ALREADY_EXISTS"
    o.switchover(E1)
    assert o.begin_pause(TOKEN) is False  # still the same migration


def test_pause_failure_returns_to_running_and_forgets_the_token() -> None:
    o = Ownership()
    assert o.begin_pause(TOKEN)
    with pytest.raises(Refused):
        o.begin_pause(OTHER)  # one at a time, also while pausing
    o.pause_failed()
    assert o.phase is Phase.RUNNING and o.token == b""
    assert o.begin_pause(OTHER)


def test_switchover_is_recorded_once_and_repeats_are_harmless() -> None:
    o = paused()
    assert o.switchover(E1) is True
    assert o.switchover(E1) is False
    assert o.destination_may_run


def test_cancel_only_before_the_switchover() -> None:
    o = paused()
    o.cancel(E1)
    assert o.phase is Phase.RUNNING
    o = switched()
    with pytest.raises(Refused) as err:
        o.cancel(E1)
    assert err.value.status == "FAILED_PRECONDITION" and "switched over" in str(err.value)
    assert o.phase is Phase.SWITCHED


def test_timeout_resumes_only_a_guest_nobody_took() -> None:
    o = paused(timeout=5.0)
    assert not o.expire(now=104.0)
    assert o.expire(now=105.5) and o.phase is Phase.RUNNING
    o = switched()
    assert not o.expire(now=10_000.0) and o.phase is Phase.SWITCHED


def test_rollback_needs_force_after_the_switchover() -> None:
    o = paused()
    resume, _ = o.rollback(force=False)
    assert resume and o.phase is Phase.RUNNING and o.ended[E1] == ROLLED_BACK
    o = switched()
    resume, msg = o.rollback(force=False)
    assert not resume and o.phase is Phase.SWITCHED and "--force" in msg and "two live guests" in msg
    resume, msg = o.rollback(force=True)
    assert resume and o.phase is Phase.RUNNING and o.ended[E1] == FORCED
    assert o.rollback(force=True) == (False, "nothing to roll back (phase running)")


def test_an_ended_epoch_is_refused_and_says_why() -> None:
    o = paused()
    o.expire(now=1000.0)
    for call in (lambda: o.check(E1), lambda: o.switchover(E1), lambda: o.complete(E1), lambda: o.cancel(E1)):
        with pytest.raises(Refused) as err:
            call()
        assert err.value.ended == TIMED_OUT and err.value.status == "FAILED_PRECONDITION"
    # a new migration; the old epoch stays refused
    assert o.begin_pause(OTHER)
    o.pause_done(E2, now=2000.0)
    o.check(E2)
    with pytest.raises(Refused) as err:
        o.check(E1)
    assert err.value.ended == TIMED_OUT


def test_complete_needs_the_switchover_and_repeats_get_the_same_answer() -> None:
    o = paused()
    with pytest.raises(Refused):
        o.complete(E1)
    o.switchover(E1)
    assert o.complete(E1) is True and o.phase is Phase.COMPLETED
    assert o.complete(E1) is False  # a lost reply: asked again
    with pytest.raises(Refused):
        o.check(E1)  # nothing is served after completion
    with pytest.raises(Refused):
        o.begin_pause(OTHER)  # the guest has left
    assert o.rollback(force=True)[0] is False  # and can never come back


def test_wrong_epoch_never_served() -> None:
    o = switched()
    for epoch in (0, E2, E1 + 1):
        with pytest.raises(Refused):
            o.check(epoch)


STEPS = st.lists(
    st.sampled_from(["pause", "pause-other", "done", "fail", "switch", "cancel", "expire", "rollback", "force", "complete"]),
    max_size=30,
)


@settings(max_examples=500, deadline=None)
@given(steps=STEPS)
def test_never_two_live_guests(steps: list[str]) -> None:
    """Any sequence of requests: once the destination may run the guest, the source
    resumes its copy only by a forced roll-back, and never after completion."""
    o = Ownership(5.0)
    epoch, now = 0, 0.0
    dest_may_run = False  # the destination resumes only after a recorded switch-over
    for step in steps:
        now += 1.0
        was = o.phase
        try:
            if step in ("pause", "pause-other"):
                o.begin_pause(TOKEN if step == "pause" else OTHER)
            elif step == "done" and o.phase is Phase.PAUSING:
                epoch += 1
                o.pause_done(epoch, now)
            elif step == "fail" and o.phase is Phase.PAUSING:
                o.pause_failed()
            elif step == "switch":
                if o.switchover(epoch):
                    dest_may_run = True
            elif step == "cancel":
                o.cancel(epoch)
            elif step == "expire":
                o.expire(now + 10)
            elif step == "rollback":
                o.rollback(force=False)
            elif step == "force":
                if o.rollback(force=True)[0]:
                    dest_may_run = False  # the user declared it gone
            elif step == "complete":
                o.complete(epoch)
        except Refused:
            assert o.phase is was  # a refusal changes nothing
        resumed_here = was in (Phase.PAUSED, Phase.SWITCHED) and o.phase is Phase.RUNNING
        assert not (resumed_here and dest_may_run), (steps, step)
        if was is Phase.COMPLETED:
            assert o.phase is Phase.COMPLETED
        if o.phase is Phase.RUNNING:
            dest_may_run = False


def test_the_same_destination_asking_again_while_its_pause_is_under_way_is_told_to_retry() -> None:
    o = Ownership()
    assert o.begin_pause(TOKEN)
    with pytest.raises(Refused) as err:
        o.begin_pause(TOKEN)
    assert err.value.status == "UNAVAILABLE"  # retryable: the same manifest comes once paused
    o.pause_done(E1, now=1.0)
    assert o.begin_pause(TOKEN) is False


def test_a_dead_source_guest_ends_the_migration_and_says_why() -> None:
    o = switched()
    assert o.source_failed() == E1
    with pytest.raises(Refused) as err:
        o.check(E1)
    assert err.value.ended == "source-failed"
    assert Ownership().source_failed() == 0  # nothing in progress: nothing to end


def test_precopy_then_the_same_tokens_handshake_pauses() -> None:
    from migrator.source.ownership import PRECOPY_ENDED

    o = Ownership()
    o.begin_precopy(TOKEN, E1)
    assert o.phase is Phase.PRECOPY
    o.check(E1)  # the pre-copy's streams are served
    with pytest.raises(Refused) as err:
        o.begin_pause(OTHER)  # another destination: busy
    assert err.value.status == "ALREADY_EXISTS"
    with pytest.raises(Refused):
        o.begin_precopy(OTHER, E2)
    assert o.begin_pause(TOKEN)  # the same destination switches
    assert o.phase is Phase.PAUSING and o.ended[E1] == PRECOPY_ENDED
    o.pause_done(E2, now=1.0)
    with pytest.raises(Refused) as err:
        o.check(E1)  # the pre-copy's streams are over
    assert err.value.ended == PRECOPY_ENDED


def test_abandoned_precopy_returns_to_running() -> None:
    o = Ownership()
    o.begin_precopy(TOKEN, E1)
    assert o.end_precopy() == E1
    assert o.phase is Phase.RUNNING and o.token == b""
    assert o.end_precopy() == 0
    assert o.begin_pause(OTHER)  # anyone may migrate it now
