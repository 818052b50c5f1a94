"""The fenced writes: claim, step and undo_claim, each one call of schema 0005's
``migration_fenced_write``.

- :meth:`~WritesMixin.claim` for the events that move a repository *into* an active state
  from outside (``start_pre_import``, ``retry_pre_import``, ``retry_import``). The function
  locks the settings row (``SELECT ... FOR UPDATE``), so claims, and only claims, are
  serialized; under that lock it counts the active repositories and refuses past the
  capacity. Every other write can only keep or lower that count, so the capacity is a hard
  bound however many run at once.
- :meth:`~WritesMixin.step` for every later event, and :meth:`~WritesMixin.undo_claim`. Both
  are fenced like a claim: the write names the state it expects and the caller's fencing
  token, and is refused when the state differs or a newer token has written the row. A
  refusal changes nothing but is recorded in ``migration_events`` with ``accepted = false``
  (by the function, under the row lock).

Fence check, refusal record, capacity check and event insert all happen in the function, so
the locks are held for the server's work only, not across client round trips; the client
computes the transition (:mod:`migration.states` is the one state machine).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from migration import metrics
from migration.states import (
    ARRIVAL_COLUMN,
    CLAIM_EVENTS,
    UNDO_CLAIM,
    Event,
    SkipReason,
    State,
    Transition,
    apply,
    undo_claim,
)
from migration.store.base import StoreBase, log
from migration.store.model import (
    Outcome,
    Repository,
    RepositoryNotFound,
    StepResult,
    StoreError,
    WriteBasis,
    _value,
)
from migration.store.sql import FENCED_WRITE, READ_FOR_WRITE


def _arrival_column(transition: Transition) -> str | None:
    """The timestamp column a transition stamps, if any.

    An undone claim returns to where it was without arriving anew: re-stamping
    migration_aborted_at or migration_pre_import_done_at would reorder the retries and
    restart the enqueue waiting time.
    """
    return ARRIVAL_COLUMN.get(transition.to_state) if transition.event != UNDO_CLAIM else None


_MISMATCH_RETRIES = 5


@dataclass(frozen=True, kw_only=True)
class _Author:
    """Who makes a fenced write: the fence it carries and what the events log records with it.

    :param token: the writer's fencing token (its lease key's create_revision).
    :param actor: who writes (actor name).
    :param message_id: the message being processed.
    :param detail: extra JSON for the events log.
    """

    token: int
    actor: str
    message_id: str | None
    detail: dict[str, Any] | None


def _transition_by(
    event: Event, *, skip_reason: SkipReason | None = None
) -> Callable[[WriteBasis, int], Transition]:
    """How ``event`` moves a repository row, given the ``max_retries`` setting."""

    def transition_of(repo: WriteBasis, max_retries: int) -> Transition:
        return apply(
            repo.migration_state, event, retries_count=repo.migration_retries_count,
            max_retries=max_retries, aborted_in_state=repo.migration_aborted_in_state,
            skip_reason=skip_reason,
        )  # fmt: skip

    return transition_of


def _write_params(
    *,
    claim: bool,
    expected_state: State,
    basis: WriteBasis,
    transition: Transition | None,
    event: str,
    author: _Author,
    prefix: str = "",
) -> dict[str, Any]:
    """The parameters of one fenced call (:func:`migration.store.sql.fenced_call`) but the
    row's id: the write of ``transition`` (None: a refusal) computed from ``basis``."""
    values = {
        "claim": claim,
        "from": expected_state.value,
        "from_retries": basis.migration_retries_count,
        "from_aborted_in": _value(basis.migration_aborted_in_state),
        "token": author.token,
        "to": _value(transition.to_state) if transition else None,
        "retries": transition.retries_count if transition else None,
        "aborted_in": _value(transition.aborted_in_state) if transition else None,
        "reason": _value(transition.skipped_reason) if transition else None,
        "arrival": _arrival_column(transition) if transition else None,
        "event": str(event),
        "actor": author.actor,
        "message_id": author.message_id,
        "detail": Jsonb(author.detail or {}),
    }
    return {prefix + name: value for name, value in values.items()} if prefix else values


class WritesMixin(StoreBase):
    """The fenced writes: claim, step, undo_claim (one server function, schema 0005)."""

    def refused_writes(self) -> int:
        """How many fenced writes this Store had refused (stale token or state changed).

        Each one is also a ``migration_events`` row with ``accepted = false``, recorded by
        the server function that refused it.
        """
        with self._refused_lock:
            return self._refused

    def claim(
        self,
        repository_id: int,
        *,
        expected_state: State,
        event: Event,
        token: int,
        actor: str,
        message_id: str | None,
        detail: dict[str, Any] | None = None,
        seen: WriteBasis | None = None,
    ) -> StepResult:
        """Move a repository into an active state, within the capacity.

        One call to ``migration_fenced_write`` (schema 0005): under the settings-row lock
        (serializes claims) and the repository row's, it checks the token and the expected
        state (a refusal is recorded), then enabled and capacity, then writes the
        transition and an event. The lock is held for the server's work only.

        :param repository_id: the repository.
        :param expected_state: the state the caller saw (``default`` or ``import_aborted``).
        :param event: ``start_pre_import``, ``retry_pre_import`` or ``retry_import``.
        :param token: the caller's fencing token (its lease key's create_revision).
        :param actor: who writes (actor name), for the events log.
        :param message_id: the message being processed, for the events log.
        :param detail: extra JSON for the events log.
        :param seen: the row as the caller read it, if it has it (a :class:`Repository`
            or a :class:`Candidate`): the transition is computed from it, which saves a
            read (the function checks it under the lock; when it no longer holds, the row
            is read again).
        :raises RepositoryNotFound: no such repository.
        :raises InvalidTransition: the event is not allowed from ``expected_state``.
        """
        event = Event(event)
        if event not in CLAIM_EVENTS:
            raise ValueError(f"{event} does not enter an active state; use step()")
        return self._fenced_write(
            repository_id, expected_state=State(expected_state), event=event, claim=True,
            author=_Author(token=token, actor=actor, message_id=message_id, detail=detail),
            transition_of=_transition_by(event), seen=seen,
        )  # fmt: skip

    def step(
        self,
        repository_id: int,
        *,
        expected_state: State,
        event: Event,
        token: int,
        actor: str,
        message_id: str | None,
        detail: dict[str, Any] | None = None,
        skip_reason: SkipReason | None = None,
        seen: WriteBasis | None = None,
    ) -> StepResult:
        """Write one fenced transition that does not enter an active state from outside.

        :param repository_id: the repository.
        :param expected_state: the state the caller saw; the write is refused otherwise.
        :param event: any event but the claim events (see :meth:`claim`).
        :param token: the caller's fencing token; refused when a newer one wrote the row.
        :param actor: who writes, for the events log.
        :param message_id: the message being processed, for the events log.
        :param detail: extra JSON for the events log.
        :param skip_reason: required with ``skip_import``.
        :param seen: the row as the caller read it (see :meth:`claim`); an abort reads
            the row anyway (it needs the ``max_retries`` setting).
        :raises RepositoryNotFound: no such repository.
        :raises InvalidTransition: the event is not allowed from ``expected_state``.
        """
        event = Event(event)
        if event in CLAIM_EVENTS:
            raise ValueError(f"{event} enters an active state; use claim() (capacity check)")
        reason = SkipReason(skip_reason) if skip_reason is not None else None
        return self._fenced_write(
            repository_id, expected_state=State(expected_state), event=event, claim=False,
            author=_Author(token=token, actor=actor, message_id=message_id, detail=detail),
            transition_of=_transition_by(event, skip_reason=reason),
            seen=seen if event is not Event.ABORT_IMPORT else None,
        )  # fmt: skip

    def undo_claim(
        self,
        repository_id: int,
        *,
        expected_state: State,
        claimed_from: State,
        token: int,
        actor: str,
        message_id: str | None,
        detail: dict[str, Any] | None = None,
        seen: WriteBasis | None = None,
    ) -> StepResult:
        """Put a claimed repository back (the registry said 429), counting no retry. Fenced.

        :param expected_state: the claimed state (``pre_importing`` or ``importing``).
        :param claimed_from: the state the claim came from (``StepResult.transition.from_state``).
        :param token: the caller's fencing token.
        :param seen: the row as the caller read it (see :meth:`claim`).
        :raises InvalidTransition: ``claimed_from -> expected_state`` is not a claim.
        """
        back_to = State(claimed_from)
        return self._fenced_write(
            repository_id, expected_state=State(expected_state), event=UNDO_CLAIM, claim=False,
            author=_Author(token=token, actor=actor, message_id=message_id, detail=detail),
            transition_of=lambda repo, _max_retries: undo_claim(
                repo.migration_state, claimed_from=back_to,
                retries_count=repo.migration_retries_count,
                aborted_in_state=repo.migration_aborted_in_state,
            ),
            seen=seen,
        )  # fmt: skip

    def _fenced_write(
        self,
        repository_id: int,
        *,
        expected_state: State,
        event: str,
        claim: bool,
        author: _Author,
        transition_of: Callable[[WriteBasis, int], Transition],
        seen: WriteBasis | None,
    ) -> StepResult:
        """A fenced write: one ``migration_fenced_write`` call (schema 0005), after a read.

        The transition is computed here (migration/states.py is the one state machine)
        from the row as last read, and the function writes it only when the locked row
        still holds what it was computed from. When the row shows the write fenced out,
        the function is asked to refuse it: it records the refusal under the row lock.
        When the row moved in between (``mismatch``), it is read again.

        :param event: the event name the events log records (a refusal's too).
        :param transition_of: the transition from a row and the ``max_retries`` setting.
        :param seen: the row as the caller read it, used instead of the first read when
            it is in ``expected_state``.
        """
        with self._connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            repo: WriteBasis | None = (
                seen if seen is not None and seen.migration_state is expected_state else None
            )
            max_retries = 1  # only an abort needs the setting, and an abort reads the row
            for _attempt in range(_MISMATCH_RETRIES):
                if repo is None:
                    row = cur.execute(READ_FOR_WRITE, (repository_id,)).fetchone()
                    if row is None:
                        raise RepositoryNotFound(f"no repository with id {repository_id}")
                    max_retries = int(row.pop("settings_max_retries") or 1)
                    repo = Repository.from_row(**row)
                transition: Transition | None = None
                if repo.fencing_token <= author.token and repo.migration_state is expected_state:
                    transition = transition_of(repo, max_retries)  # may raise InvalidTransition
                written = cur.execute(
                    FENCED_WRITE,
                    {
                        "id": repository_id,
                        **_write_params(
                            claim=claim,
                            expected_state=expected_state,
                            basis=repo,
                            transition=transition,
                            event=event,
                            author=author,
                        ),
                    },
                ).fetchone()
                assert written is not None
                result = self._written(
                    repository_id, written, transition, event, expected_state, author
                )
                if result is None:
                    repo = None  # the row moved since it was read: read it again
                    continue
                return result
        raise StoreError(
            f"repository {repository_id} changed under {_MISMATCH_RETRIES} fenced writes in a row"
        )

    def _written(  # noqa: PLR0917 - one call's answer and what it was asked
        self,
        repository_id: int,
        row: dict[str, Any],
        transition: Transition | None,
        event: str,
        expected_state: State,
        author: _Author,
    ) -> StepResult | None:
        """The function's answer ``row`` (outcome and the repository's columns) as a
        result; None for ``mismatch`` (the row moved since it was read)."""
        outcome = row.pop("outcome")
        if outcome == "not_found":
            raise RepositoryNotFound(f"no repository with id {repository_id}")
        if outcome == "mismatch":
            return None
        result = Repository.from_row(**row)
        if outcome in ("claimed", "stepped"):
            return StepResult(outcome=Outcome(outcome), repository=result, transition=transition)
        if outcome in (Outcome.STALE_TOKEN, Outcome.STATE_CHANGED):
            self._count_refusal(result, Outcome(outcome), event, expected_state, author)
        return StepResult(outcome=Outcome(outcome), repository=result)

    def _count_refusal(
        self,
        repo: Repository,
        outcome: Outcome,
        event: str,
        expected_state: State,
        author: _Author,
    ) -> None:
        """Count and log a refusal the function recorded."""
        with self._refused_lock:
            self._refused += 1
        metrics.FENCED_WRITES_REFUSED.labels(outcome.value).inc()
        log.warning(
            "fenced_write_refused", repository_id=repo.id, migration_event=str(event),
            token=author.token, actor=author.actor, message_id=author.message_id,
            reason=outcome.value, expected_state=expected_state.value,
            row_state=repo.migration_state.value, row_token=repo.fencing_token,
        )  # fmt: skip
