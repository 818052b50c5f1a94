"""Fenced writes sent together, in one round trip: a claim or steps with the read that checks
them (``claim_as_listed``, ``steps_as_seen``), and two steps in a row (``step_twice``).

Each write is still one call of ``migration_fenced_write`` (schema 0005), with its locks,
checks and refusal records; only the round trips are fewer. A write is called only when the
one before it was written, and the first, when the row is read in the same statement, only
when the row still shows what the caller computed the writes from: otherwise nothing is
written or recorded and the caller decides again on the row as read, as after a read of its
own. The statements are built by :func:`migration.store.sql.fenced_writes`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from psycopg.rows import dict_row

from migration.states import CLAIM_EVENTS, Event, State, Transition
from migration.store.model import (
    Candidate,
    Repository,
    Seen,
    StepResult,
    WriteBasis,
    WrittenAsSeen,
)
from migration.store.sql import CLAIM_AS_LISTED, FENCED_WRITE_TWICE, SELECT_ONE, STEPS_AS_SEEN
from migration.store.writes import WritesMixin, _Author, _transition_by, _write_params


class _Basis(NamedTuple):
    """A row as a write before it in the same round trip leaves it (a :class:`WriteBasis`)."""

    migration_state: State
    migration_retries_count: int
    migration_aborted_in_state: State | None
    fencing_token: int


@dataclass(frozen=True)
class _Planned:
    """One write of a statement: computed from ``basis``, expecting ``expected_state``."""

    expected_state: State
    basis: WriteBasis
    transition: Transition
    event: Event
    author: _Author
    claim: bool = False


def _plan(
    basis: WriteBasis, events: Sequence[Event], *, author: _Author, claim: bool = False
) -> list[_Planned]:
    """The writes of ``events`` in turn from ``basis``, each from the row the one before
    leaves (the author's detail goes with the first only)."""
    planned = []
    for event in events:
        if event is Event.ABORT_IMPORT:
            raise ValueError("an abort reads the max_retries setting: write it alone")
        transition = _transition_by(event)(basis, 1)  # may raise InvalidTransition
        planned.append(_Planned(basis.migration_state, basis, transition, event, author, claim))
        basis = _Basis(
            transition.to_state, transition.retries_count, transition.aborted_in_state,
            author.token,
        )  # fmt: skip
        author = _Author(
            token=author.token, actor=author.actor, message_id=author.message_id, detail=None
        )
    return planned


class _Answer(NamedTuple):
    """What a statement of writes sent together answered.

    :param read: the row as read (None: no read made, or no such row).
    :param results: the writes' results in order, up to the first not written.
    :param moved: a write was called and found the row moved since it was computed
        (``mismatch``): nothing written from there on.
    """

    read: Repository | None
    results: list[StepResult]
    moved: bool


class TogetherMixin(WritesMixin):
    """Fenced writes sent together (see the module doc)."""

    def _send_together(
        self, repository_id: int, query: str, planned: list[_Planned], params: dict[str, Any]
    ) -> _Answer:
        """Send ``query`` with the planned writes' parameters (``w<k>_*``) and ``params``."""
        params = {"id": repository_id, **params}
        for k, write in enumerate(planned):
            params.update(
                _write_params(
                    claim=write.claim, expected_state=write.expected_state, basis=write.basis,
                    transition=write.transition, event=write.event, author=write.author,
                    prefix=f"w{k}_",
                )
            )  # fmt: skip
        with self._connection() as conn:
            rows = conn.cursor(row_factory=dict_row).execute(query, params).fetchall()
        read: Repository | None = None
        results: list[StepResult] = []
        for row in rows:
            n = row.pop("n")
            if n < 0:
                del row["outcome"]
                read = Repository.from_row(**row)
                continue
            write = planned[n]
            result = self._written(
                repository_id, row, write.transition, write.event, write.expected_state,
                write.author,
            )  # fmt: skip
            if result is None:
                return _Answer(read, results, moved=True)
            results.append(result)
        return _Answer(read, results, moved=False)

    def claim_as_listed(
        self,
        candidate: Candidate,
        *,
        event: Event,
        max_tags_count: int,
        token: int,
        actor: str,
        message_id: str | None,
    ) -> WrittenAsSeen:
        """Read a candidate's row and claim it in one round trip, when the row still shows
        what the candidates' list did (state, retries, aborted-in state) and has at most
        ``max_tags_count`` tags (0: no bound). Otherwise nothing is written or recorded
        (the list was stale, or the repository is to be skipped).

        The claim is :meth:`claim`'s: the same function, locks and checks, so a row that
        moves between this statement's read and the function's lock is refused and
        recorded as with any claim.

        :param candidate: the list's entry; the claim is computed from it.
        :param event: the claim event (``start_pre_import``).
        :param max_tags_count: the ``max_tags_count`` setting.
        :param token: the caller's fencing token.
        :param actor: who writes, for the events log.
        :param message_id: the message being processed, for the events log.
        """
        event = Event(event)
        if event not in CLAIM_EVENTS:
            raise ValueError(f"{event} does not enter an active state")
        author = _Author(token=token, actor=actor, message_id=message_id, detail=None)
        planned = _plan(candidate, [event], author=author, claim=True)
        answer = self._send_together(
            candidate.id, CLAIM_AS_LISTED, planned, {"max_tags": max_tags_count}
        )
        results = answer.results
        if answer.moved:  # between the read and the lock: claim() reads again
            results = [
                self.claim(
                    candidate.id, expected_state=candidate.migration_state, event=event,
                    token=token, actor=actor, message_id=message_id,
                )
            ]  # fmt: skip
        return WrittenAsSeen(results[-1].repository if results else answer.read, results)

    def steps_as_seen(
        self,
        repository_id: int,
        *,
        path: str,
        seen: Seen,
        events: Sequence[Event],
        token: int,
        actor: str,
        message_id: str | None,
        detail: dict[str, Any] | None = None,
    ) -> WrittenAsSeen:
        """Read a repository's row and write ``events`` (one or two steps, each from the
        state the one before leads to) in one round trip, when the row still has ``path``
        and the columns ``seen`` (as the notification's API read them). Otherwise nothing
        is written or recorded.

        :param detail: extra JSON for the first event's log entry.
        """
        author = _Author(token=token, actor=actor, message_id=message_id, detail=detail)
        planned = _plan(seen, [Event(e) for e in events], author=author)
        checks = {f"seen_{name}": value for name, value in seen.as_message().items()}
        answer = self._send_together(
            repository_id, STEPS_AS_SEEN[len(planned)], planned, {"path": path, **checks}
        )
        if answer.moved and not answer.results:
            # As seen when read, moved before the lock: the caller decides on it afresh.
            return WrittenAsSeen(self._one(SELECT_ONE, (repository_id,)), [])
        results = answer.results + (self._rest(repository_id, planned, answer.results)
                                    if answer.moved else [])  # fmt: skip
        return WrittenAsSeen(results[-1].repository if results else answer.read, results)

    def step_twice(
        self,
        repository_id: int,
        *,
        expected_state: State,
        first: Event,
        then: Event,
        token: int,
        actor: str,
        message_id: str | None,
        detail: dict[str, Any] | None = None,
        seen: WriteBasis,
    ) -> list[StepResult]:
        """Two :meth:`step` writes of one row in one round trip: ``first``, then ``then``
        from the state ``first`` leads to, only when ``first`` was written.

        :param detail: extra JSON for the first event's log entry.
        :param seen: the row as the caller read it; when it is not in ``expected_state``,
            or moved before the write, the steps are made one by one (as :meth:`step` does).
        :returns: the first step's result, and the second's when the first was written.
        """
        author = _Author(token=token, actor=actor, message_id=message_id, detail=detail)
        events = [Event(first), Event(then)]
        if seen.migration_state is not expected_state or seen.fencing_token > token:
            return self._one_by_one(repository_id, events, author, expected_state, seen)
        planned = _plan(seen, events, author=author)
        answer = self._send_together(repository_id, FENCED_WRITE_TWICE, planned, {})
        if not answer.moved:
            return answer.results
        return answer.results + self._rest(repository_id, planned, answer.results)

    def _rest(
        self, repository_id: int, planned: list[_Planned], done: list[StepResult]
    ) -> list[StepResult]:
        """The planned steps after ``done``, one by one, the first from the row as it is."""
        rest = planned[len(done) :]
        after = done[-1].repository if done else None
        return self._one_by_one(
            repository_id, [w.event for w in rest], rest[0].author,
            after.migration_state if after else rest[0].expected_state, after,
        )  # fmt: skip

    def _one_by_one(
        self,
        repository_id: int,
        events: list[Event],
        author: _Author,
        expected_state: State,
        seen: WriteBasis | None,
    ) -> list[StepResult]:
        """``events`` as :meth:`step` calls, each from the row the one before left, up to
        the first not written (the author's detail goes with the first only)."""
        results: list[StepResult] = []
        for event in events:
            result = self.step(
                repository_id, expected_state=expected_state, event=event, token=author.token,
                actor=author.actor, message_id=author.message_id, detail=author.detail,
                seen=seen,
            )  # fmt: skip
            results.append(result)
            if not result.ok:
                break
            seen = result.repository
            expected_state = seen.migration_state
            author = _Author(
                token=author.token, actor=author.actor, message_id=author.message_id, detail=None
            )
        return results
