"""The migration state machine of one container repository (pure code, no I/O).

Kept from the reference (GitLab's ``ContainerRepository`` migration state machine, 2022),
made strict: every (state, event) pair not listed below raises :class:`InvalidTransition`.
The reference let some events loop on their own state (``retry_pre_import`` from
``pre_importing``, ``start_import`` from ``importing``...); here a step names the state it
expects and the store compares it, so a silent self-loop would let a stale step pass that
check. The allowed transitions::

    start_pre_import   default                                    -> pre_importing
    finish_pre_import  pre_importing                              -> pre_import_done
    start_import       pre_import_done                            -> importing
    finish_import      importing                                  -> import_done
    already_migrated   default | pre_import_done | import_aborted -> import_done
                       (the registry reports the import complete: a final start whose answer
                       was lost and whose claim was undone, or a retry, finds it done)
    finish_import_as   any state but import_done, import_skipped  -> import_done (reason:
                       native_import or not_found: the registry holds it already, or does
                       not know it; nothing left to do, as the reference's finish_import_as)
    abort_import       pre_importing | pre_import_done | importing -> import_aborted
                       (retries_count + 1; when that reaches max_retries: import_skipped,
                       reason too_many_retries)
    skip_import        any state but import_done, import_skipped  -> import_skipped (reason)
    retry_pre_import   import_aborted (aborted in default, pre_importing or unknown)
                                                                  -> pre_importing
    retry_import       import_aborted (aborted in pre_import_done or importing)
                                                                  -> importing
    align_pre_importing  import_aborted                           -> pre_importing
    align_importing      import_aborted                           -> importing
                       (the registry is already running that phase: a retry takes it over
                       instead of sending a start the registry would refuse; no retry counted)

Undoing a claim (the registry answered 429 "too many imports" to the request that the claim
was made for) is not an event of the machine but its own operation, :func:`undo_claim`: it
puts the repository back in the state it was claimed from and counts no retry.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class State(StrEnum):
    """Where a repository is in its migration."""

    DEFAULT = "default"
    PRE_IMPORTING = "pre_importing"
    PRE_IMPORT_DONE = "pre_import_done"
    IMPORTING = "importing"
    IMPORT_DONE = "import_done"
    IMPORT_ABORTED = "import_aborted"
    IMPORT_SKIPPED = "import_skipped"


class Event(StrEnum):
    """What happens to a repository; each event is one transition of the machine."""

    START_PRE_IMPORT = "start_pre_import"
    FINISH_PRE_IMPORT = "finish_pre_import"
    START_IMPORT = "start_import"
    FINISH_IMPORT = "finish_import"
    ALREADY_MIGRATED = "already_migrated"
    FINISH_IMPORT_AS = "finish_import_as"
    ABORT_IMPORT = "abort_import"
    SKIP_IMPORT = "skip_import"
    RETRY_PRE_IMPORT = "retry_pre_import"
    RETRY_IMPORT = "retry_import"
    ALIGN_PRE_IMPORTING = "align_pre_importing"
    ALIGN_IMPORTING = "align_importing"


class SkipReason(StrEnum):
    """Why a repository ended in ``import_skipped``."""

    TOO_MANY_TAGS = "too_many_tags"
    TOO_MANY_RETRIES = "too_many_retries"
    NOT_FOUND = "not_found"
    NATIVE_IMPORT = "native_import"
    MIGRATION_CANCELED = "migration_canceled"
    ROOT_NAMESPACE_IN_DENY_LIST = "root_namespace_in_deny_list"


#: The reasons an import_done repository may carry (:data:`Event.FINISH_IMPORT_AS`).
DONE_REASONS: frozenset[SkipReason] = frozenset({SkipReason.NATIVE_IMPORT, SkipReason.NOT_FOUND})
#: Events that take a reason (``skip_reason``); every other event refuses one.
_REASONED_EVENTS: frozenset[Event] = frozenset({Event.SKIP_IMPORT, Event.FINISH_IMPORT_AS})

#: States that count against the capacity setting (a migration is in flight).
ACTIVE_STATES: frozenset[State] = frozenset(
    {State.PRE_IMPORTING, State.PRE_IMPORT_DONE, State.IMPORTING}
)
#: States a run may pick a repository in: ready (default) or waiting for its retry.
STARTABLE_STATES: frozenset[State] = frozenset({State.DEFAULT, State.IMPORT_ABORTED})
#: The timestamp column each state's arrival sets (the store stamps it with now()).
ARRIVAL_COLUMN: dict[State, str] = {
    State.PRE_IMPORTING: "migration_pre_import_started_at",
    State.PRE_IMPORT_DONE: "migration_pre_import_done_at",
    State.IMPORTING: "migration_import_started_at",
    State.IMPORT_DONE: "migration_import_done_at",
    State.IMPORT_ABORTED: "migration_aborted_at",
    State.IMPORT_SKIPPED: "migration_skipped_at",
}


def is_last_retry(retries_count: int, max_retries: int) -> bool:
    """Whether the next abort of a repository with ``retries_count`` retries skips it
    (``too_many_retries``) instead of leaving it aborted."""
    return retries_count + 1 >= max_retries


#: States whose arrival is a finished step: the latest of them starts the enqueue waiting
#: time (the reference's recently_done_migration_step).
FINISHED_STATES: frozenset[State] = frozenset(
    {State.PRE_IMPORT_DONE, State.IMPORT_DONE, State.IMPORT_ABORTED, State.IMPORT_SKIPPED}
)
#: States a repository never leaves.
TERMINAL_STATES: frozenset[State] = frozenset({State.IMPORT_DONE, State.IMPORT_SKIPPED})
#: Events that move a repository from a non-active state into an active one. The store
#: routes them through its capacity-checked claim.
CLAIM_EVENTS: frozenset[Event] = frozenset(
    {
        Event.START_PRE_IMPORT,
        Event.RETRY_PRE_IMPORT,
        Event.RETRY_IMPORT,
        Event.ALIGN_PRE_IMPORTING,
        Event.ALIGN_IMPORTING,
    }
)
#: The name the store records in the events table for :func:`undo_claim`.
UNDO_CLAIM = "undo_claim"
#: The name the store records when an operator puts a repository back in ``default``
#: (``repositories requeue``): an operator's repair, not an event of the machine.
REQUEUE = "requeue"
#: The states an operator may requeue from: where a migration ended or waits for a
#: retry. Never an active state (a worker may be stepping it), nor import_done.
REQUEUE_STATES: frozenset[State] = frozenset({State.IMPORT_ABORTED, State.IMPORT_SKIPPED})

# The simple edges: event -> {from state: to state}. Abort, skip and the two retries have
# extra rules and are handled in ``apply``.
_EDGES: dict[Event, dict[State, State]] = {
    Event.START_PRE_IMPORT: {State.DEFAULT: State.PRE_IMPORTING},
    Event.FINISH_PRE_IMPORT: {State.PRE_IMPORTING: State.PRE_IMPORT_DONE},
    Event.START_IMPORT: {State.PRE_IMPORT_DONE: State.IMPORTING},
    Event.FINISH_IMPORT: {State.IMPORTING: State.IMPORT_DONE},
    Event.ALREADY_MIGRATED: {
        State.DEFAULT: State.IMPORT_DONE,
        State.PRE_IMPORT_DONE: State.IMPORT_DONE,
        State.IMPORT_ABORTED: State.IMPORT_DONE,
    },
    Event.ALIGN_PRE_IMPORTING: {State.IMPORT_ABORTED: State.PRE_IMPORTING},
    Event.ALIGN_IMPORTING: {State.IMPORT_ABORTED: State.IMPORTING},
}
# import_aborted -> which retry, by the state the repository was aborted in. ``None``
# (unknown, e.g. a row written by hand) starts over with the pre-import, which is always safe.
_RETRY_BY_ABORTED_IN: dict[State | None, Event] = {
    None: Event.RETRY_PRE_IMPORT,
    State.DEFAULT: Event.RETRY_PRE_IMPORT,
    State.PRE_IMPORTING: Event.RETRY_PRE_IMPORT,
    State.PRE_IMPORT_DONE: Event.RETRY_IMPORT,
    State.IMPORTING: Event.RETRY_IMPORT,
}
_RETRY_TARGET = {Event.RETRY_PRE_IMPORT: State.PRE_IMPORTING, Event.RETRY_IMPORT: State.IMPORTING}
# The claims that undo_claim may reverse: (claimed state, state claimed from).
_UNDOABLE: frozenset[tuple[State, State]] = frozenset(
    {
        (State.PRE_IMPORTING, State.DEFAULT),
        (State.PRE_IMPORTING, State.IMPORT_ABORTED),
        (State.IMPORTING, State.IMPORT_ABORTED),
        (State.IMPORTING, State.PRE_IMPORT_DONE),
    }
)


class InvalidTransition(ValueError):
    """The event is not allowed in that state (or lacks/has a skip reason wrongly)."""

    def __init__(self, state: State, event: Event | str, why: str = "") -> None:
        self.state = state
        self.event = event
        message = f"{event} is not allowed in state {state}"
        super().__init__(f"{message}: {why}" if why else message)


@dataclass(frozen=True, kw_only=True)
class Transition:
    """The outcome of one event: the values the store writes.

    :param event: the event applied (or :data:`UNDO_CLAIM`).
    :param from_state: the state before.
    :param to_state: the state after.
    :param retries_count: the repository's retries count after.
    :param aborted_in_state: the value of ``migration_aborted_in_state`` after (set by an
        abort, carried over otherwise).
    :param skipped_reason: the skip reason when ``to_state`` is import_skipped, else None.
    """

    event: str
    from_state: State
    to_state: State
    retries_count: int
    aborted_in_state: State | None
    skipped_reason: SkipReason | None


def allowed_retry(aborted_in_state: State | None) -> Event:
    """The retry event for a repository aborted in ``aborted_in_state``."""
    return _RETRY_BY_ABORTED_IN[aborted_in_state]


def apply(
    state: State,
    event: Event,
    *,
    retries_count: int,
    max_retries: int,
    aborted_in_state: State | None = None,
    skip_reason: SkipReason | None = None,
) -> Transition:
    """Apply ``event`` to a repository in ``state``.

    :param state: the repository's current state.
    :param event: the event to apply.
    :param retries_count: the repository's current retries count.
    :param max_retries: the setting; the abort that brings the count to it skips instead.
    :param aborted_in_state: the repository's ``migration_aborted_in_state`` (decides which
        retry an aborted repository may take; carried over by other events).
    :param skip_reason: required by ``skip_import``, refused by every other event.
    :raises InvalidTransition: the pair is not allowed.
    """
    state, event = State(state), Event(event)
    if (skip_reason is not None) != (event in _REASONED_EVENTS):
        why = (
            f"{event} needs a skip reason"
            if skip_reason is None
            else "only skip_import and finish_import_as take a reason"
        )
        raise InvalidTransition(state, event, why)

    def to(
        target: State,
        *,
        retries: int = retries_count,
        aborted_in: State | None = aborted_in_state,
        reason: SkipReason | None = None,
    ) -> Transition:
        return Transition(
            event=event,
            from_state=state,
            to_state=target,
            retries_count=retries,
            aborted_in_state=aborted_in,
            skipped_reason=reason,
        )

    if event in _EDGES:
        target = _EDGES[event].get(state)
        if target is None:
            raise InvalidTransition(state, event)
        return to(target)
    if event is Event.ABORT_IMPORT:
        if state not in ACTIVE_STATES:
            raise InvalidTransition(state, event, "only an active migration can be aborted")
        retries = retries_count + 1
        if is_last_retry(retries_count, max_retries):
            return to(
                State.IMPORT_SKIPPED,
                retries=retries,
                aborted_in=state,
                reason=SkipReason.TOO_MANY_RETRIES,
            )
        return to(State.IMPORT_ABORTED, retries=retries, aborted_in=state)
    if event is Event.SKIP_IMPORT or event is Event.FINISH_IMPORT_AS:
        if state in TERMINAL_STATES:
            raise InvalidTransition(state, event, "the migration has already ended")
        assert skip_reason is not None
        if event is Event.SKIP_IMPORT:
            return to(State.IMPORT_SKIPPED, reason=SkipReason(skip_reason))
        if SkipReason(skip_reason) not in DONE_REASONS:
            raise InvalidTransition(state, event, f"{skip_reason} is not a reason to be done")
        return to(State.IMPORT_DONE, reason=SkipReason(skip_reason))
    # retry_pre_import / retry_import
    if state is not State.IMPORT_ABORTED:
        raise InvalidTransition(state, event, "only an aborted migration is retried")
    aborted_in = State(aborted_in_state) if aborted_in_state is not None else None
    if allowed_retry(aborted_in) is not event:
        raise InvalidTransition(
            state, event, f"it was aborted in {aborted_in}; use {allowed_retry(aborted_in)}"
        )
    return to(_RETRY_TARGET[event])


def can_undo(state: State, claimed_from: State) -> bool:
    """Whether ``claimed_from -> state`` is a claim :func:`undo_claim` may reverse."""
    return (State(state), State(claimed_from)) in _UNDOABLE


def undo_claim(
    state: State, *, claimed_from: State, retries_count: int, aborted_in_state: State | None
) -> Transition:
    """Put a just-claimed repository back where it was claimed from, counting no retry.

    :param state: the repository's current (claimed) state.
    :param claimed_from: the state the claim moved it from.
    :param retries_count: carried over unchanged.
    :param aborted_in_state: carried over unchanged.
    :raises InvalidTransition: ``(state, claimed_from)`` is not a claim.
    """
    state, claimed_from = State(state), State(claimed_from)
    if not can_undo(state, claimed_from):
        raise InvalidTransition(state, UNDO_CLAIM, f"{claimed_from} -> {state} is not a claim")
    return Transition(
        event=UNDO_CLAIM,
        from_state=state,
        to_state=claimed_from,
        retries_count=retries_count,
        aborted_in_state=aborted_in_state,
        skipped_reason=None,
    )
