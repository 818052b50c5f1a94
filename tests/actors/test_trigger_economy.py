"""Triggers only where they can help, and still no stall (invariants 5 and 6), for real.

A step that keeps its repository in flight (pre_import_complete -> final import started)
frees no capacity and runs no enqueuer; a notification's step that frees a slot does one
enqueuer run in place, with no trigger; a run that has just filled the last free slot does
not re-enqueue itself. The scheduler publishes once at start and then not for
ten minutes, so the migration finishing shows that no trigger was missing while capacity
was free.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from devtools.launcher import LocalMigration
from migration.states import ACTIVE_STATES, State
from migration.store import Store
from tests.actors.conftest import all_terminal, seed_spread, stale_accepted_writes, wait_until

_ACTIVE = {state.value for state in ACTIVE_STATES}
_TRIGGER_EVENTS = ("enqueue_triggered", "enqueue_collapsed")


def _worker_lines(run: LocalMigration, workers: int) -> list[dict[str, Any]]:
    return [line for i in range(workers) for line in run.log_events(f"worker-{i}")]


def test_only_freed_capacity_triggers_and_the_migration_never_stalls(
    clean_store: Store, database_url: str, make_migration: Callable[..., LocalMigration]
) -> None:
    capacity = 3
    ids = seed_spread(clean_store, 40)  # plain, native, missing, fail-once, fail-always
    clean_store.update_settings(
        capacity=capacity, enqueue_interval=600, guard_interval=600, max_step_duration=600
    )
    run = make_migration(
        workers=2,
        threads=4,
        simulator_args=["--pre-import-seconds", "0.05", "0.2", "--import-seconds", "0.05", "0.2"],
    )
    run.start()
    # No periodic trigger after the first: only the runs' and notifications' own triggers
    # move the migration. A trigger missing while capacity is free stalls it for 10 minutes.
    wait_until(lambda: all_terminal(clean_store), timeout=120, interval=0.5, what="all terminal")
    report = run.report()
    lines = _worker_lines(run, 2)
    run.stop()

    counts = clean_store.counts_by_state()
    assert counts.get(State.IMPORT_DONE, 0) + counts.get(State.IMPORT_SKIPPED, 0) == len(ids)
    assert report["max_concurrent_imports"] <= capacity
    assert stale_accepted_writes(database_url) == []

    # Notifications: one run in place per step out of the active states (no trigger, no
    # message), none for the others.
    notifications = [line for line in lines if line["event"] == "registry_notification_handled"]
    after = [(n["step_outcome"], n["container_repository_migration_state"]) for n in notifications]
    freeing = [n for n in after if n[0] != "ignored" and n[1] not in _ACTIVE]
    kept_active = [n for n in after if n[1] in _ACTIVE]
    assert kept_active, "no pre_import_complete -> final import step was seen"
    runs = [line for line in lines if line["event"] == "enqueue_next_migration"]
    in_place = [r for r in runs if r["source"] == "notification"]
    assert all(r["actor"] == "handle_registry_notification" for r in in_place)
    assert len(in_place) == len(freeing), (len(in_place), len(freeing))
    notification_triggers = [
        line
        for line in lines
        if line["event"] in _TRIGGER_EVENTS and line.get("source") == "notification"
    ]
    assert notification_triggers == []  # only a run in place that failed triggers one

    # Runs: the one that filled the last free slot it saw sends no re-enqueue.
    self_triggered = {
        line.get("message_id")
        for line in lines
        if line["event"] in _TRIGGER_EVENTS and line.get("source") == "self"
    }
    filled = [
        r
        for r in runs
        if r["job_status"] == "started" and r["in_flight"] + 1 >= r["max_capacity_setting"]
    ]
    assert filled, "no run filled the capacity"
    assert all(r.get("message_id") not in self_triggered for r in filled)
    others = [r for r in runs if r["job_status"] == "started" and r not in filled]
    assert all(r.get("message_id") in self_triggered for r in others)
    # ... and the others re-enqueue with the free slots they saw as the limit of pending
    # runs: no more runs queued than there are slots for them.
    started = {r.get("message_id"): r for r in others}
    limits = [
        (line["pending_limit"], started[line.get("message_id")])
        for line in lines
        if line["event"] in _TRIGGER_EVENTS
        and line.get("source") == "self"
        and line.get("message_id") in started
    ]
    assert limits
    assert all(
        limit == run["max_capacity_setting"] - run["in_flight"] - 1 for limit, run in limits
    ), limits
