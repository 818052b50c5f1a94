"""Prometheus metrics counted inside the worker, scheduler and API processes.

One place for every metric the processes count as they work (the API's scrape-time gauges,
read from the store, stay in ``service/api.py``). They live in prometheus_client's default
registry, which Dramatiq's Prometheus middleware exports from the workers.

Names are a contract with ``deploy/prometheus/`` (rules, alerts, dashboard): change both.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

#: Registry calls by call (start_pre, start_final, status, cancel, probe) and by the class
#: of their answer (migration.registry.FaultClass: ok, repository, not_now, registry).
REGISTRY_CALLS = Counter(
    "registry_migrator_registry_calls",
    "Registry import API calls by call and outcome class",
    ["call", "outcome_class"],
)
REGISTRY_CALL_SECONDS = Histogram(
    "registry_migrator_registry_call_seconds",
    "Registry import API call latency",
    ["call"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
#: 1 while this process sees the shared registry breaker open.
REGISTRY_BREAKER_OPEN = Gauge(
    "registry_migrator_registry_breaker_open",
    "1 while the shared registry breaker is open (as this process last saw it)",
    multiprocess_mode="livemax",
)
#: Times this process opened (or re-opened) the shared breaker, by reason.
REGISTRY_BREAKER_OPENED = Counter(
    "registry_migrator_registry_breaker_opened",
    "Times the shared registry breaker was opened by this process",
    ["reason"],
)

# -- leases, fencing, steps (workers) --------------------------------------------------------

#: Lease acquisitions by the actor that tried and the outcome: ``taken`` or ``busy`` (another
#: holder has the key). A busy lease is normal (a run tries the next candidate); many busy
#: ones mean runs contend for the same repositories.
LEASE_ACQUISITIONS = Counter(
    "registry_migrator_lease_acquisitions",
    "Repository lease acquisitions by actor and outcome (taken, busy)",
    ["actor", "outcome"],
)
#: Lease sessions this process found lost (keep-alive failed or etcd dropped the lease): each
#: loss lets the process's keys expire and makes it open a new session.
LEASE_SESSIONS_LOST = Counter(
    "registry_migrator_lease_sessions_lost",
    "Lease sessions found lost (keep-alive failed or the lease expired)",
)
#: Fenced writes the store refused, by reason (``stale_token``: a newer holder wrote the row;
#: ``state_changed``: the row is no longer in the state the writer saw).
FENCED_WRITES_REFUSED = Counter(
    "registry_migrator_fenced_writes_refused",
    "Fenced PostgreSQL writes refused, by reason",
    ["reason"],
)
#: Accepted state changes, by the state written: the rate of ``import_done`` is the
#: migration's throughput, ``import_aborted`` and ``import_skipped`` its failures.
TRANSITIONS = Counter(
    "registry_migrator_transitions",
    "Accepted repository state changes, by the state written",
    ["to_state"],
)
#: Enqueuer runs by the ``job_status`` of their log line (started, at_capacity, disabled,
#: no_candidate, all_candidates_busy, waiting, error...).
ENQUEUER_RUNS = Counter(
    "registry_migrator_enqueuer_runs",
    "enqueue_next_migration runs by job status",
    ["job_status"],
)

# -- scheduler ------------------------------------------------------------------------------

#: 1 on the scheduler replica that leads (publishes), 0 on the others.
SCHEDULER_LEADER = Gauge(
    "registry_migrator_scheduler_leader",
    "1 while this scheduler replica is the elected leader",
    multiprocess_mode="livemax",
)
#: Messages the leading scheduler published, by kind (enqueue, guard).
SCHEDULER_PUBLISHED = Counter(
    "registry_migrator_scheduler_published",
    "Messages published by the leading scheduler, by kind",
    ["kind"],
)


def count_lease_acquisition(*, actor: str, taken: bool) -> None:
    """Count one lease acquisition attempt's final outcome.

    :param actor: the actor that tried (enqueue_next_migration, handle_registry_notification...).
    :param taken: whether it got the key.
    """
    LEASE_ACQUISITIONS.labels(actor, "taken" if taken else "busy").inc()


#: etcd writes refused because its database reached its quota (the NOSPACE alarm), by
#: where the process met it (an actor's name, or ``trigger:<source>``). Every lease
#: and gate write fails until an operator recovers etcd (README runbook "etcd out of space").
ETCD_NOSPACE = Counter(
    "registry_migrator_etcd_nospace",
    "etcd writes refused with NOSPACE (database at its quota), by where",
    ["where"],
)
