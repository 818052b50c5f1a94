"""The etcd key names of the migration, all under the configured prefix."""

from __future__ import annotations


def repository_lease_key(prefix: str, repository_id: int) -> str:
    """The lease key of one repository: ``<prefix>/leases/container_repository/<id>``."""
    return f"{prefix.rstrip('/')}/leases/container_repository/{int(repository_id)}"


def global_lease_key(prefix: str) -> str:
    """The one fixed key every run takes under ``lease_scope=global`` (the reference's)."""
    return f"{prefix.rstrip('/')}/leases/container_registry_migration_enqueuer"


def leases_prefix(prefix: str) -> str:
    """Where every lease key lives (for listing)."""
    return f"{prefix.rstrip('/')}/leases/"


def enqueue_gate_name(prefix: str) -> str:
    """The dedup gate of enqueue_next_migration triggers."""
    return f"{prefix.rstrip('/')}/gates/enqueue_next_migration"


def scheduler_election_name(prefix: str) -> str:
    """The election among scheduler replicas."""
    return f"{prefix.rstrip('/')}/elections/scheduler"


def registry_breaker_name(prefix: str) -> str:
    """The breaker every worker shares about the registry (invariant 7)."""
    return f"{prefix.rstrip('/')}/breakers/registry"
