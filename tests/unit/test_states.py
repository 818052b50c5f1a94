"""The state machine, every (state, event) pair against an explicit table. No servers."""

from __future__ import annotations

import itertools

import pytest

from migration.states import (
    ACTIVE_STATES,
    CLAIM_EVENTS,
    UNDO_CLAIM,
    Event,
    InvalidTransition,
    SkipReason,
    State,
    apply,
    undo_claim,
)

S, E = State, Event
D, PI, PD, IM, DONE, AB, SK = (
    S.DEFAULT, S.PRE_IMPORTING, S.PRE_IMPORT_DONE, S.IMPORTING, S.IMPORT_DONE,
    S.IMPORT_ABORTED, S.IMPORT_SKIPPED,
)  # fmt: skip

# The aborted state is split by the state it was aborted in, since the retries depend on it.
# Keys: (state, aborted_in_state). Values per event: the target state, or None = refused.
ROWS: list[tuple[State, State | None]] = [
    (D, None), (PI, None), (PD, None), (IM, None), (DONE, None), (SK, None),
    (AB, None), (AB, D), (AB, PI), (AB, PD), (AB, IM),
]  # fmt: skip

# Abort is tabled for retries well below max_retries; the skip-at-max case is tested apart.
EXPECTED: dict[Event, dict[tuple[State, State | None], State | None]] = {
    E.START_PRE_IMPORT: {(D, None): PI},
    E.FINISH_PRE_IMPORT: {(PI, None): PD},
    E.START_IMPORT: {(PD, None): IM},
    E.FINISH_IMPORT: {(IM, None): DONE},
    E.ALREADY_MIGRATED: {
        (D, None): DONE, (PD, None): DONE, (AB, None): DONE, (AB, D): DONE, (AB, PI): DONE,
        (AB, PD): DONE, (AB, IM): DONE,
    },
    E.ABORT_IMPORT: {(PI, None): AB, (PD, None): AB, (IM, None): AB},
    E.FINISH_IMPORT_AS: {
        (D, None): DONE, (PI, None): DONE, (PD, None): DONE, (IM, None): DONE,
        (AB, None): DONE, (AB, D): DONE, (AB, PI): DONE, (AB, PD): DONE, (AB, IM): DONE,
    },
    E.SKIP_IMPORT: {
        (D, None): SK, (PI, None): SK, (PD, None): SK, (IM, None): SK,
        (AB, None): SK, (AB, D): SK, (AB, PI): SK, (AB, PD): SK, (AB, IM): SK,
    },
    E.RETRY_PRE_IMPORT: {(AB, None): PI, (AB, D): PI, (AB, PI): PI},
    E.RETRY_IMPORT: {(AB, PD): IM, (AB, IM): IM},
    # Whatever phase it was aborted in: the registry runs the phase now.
    E.ALIGN_PRE_IMPORTING: {(AB, None): PI, (AB, D): PI, (AB, PI): PI, (AB, PD): PI, (AB, IM): PI},
    E.ALIGN_IMPORTING: {(AB, None): IM, (AB, D): IM, (AB, PI): IM, (AB, PD): IM, (AB, IM): IM},
}  # fmt: skip


def test_table_covers_every_event() -> None:
    assert set(EXPECTED) == set(Event)
    assert {row[0] for row in ROWS} == set(State)


@pytest.mark.parametrize(("row", "event"), list(itertools.product(ROWS, list(Event))))
def test_every_pair(row: tuple[State, State | None], event: Event) -> None:
    state, aborted_in = row
    expected = EXPECTED[event].get(row)
    reason = SkipReason.NOT_FOUND if event in (E.SKIP_IMPORT, E.FINISH_IMPORT_AS) else None
    if expected is None:
        with pytest.raises(InvalidTransition):
            apply(
                state,
                event,
                retries_count=0,
                max_retries=3,
                aborted_in_state=aborted_in,
                skip_reason=reason,
            )
        return
    t = apply(
        state,
        event,
        retries_count=0,
        max_retries=3,
        aborted_in_state=aborted_in,
        skip_reason=reason,
    )
    assert (t.from_state, t.to_state, t.event) == (state, expected, event)
    if event is E.ABORT_IMPORT:
        assert (t.retries_count, t.aborted_in_state, t.skipped_reason) == (1, state, None)
    elif event in (E.SKIP_IMPORT, E.FINISH_IMPORT_AS):
        assert (t.retries_count, t.aborted_in_state) == (0, aborted_in)
        assert t.skipped_reason is SkipReason.NOT_FOUND
    else:
        assert (t.retries_count, t.aborted_in_state, t.skipped_reason) == (0, aborted_in, None)


def test_no_event_loops_on_its_own_state() -> None:
    for row, event in itertools.product(ROWS, list(Event)):
        target = EXPECTED[event].get(row)
        assert target != row[0], (row, event)


@pytest.mark.parametrize("state", sorted(ACTIVE_STATES))
def test_abort_counts_retries_and_skips_at_max(state: State) -> None:
    first = apply(state, E.ABORT_IMPORT, retries_count=0, max_retries=3)
    second = apply(state, E.ABORT_IMPORT, retries_count=1, max_retries=3)
    third = apply(state, E.ABORT_IMPORT, retries_count=2, max_retries=3)
    assert [t.to_state for t in (first, second, third)] == [AB, AB, SK]
    assert [t.retries_count for t in (first, second, third)] == [1, 2, 3]
    assert third.skipped_reason is SkipReason.TOO_MANY_RETRIES
    assert third.aborted_in_state is state
    assert apply(state, E.ABORT_IMPORT, retries_count=0, max_retries=1).to_state is SK


def test_only_native_and_not_found_are_reasons_to_be_done() -> None:
    for reason in SkipReason:
        if reason in (SkipReason.NATIVE_IMPORT, SkipReason.NOT_FOUND):
            done = apply(PI, E.FINISH_IMPORT_AS, retries_count=1, max_retries=3, skip_reason=reason)
            assert (done.to_state, done.skipped_reason) == (DONE, reason)
        else:
            with pytest.raises(InvalidTransition, match="not a reason to be done"):
                apply(PI, E.FINISH_IMPORT_AS, retries_count=0, max_retries=3, skip_reason=reason)


def test_skip_needs_a_reason_and_others_refuse_one() -> None:
    with pytest.raises(InvalidTransition, match="needs a skip reason"):
        apply(D, E.SKIP_IMPORT, retries_count=0, max_retries=3)
    with pytest.raises(InvalidTransition, match="only skip_import and finish_import_as"):
        apply(
            D, E.START_PRE_IMPORT, retries_count=0, max_retries=3, skip_reason=SkipReason.NOT_FOUND
        )


def test_retry_refusal_names_the_right_retry() -> None:
    with pytest.raises(InvalidTransition, match="use retry_import"):
        apply(AB, E.RETRY_PRE_IMPORT, retries_count=1, max_retries=3, aborted_in_state=IM)


def test_claim_events_are_exactly_those_entering_an_active_state_from_outside() -> None:
    entering = set()
    for row, event in itertools.product(ROWS, list(Event)):
        target = EXPECTED[event].get(row)
        if target in ACTIVE_STATES and row[0] not in ACTIVE_STATES:
            entering.add(event)
    assert entering == set(CLAIM_EVENTS)


UNDO_EXPECTED = {(PI, D): D, (PI, AB): AB, (IM, AB): AB, (IM, PD): PD}


@pytest.mark.parametrize(("state", "claimed_from"), list(itertools.product(State, State)))
def test_undo_claim_every_pair(state: State, claimed_from: State) -> None:
    expected = UNDO_EXPECTED.get((state, claimed_from))
    if expected is None:
        with pytest.raises(InvalidTransition):
            undo_claim(state, claimed_from=claimed_from, retries_count=2, aborted_in_state=None)
        return
    t = undo_claim(state, claimed_from=claimed_from, retries_count=2, aborted_in_state=PI)
    assert (t.event, t.from_state, t.to_state) == (UNDO_CLAIM, state, expected)
    assert (t.retries_count, t.aborted_in_state, t.skipped_reason) == (2, PI, None)
