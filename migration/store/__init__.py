"""The PostgreSQL store: repositories, their migration state, the live settings, the events.

A package, one module per job: :mod:`.model` (rows, outcomes, errors), :mod:`.sql` (the SQL
text), :mod:`.base` (the pool), :mod:`.schema`, :mod:`.settings`, :mod:`.repositories`,
:mod:`.writes` (the fenced writes), :mod:`.together` (several in one round trip),
:mod:`.seed`, :mod:`.status` (the read-only snapshot of ``registry-migrator status``), and
:mod:`.core`, which assembles :class:`Store`. No SQL is
written outside this package.

The names below are loaded on first use (PEP 562), so that importing one light module, such
as :mod:`migration.store.status`, does not load the pool and the logging of the others.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from migration.store.core import Store
    from migration.store.model import (
        Candidate,
        InvalidRepository,
        MigrationEvent,
        Outcome,
        Repository,
        RepositoryNotFound,
        Seen,
        StepResult,
        StoreError,
        StoreUnavailable,
        WrittenAsSeen,
        validate_path,
    )
    from migration.store.seed import insert_repositories
    from migration.store.versions import (
        SchemaOutdated,
        check_schema,
        required_version,
        schema_files,
    )

_WHERE = {
    "Store": "core",
    "Candidate": "model",
    "InvalidRepository": "model",
    "WrittenAsSeen": "model",
    "Seen": "model",
    "MigrationEvent": "model",
    "Outcome": "model",
    "Repository": "model",
    "RepositoryNotFound": "model",
    "StepResult": "model",
    "StoreError": "model",
    "StoreUnavailable": "model",
    "validate_path": "model",
    "SchemaOutdated": "versions",
    "check_schema": "versions",
    "required_version": "versions",
    "schema_files": "versions",
    "insert_repositories": "seed",
}

__all__ = [
    "Candidate",
    "InvalidRepository",
    "MigrationEvent",
    "Outcome",
    "Repository",
    "RepositoryNotFound",
    "SchemaOutdated",
    "Seen",
    "StepResult",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "WrittenAsSeen",
    "check_schema",
    "insert_repositories",
    "required_version",
    "schema_files",
    "validate_path",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
