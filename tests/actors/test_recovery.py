"""A worker killed mid-run delays only its own repository; both lease scopes finish."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from datetime import datetime

import httpx
import pytest

from devtools.launcher import LocalMigration
from leases import EtcdClient, HolderInfo
from migration.config import Config
from migration.keys import leases_prefix
from migration.states import State
from migration.store import MigrationEvent, Repository, Store
from tests.actors.conftest import (
    TERMINAL,
    all_terminal,
    seed_spread,
    stale_accepted_writes,
    wait_until,
)


def _held_by_enqueuer(client: EtcdClient, prefix: str) -> list[tuple[int, HolderInfo]]:
    held = []
    for kv in client.get_prefix(leases_prefix(prefix)):
        holder = HolderInfo.from_json(kv.value)
        if holder.actor == "enqueue_next_migration" and "container_repository/" in kv.key:
            held.append((int(kv.key.rsplit("/", 1)[1]), holder))
    return held


def _worker_in_its_start_call(
    run: LocalMigration,
    client: EtcdClient,
    store: Store,
    repository_id: int,
    *,
    retries: int = 0,
) -> tuple[int] | None:
    """(index,) of the worker whose enqueuer run holds ``repository_id``'s lease with the
    repository pre_importing after ``retries`` charged retries (in its start call), or None.
    A tuple, so that worker 0 counts as found."""
    repository = store.get(repository_id)
    if repository is None:
        return None
    if (repository.migration_state, repository.migration_retries_count) != (
        State.PRE_IMPORTING, retries,
    ):  # fmt: skip
        return None
    holder = dict(_held_by_enqueuer(client, run.env["MIGRATOR_ETCD_PREFIX"])).get(repository_id)
    index = None if holder is None else run.worker_index_of(holder.pid)
    return None if index is None else (index,)


def _kill_inside_its_start_call(
    run: LocalMigration,
    store: Store,
    repository_id: int,
    *,
    after: float,
    retries: int = 0,
    then_fault: dict[str, object] | None = None,
) -> int:
    """SIGKILL the worker whose enqueuer run is in ``repository_id``'s start call (after
    ``retries`` charged retries), ``after`` seconds into it; with ``then_fault`` set on the
    registry simulator just before the kill. Returns the worker's index."""
    with Config.from_env(run.env).etcd_client() as client:
        (index,) = wait_until(
            lambda: _worker_in_its_start_call(run, client, store, repository_id, retries=retries),
            timeout=60, interval=0.02, what="the claim",
        )  # fmt: skip
    time.sleep(after)
    if then_fault is not None:
        httpx.post(f"{run.simulator_url}/simulator/config", json=then_fault).raise_for_status()
    run.kill_worker(index, signal.SIGKILL)
    return index


def _terminal(store: Store, repository_id: int, *, timeout: float) -> Repository:
    """The repository once it is terminal (AssertionError after ``timeout`` seconds)."""
    return wait_until(
        lambda: (r := store.get(repository_id)) is not None and r.migration_state in TERMINAL and r,
        timeout=timeout,
        interval=0.2,
        what=f"repository {repository_id} terminal",
    )


def _started_for_a_kill(
    store: Store,
    make_migration: Callable[..., LocalMigration],
    *,
    ttl: int,
    slow_start_seconds: float,
) -> LocalMigration:
    """A running migration (2 workers x 2 threads, lease TTL ``ttl``) for a kill inside a
    start call: its guard waits 300 s (only a recovery can be quick), its registry breaker
    and backoff are short (for a registry fault during the recovery), and its registry
    decides a ``slow-decide`` start ``slow_start_seconds`` late."""
    store.update_settings(
        capacity=4, enqueue_interval=0.5, guard_interval=1, max_step_duration=300,
        registry_breaker_max_window=2, registry_backoff_max=2,
    )  # fmt: skip
    run = make_migration(workers=2, threads=2, lease_ttl=ttl)
    run.start()
    httpx.post(
        f"{run.simulator_url}/simulator/config", json={"slow_start_seconds": slow_start_seconds}
    ).raise_for_status()
    return run


def _recovery_outcomes(run: LocalMigration, worker: str, repository_id: int) -> list[object]:
    """The step outcomes of ``worker``'s recoveries of ``repository_id``, in order."""
    return [
        line["step_outcome"]
        for line in run.log_events(worker, "interrupted_step_reconciled")
        if line.get("container_repository_id") == repository_id
    ]


def test_sigkill_worker_mid_run_delays_only_its_repository(
    clean_store: Store, database_url: str, make_migration: Callable[..., LocalMigration]
) -> None:
    seed_spread(clean_store, 20, seed=11)
    clean_store.update_settings(
        capacity=6, enqueue_interval=0.5, guard_interval=1, max_step_duration=4
    )
    # Start calls take 1 s: a run holds its repository's lease that long.
    run = make_migration(workers=2, threads=3, lease_ttl=3, simulator_args=["--start-latency", "1"])
    run.start()
    prefix = run.env["MIGRATOR_ETCD_PREFIX"]
    with Config.from_env(run.env).etcd_client() as client:
        # A repository whose enqueuer run is in its registry call, in a worker we can kill.
        def victim() -> tuple[int, int] | None:
            for repository_id, holder in _held_by_enqueuer(client, prefix):
                index = run.worker_index_of(holder.pid)
                if index is not None:
                    return repository_id, index
            return None

        repository_id, index = wait_until(victim, timeout=60, interval=0.05, what="a held lease")
        victim_pid = dict(_held_by_enqueuer(client, prefix))[repository_id].pid
        starts_before = run.report()["starts_accepted"]
        run.kill_worker(index, signal.SIGKILL)
        killed_at = time.monotonic()
        assert not run.alive()[f"worker-{index}"]

        # The rest goes on at once: new starts within the TTL, not after 30 minutes.
        wait_until(
            lambda: run.report()["starts_accepted"] > starts_before + 2,
            timeout=3 + 6,
            what="other repositories starting after the kill",
        )

        # The killed holder's key goes with its lease within the TTL (3 s) + 2 s. (Not
        # asserted: "not before"; the last keep-alive before the kill is unknown.)
        def victim_key_gone() -> bool:
            holder = dict(_held_by_enqueuer(client, prefix)).get(repository_id)
            return holder is None or holder.pid != victim_pid

        wait_until(victim_key_gone, timeout=3 + 2, interval=0.05, what="the lease to expire")
        expired_after = time.monotonic() - killed_at

    # The survivor finishes everything, the victim's repository too.
    wait_until(lambda: all_terminal(clean_store), timeout=120, interval=1, what="all terminal")
    victim_repo = clean_store.get(repository_id)
    assert victim_repo is not None and victim_repo.migration_state in (
        State.IMPORT_DONE, State.IMPORT_SKIPPED,
    )  # fmt: skip
    report = run.report()
    assert report["overlapping_repositories"] == []
    assert report["max_concurrent_imports"] <= 6
    assert stale_accepted_writes(database_url) == []
    print(f"victim {repository_id}: lease gone {expired_after:.1f} s after the kill")


def test_sigkill_before_the_registry_call_is_recovered_within_the_ttl(
    clean_store: Store, database_url: str, make_migration: Callable[..., LocalMigration]
) -> None:
    """Killed between its claim and the registry's start: nothing runs at the registry and no
    notification will come. The redelivered message reconciles the repository as soon as the
    dead worker's lease expires (TTL + a poll), not when the guard finds it stale."""
    ttl = 3
    # The registry waits 3 s before deciding a slow-decide start, and starts nothing when
    # its caller is gone by then.
    run = _started_for_a_kill(clean_store, make_migration, ttl=ttl, slow_start_seconds=3)
    victim_id = clean_store.add_repository("crash/slow-decide-victim")
    # 0.5 s into the 3 s start call.
    _kill_inside_its_start_call(run, clean_store, victim_id, after=0.5)
    killed_at = time.time()

    def accepted_events() -> list[MigrationEvent]:
        return [e for e in clean_store.events(victim_id) if e.accepted]

    # The guard would need max_step_duration (300 s): only the redelivery can be this quick.
    wait_until(lambda: len(accepted_events()) >= 2, timeout=ttl + 4, interval=0.05, what="a step")
    claim, step = accepted_events()[:2]
    assert claim.event == "start_pre_import", claim
    # The registry never started it (the caller died inside the call): the claim is undone,
    # no retry charged (the worker's death is not the repository's doing).
    assert (step.event, step.actor) == ("undo_claim", "enqueue_next_migration"), step
    assert step.detail.get("fault_class") == "interrupted", step
    recovered_after = step.at.timestamp() - killed_at
    assert recovered_after <= ttl + 1.5, recovered_after
    # Retried and finished by the survivor.
    httpx.post(
        f"{run.simulator_url}/simulator/config", json={"slow_start_seconds": 0}
    ).raise_for_status()
    victim = _terminal(clean_store, victim_id, timeout=60)
    assert victim.migration_retries_count == 0, victim
    report = run.report()
    assert report["overlapping_repositories"] == []
    assert stale_accepted_writes(database_url) == []
    print(f"victim {victim_id}: stepped {recovered_after:.1f} s after the kill (TTL {ttl})")


def test_an_enqueuer_recovery_the_registry_kept_from_finishing_is_retried(
    clean_store: Store, database_url: str, make_migration: Callable[..., LocalMigration]
) -> None:
    """Killed between its claim and the registry's start, as above, but the registry cannot
    answer the redelivered message's recovery: the claim stays. The message is retried and
    its retry reconciles once the registry answers again (seconds, not the guard's
    max_step_duration of 300 s)."""
    ttl = 3
    fault_seconds = ttl + 4
    run = _started_for_a_kill(clean_store, make_migration, ttl=ttl, slow_start_seconds=3)
    victim_id = clean_store.add_repository("crash/slow-decide-unreconciled-victim")
    # 0.5 s into the 3 s start call; status calls fail from the kill until after the
    # redelivery's recovery (at most TTL + 1 s later).
    index = _kill_inside_its_start_call(
        run, clean_store, victim_id, after=0.5,
        then_fault={"fault": "status:503", "fault_calls": "status",
                    "fault_seconds": fault_seconds},
    )  # fmt: skip
    killed_at = time.time()

    def undone() -> MigrationEvent | None:
        events = [e for e in clean_store.events(victim_id) if e.event == "undo_claim"]
        return events[0] if events else None

    # The registry answers again fault_seconds after the kill; the retries come every 2-3 s.
    step = wait_until(undone, timeout=fault_seconds + 15, interval=0.1, what="the undo")
    assert (step.actor, step.detail.get("fault_class")) == (
        "enqueue_next_migration", "interrupted",
    ), step  # fmt: skip
    assert fault_seconds - 1 <= step.at.timestamp() - killed_at <= fault_seconds + 10
    survivor = f"worker-{1 - index}"
    recoveries = _recovery_outcomes(run, survivor, victim_id)
    # The redelivery's recovery met the fault (else this test proves nothing), a retry
    # undid the claim.
    assert recoveries[0] == "registry_fault" and recoveries[-1] == "undone", recoveries
    assert run.log_events(survivor, "enqueue_retry_pending")
    httpx.post(
        f"{run.simulator_url}/simulator/config", json={"slow_start_seconds": 0}
    ).raise_for_status()
    victim = _terminal(clean_store, victim_id, timeout=60)
    assert (victim.migration_state, victim.migration_retries_count) == (State.IMPORT_DONE, 0)
    assert run.report()["overlapping_repositories"] == []
    assert stale_accepted_writes(database_url) == []


def test_a_notification_is_not_applied_to_the_retry_its_killed_delivery_claimed(
    clean_store: Store, database_url: str, make_migration: Callable[..., LocalMigration]
) -> None:
    """The chaos run's race (invariant 7). A pre_import_failed notification aborts its
    repository (one retry charged) and its run claims the retry; the worker dies inside the
    retry's start, which never reaches the registry. The redelivered notification's
    recovery meets a registry that cannot answer, so the claim stays. Its Dramatiq retry is
    no RabbitMQ redelivery: it must still reconcile first (the claim undone, nothing
    charged), not apply its pre_import_failed, which is the first attempt's, to the retry
    and charge the same failure twice."""
    ttl = 3
    # Every start waits 1.5 s before it is decided (within the client's timeout, so the
    # first one starts), and decides nothing for a caller gone by then.
    run = _started_for_a_kill(clean_store, make_migration, ttl=ttl, slow_start_seconds=1.5)
    victim_id = clean_store.add_repository("crash/fail-once-slow-decide-victim")
    # 0.3 s into the retry's 1.5 s start call; status calls fail from the kill until after
    # the redelivery's recovery (at most TTL + 1 s later); the registry keeps reporting the
    # first attempt's failure.
    index = _kill_inside_its_start_call(
        run, clean_store, victim_id, after=0.3, retries=1,
        then_fault={"fault": "status:503", "fault_calls": "status", "fault_seconds": ttl + 4},
    )  # fmt: skip

    victim = _terminal(clean_store, victim_id, timeout=90)
    events = [e for e in clean_store.events(victim_id, limit=100) if e.accepted]
    steps = [(e.event, e.actor) for e in events]
    # fail-once: one failure of its own, charged once; the retry's interrupted claim undone.
    assert (victim.migration_state, victim.migration_retries_count) == (
        State.IMPORT_DONE, 1,
    ), steps  # fmt: skip
    assert [e.event for e in events].count("abort_import") == 1, steps
    undone = [e for e in events if e.event == "undo_claim"]
    assert undone and undone[0].detail.get("fault_class") == "interrupted", steps
    # Undone by the notification's retry, once the registry answered again: the
    # redelivery's recovery met the fault first (else this test proves nothing).
    assert undone[0].actor == "handle_registry_notification", steps
    survivor = f"worker-{1 - index}"
    recoveries = _recovery_outcomes(run, survivor, victim_id)
    assert recoveries[0] == "registry_fault" and recoveries[-1] == "undone", recoveries
    assert stale_accepted_writes(database_url) == []


def _run_intervals(lines: list[dict[str, object]]) -> list[tuple[float, float]]:
    """(start, end) of the runs that stepped a repository, from their log lines."""
    intervals = []
    for line in lines:
        if "container_repository_id" not in line:
            continue
        end = datetime.fromisoformat(str(line["timestamp"])).timestamp()
        intervals.append((end - float(line["duration_s"]), end))  # type: ignore[arg-type]
    return sorted(intervals)


def _most_overlap(intervals: list[tuple[float, float]]) -> float:
    """The longest time two of the intervals ran together."""
    most = 0.0
    for i, (start, end) in enumerate(intervals):
        for other_start, other_end in intervals[i + 1 :]:
            most = max(most, min(end, other_end) - max(start, other_start))
    return most


@pytest.mark.parametrize("scope", ["repository", "global"])
def test_both_lease_scopes_migrate_everything(
    scope: str,
    clean_store: Store,
    database_url: str,
    make_migration: Callable[..., LocalMigration],
) -> None:
    ids = seed_spread(clean_store, 24, seed=3)
    clean_store.update_settings(
        capacity=5, enqueue_interval=0.5, guard_interval=2, max_step_duration=20, lease_scope=scope
    )
    # A start call takes 0.5 s, so a run that starts a repository holds its lease that long.
    run = make_migration(workers=2, threads=3, simulator_args=["--start-latency", "0.5"])
    run.start()
    wait_until(lambda: all_terminal(clean_store), timeout=120, interval=0.5, what="all terminal")
    counts = clean_store.counts_by_state()
    assert counts.get(State.IMPORT_DONE, 0) + counts.get(State.IMPORT_SKIPPED, 0) == len(ids)
    report = run.report()
    assert report["overlapping_repositories"] == []
    assert report["max_concurrent_imports"] <= 5
    assert stale_accepted_writes(database_url) == []
    lines = run.log_events("worker-0", "enqueue_next_migration") + run.log_events(
        "worker-1", "enqueue_next_migration"
    )
    overlap = _most_overlap(_run_intervals(lines))
    if scope == "global":
        # One fixed key: runs are serial (the few milliseconds before the lease is taken
        # may overlap, never the 0.5 s start call).
        assert overlap < 0.25, overlap
    else:
        # Per-repository keys: runs on different repositories go on together.
        assert overlap > 0.25, overlap
