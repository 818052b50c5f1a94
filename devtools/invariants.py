"""Checks of DESIGN.md's invariants from what a run leaves behind: the events table and logs.

Each function reads the real PostgreSQL database of a run (``migration_events``, where every
accepted and refused fenced write is recorded) or the JSON log lines of its processes, and
returns what it found; the tests assert on it and print it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg

from migration.migrator import AbortCause
from migration.states import ACTIVE_STATES, State
from migration.store import Store

TERMINAL = (State.IMPORT_DONE, State.IMPORT_SKIPPED)
_ACTIVE = {state.value for state in ACTIVE_STATES}


def all_terminal(store: Store) -> bool:
    """True when every repository is import_done or import_skipped."""
    counts = store.counts_by_state()
    return sum(n for state, n in counts.items() if state not in TERMINAL) == 0


def stale_accepted_writes(database_url: str) -> list[tuple[Any, ...]]:
    """Accepted writes whose token is older than an earlier accepted write of the same row.

    Such a write is what fencing forbids: a holder whose lease had passed to someone else
    writing after them. Empty when invariant 1 held.
    """
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            "SELECT repository_id, id, token, newest_before FROM ("
            " SELECT repository_id, id, token, max(token) OVER (PARTITION BY repository_id"
            "  ORDER BY id ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS newest_before"
            " FROM migration_events WHERE accepted) w"
            " WHERE token < newest_before"
        ).fetchall()


@dataclass(frozen=True)
class AcceptedEvent:
    """One accepted row of ``migration_events`` (what the replays need)."""

    id: int
    repository_id: int
    from_state: str
    to_state: str
    event: str
    token: int
    at: datetime


def accepted_events(database_url: str) -> list[AcceptedEvent]:
    """Every accepted write, in id order (claims are serialized, so their ids are too)."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT id, repository_id, from_state, to_state, event, token, at"
            " FROM migration_events WHERE accepted ORDER BY id"
        ).fetchall()
    return [AcceptedEvent(*row) for row in rows]


@dataclass
class InFlightReplay:
    """The in-flight count replayed from the events table.

    :param most: the highest number of repositories active at once.
    :param over_capacity: events after which more than ``capacity`` were active.
    :param claims: accepted claims (writes into an active state from outside it).
    :param undone: claims undone because the registry answered 429.
    :param longest_stall_s: the longest time with free capacity and no new start (a claim
        that was not undone), between the first and the last start.
    :param stall_from: when that stall began.
    :param stalls: ``(from, to)`` of every such stall (for :func:`stall_after_faults`).
    """

    most: int = 0
    over_capacity: list[AcceptedEvent] = field(default_factory=list)
    claims: int = 0
    undone: int = 0
    longest_stall_s: float = 0.0
    stall_from: datetime | None = None
    stalls: list[tuple[datetime, datetime]] = field(default_factory=list)


def replay_in_flight(events: Iterable[AcceptedEvent], *, capacity: int) -> InFlightReplay:
    """Replay accepted writes in id order: how many repositories were active after each.

    An exit that commits after a later claim counted its repository still active, and its
    id is then after the claim's too (the claim inserts its event after counting), so the
    replay never shows fewer active repositories than a claim saw.

    :param events: accepted writes in id order (:func:`accepted_events`).
    :param capacity: the capacity setting during the run.
    """
    result = InFlightReplay()
    events = list(events)
    undone_tokens = {(e.repository_id, e.token) for e in events if e.event == "undo_claim"}
    active: set[int] = set()
    free_since: datetime | None = None  # capacity free and no start since then
    for event in events:
        was_active = event.from_state in _ACTIVE
        is_active = event.to_state in _ACTIVE
        if is_active:
            active.add(event.repository_id)
        else:
            active.discard(event.repository_id)
        started = (not was_active) and is_active
        if started:
            result.claims += 1
            if (event.repository_id, event.token) in undone_tokens:
                result.undone += 1
                started = False  # the registry refused it: no start
        if len(active) > capacity:
            result.over_capacity.append(event)
        result.most = max(result.most, len(active))
        if started:
            if free_since is not None:
                result.stalls.append((free_since, event.at))
                gap = (event.at - free_since).total_seconds()
                if gap > result.longest_stall_s:
                    result.longest_stall_s, result.stall_from = gap, free_since
            free_since = event.at if len(active) < capacity else None
        elif free_since is None and len(active) < capacity and result.claims:
            free_since = event.at
    return result


def throughput_per_minute(database_url: str) -> tuple[int, float]:
    """Terminal repositories and the span (s) from the first to the last accepted write."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM container_repositories"
            "        WHERE migration_state IN ('import_done', 'import_skipped')),"
            " extract(epoch FROM max(at) - min(at)) FROM migration_events WHERE accepted"
        ).fetchone()
    assert row is not None
    return int(row[0]), float(row[1] or 0.0)


@dataclass
class TriggerAccount:
    """What became of every enqueue trigger, from the processes' log lines.

    :param by_source: source -> outcome (triggered, collapsed, failed) -> count.
    :param triggered: message ids sent through the gate.
    :param ran: message ids an enqueuer run logged (retries of one message count once).
    :param never_ran: triggered ids with no run (lost, unless still queued at the end).
    """

    by_source: dict[str, Counter[str]] = field(default_factory=dict)
    triggered: set[str] = field(default_factory=set)
    ran: set[str] = field(default_factory=set)
    never_ran: set[str] = field(default_factory=set)


def account_triggers(lines: Iterable[Mapping[str, Any]]) -> TriggerAccount:
    """Match ``enqueue_triggered`` lines (any process) with ``enqueue_next_migration`` runs.

    :param lines: JSON log lines of every scheduler, worker and API process.
    """
    account = TriggerAccount()
    outcome_of = {
        "enqueue_triggered": "triggered",
        "enqueue_collapsed": "collapsed",
        "enqueue_trigger_failed": "failed",
    }
    for line in lines:
        event = line.get("event")
        if event in outcome_of:
            source = str(line.get("source"))
            account.by_source.setdefault(source, Counter())[outcome_of[str(event)]] += 1
            if event == "enqueue_triggered":
                account.triggered.add(str(line["triggered_message_id"]))
        elif event == "enqueue_next_migration" and line.get("message_id"):
            account.ran.add(str(line["message_id"]))
    account.never_ran = account.triggered - account.ran
    return account


# -- what each repository must end as, and why it was charged ---------------------------------


@dataclass(frozen=True)
class EndState:
    """How a repository must end.

    :param state: its final migration state.
    :param reason: its recorded reason (``migration_skipped_reason``), None for none.
    :param charged: retries charged for reasons of its own (aborts whose cause is not
        ``interrupted``); None: any number (the state and reason say enough).
    :param charged_if_undone: also accepted when a claim of the repository was undone for
        a registry fault: a start whose answer was lost (a timeout, the registry acted
        anyway) may have run the failing phase while the migrator had the claim undone;
        its failure then concerns no claim of ours and is rightly charged nothing.
    """

    state: State
    reason: str | None
    charged: int | None
    charged_if_undone: int | None = None


#: What each path marker of the simulator (``devtools.simulator``) must end as. THE table:
#: issue 12 moves native and missing to import_done with the reason recorded: change
#: their two lines here, nothing else.
END_BY_MARKER: dict[str, EndState] = {
    "plain": EndState(State.IMPORT_DONE, None, charged=0),
    # Done with the reason, as the reference's finish_import_as (issue 12).
    "native": EndState(State.IMPORT_DONE, "native_import", charged=0),
    "missing": EndState(State.IMPORT_DONE, "not_found", charged=0),
    "fail-always": EndState(State.IMPORT_SKIPPED, "too_many_retries", charged=None),
    "fail-once": EndState(State.IMPORT_DONE, None, charged=1, charged_if_undone=0),
}

#: Causes an accepted ``abort_import`` may carry: what the registry said about *this*
#: repository, a guard's finding about it, its worker's death, or an operator. A registry
#: fault is never one: it undoes the claim (``undo_claim`` with ``fault_class: registry``).
REPOSITORY_CAUSES = frozenset(cause.value for cause in AbortCause)
#: Aborts that are no fault of the repository's, so they do not count as charged retries.
EXCUSED_CAUSES = frozenset({"interrupted"})


def marker_of(path: str) -> str:
    """The simulator's path marker of ``path`` (its precedence: missing, native, then the
    pre-import failures), ``plain`` when it has none of :data:`END_BY_MARKER`'s."""
    name = path.rsplit("/", 1)[-1]
    for marker in ("missing", "native", "fail-always", "fail-once"):
        if marker in name:
            return marker
    return "plain"


@dataclass(frozen=True)
class WrongEnd:
    """A repository that did not end as its path says.

    :param path: the repository.
    :param marker: its path marker.
    :param state: its state now.
    :param reason: its recorded reason now.
    :param retries: its ``migration_retries_count``.
    :param excused: aborts of it with an excused cause (``interrupted``).
    :param expected: what it should have ended as.
    :param undone_for_registry: its claims undone for a registry fault.
    """

    path: str
    marker: str
    state: str
    reason: str | None
    retries: int
    excused: int
    expected: EndState
    undone_for_registry: int = 0


def wrong_end_states(database_url: str) -> list[WrongEnd]:
    """Repositories whose end state, reason or charged retries differ from
    :data:`END_BY_MARKER` for their path marker; empty when every one ended as it must."""
    excused = sorted(EXCUSED_CAUSES)
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT r.path, r.migration_state, r.migration_skipped_reason,"
            " r.migration_retries_count,"
            " (SELECT count(*) FROM migration_events e WHERE e.repository_id = r.id"
            "   AND e.accepted AND e.event = 'abort_import'"
            "   AND e.detail->>'cause' = ANY(%s)),"
            " (SELECT count(*) FROM migration_events e WHERE e.repository_id = r.id"
            "   AND e.accepted AND e.event = 'undo_claim'"
            "   AND e.detail->>'fault_class' = 'registry')"
            " FROM container_repositories r ORDER BY r.id",
            (excused,),
        ).fetchall()
    wrong = []
    for path, state, reason, retries, excused_aborts, undone in rows:
        marker = marker_of(path)
        expected = END_BY_MARKER[marker]
        charged = retries - excused_aborts
        allowed = {expected.charged}
        if undone and expected.charged_if_undone is not None:
            allowed.add(expected.charged_if_undone)
        if (
            state != expected.state.value
            or reason != expected.reason
            or (expected.charged is not None and charged not in allowed)
        ):
            wrong.append(
                WrongEnd(
                    path, marker, state, reason, retries, int(excused_aborts), expected,
                    undone_for_registry=int(undone),
                )
            )  # fmt: skip
    return wrong


@dataclass(frozen=True)
class ChargedAbort:
    """An accepted abort whose cause is not the repository's own (a retry charged wrongly).

    :param event_id: the ``migration_events`` row.
    :param path: the repository.
    :param cause: ``detail.cause`` (None when the event has none).
    :param detail: the event's whole detail.
    """

    event_id: int
    path: str
    cause: str | None
    detail: dict[str, Any]


def aborts_without_a_repository_cause(database_url: str) -> list[ChargedAbort]:
    """Replay the events: every accepted ``abort_import`` must name a cause of
    :data:`REPOSITORY_CAUSES`; the others are retries charged for what was not the
    repository's doing (a registry fault). Empty when invariant 7 held."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT e.id, r.path, e.detail FROM migration_events e"
            " JOIN container_repositories r ON r.id = e.repository_id"
            " WHERE e.accepted AND e.event = 'abort_import' ORDER BY e.id"
        ).fetchall()
    found = []
    for event_id, path, detail in rows:
        cause = detail.get("cause") if isinstance(detail, dict) else None
        if cause not in REPOSITORY_CAUSES:
            found.append(ChargedAbort(int(event_id), str(path), cause, dict(detail or {})))
    return found


def registry_fault_undos(database_url: str) -> int:
    """Accepted ``undo_claim`` events recorded as a registry fault (no retry charged)."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM migration_events WHERE accepted AND event = 'undo_claim'"
            " AND detail->>'fault_class' = 'registry'"
        ).fetchone()
    return int(row[0]) if row else 0


def stall_after_faults(
    stalls: Iterable[tuple[datetime, datetime]],
    faults: Iterable[tuple[datetime, datetime]],
) -> tuple[float, datetime | None]:
    """The longest stall, each measured from the end of the faults it overlaps.

    A stall (capacity free, no start) that begins before or during a fault counts only from
    that fault's end: during a registry outage the migration *must* stall; what is bounded
    is how long it takes to go on once the fault is over.

    :param stalls: ``(from, to)`` of each stall (:attr:`InFlightReplay.stalls`).
    :param faults: ``(from, to)`` of each injected fault, wall clock.
    :returns: the longest such stall in seconds, and when it was counted from.
    """
    windows = sorted(faults)
    longest, longest_from = 0.0, None
    for began, ended in stalls:
        counted_from = began
        for fault_from, fault_to in windows:
            if fault_from <= ended and fault_to >= counted_from:
                counted_from = max(counted_from, fault_to)
        seconds = (ended - counted_from).total_seconds()
        if seconds > longest:
            longest, longest_from = seconds, counted_from
    return longest, longest_from
