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
    multiprocess_mode="max",
)
#: Times this process opened (or re-opened) the shared breaker, by reason.
REGISTRY_BREAKER_OPENED = Counter(
    "registry_migrator_registry_breaker_opened",
    "Times the shared registry breaker was opened by this process",
    ["reason"],
)
#: etcd writes refused because its database reached its quota (the NOSPACE alarm), by
#: where the process met it (an actor's name, or ``trigger:<source>``). Every lease
#: and gate write fails until an operator recovers etcd (README runbook "etcd out of space").
ETCD_NOSPACE = Counter(
    "registry_migrator_etcd_nospace",
    "etcd writes refused with NOSPACE (database at its quota), by where",
    ["where"],
)
