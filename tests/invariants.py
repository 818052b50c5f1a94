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
    """

    most: int = 0
    over_capacity: list[AcceptedEvent] = field(default_factory=list)
    claims: int = 0
    undone: int = 0
    longest_stall_s: float = 0.0
    stall_from: datetime | None = None


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
