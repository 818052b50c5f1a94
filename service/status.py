"""A snapshot of the migration for operators: what ``status`` and the demo show.

:func:`collect` reads PostgreSQL in one read-only REPEATABLE READ transaction, so every
number in a snapshot comes from the same moment (counts add up, in flight matches the
counts), and lists the held lease keys in etcd. etcd being down does not hide the rest:
the snapshot carries the error instead of the leases.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import psycopg

from leases import EtcdUnavailable, HeldKey, LeaseError, SharedBreaker, list_held
from migration.config import Config
from migration.keys import leases_prefix, registry_breaker_name
from migration.settings import Settings
from migration.states import ACTIVE_STATES, TERMINAL_STATES, State
from migration.store.status import read_snapshot
from migration.store.versions import require_schema_on

#: The windows (minutes) of the throughput figures.
THROUGHPUT_WINDOWS = (1, 5, 15)
#: The settings that decide whether a run starts work, shown by ``status``.
GATING_SETTINGS = (
    "enabled",
    "paused_reason",
    "capacity",
    "enqueue_waiting_time",
    "created_before",
    "max_tags_count",
    "max_retries",
    "root_namespace_deny_list",
    "lease_scope",
    "max_step_duration",
)
#: How ``status`` and the demo name the reasons of repositories done without an import.
DONE_REASON_LABEL = {"native_import": "done (native)", "not_found": "done (not found)"}
#: The colour (rich style) each state is shown in, by ``status`` and by the demo.
STATE_STYLE = {
    State.DEFAULT: "white",
    State.PRE_IMPORTING: "cyan",
    State.PRE_IMPORT_DONE: "cyan",
    State.IMPORTING: "blue",
    State.IMPORT_DONE: "green",
    State.IMPORT_ABORTED: "yellow",
    State.IMPORT_SKIPPED: "magenta",
}


@dataclass(frozen=True, kw_only=True)
class RecentEnd:
    """A recent abort or skip: which repository, when, and why."""

    repository_id: int
    path: str
    to_state: str
    at: str
    reason: str | None


@dataclass(frozen=True, kw_only=True)
class OldestActive:
    """The active repository whose last step is the oldest (the guard's next suspect)."""

    repository_id: int
    path: str
    state: str
    last_step_at: str | None
    age_s: float | None


@dataclass(frozen=True, kw_only=True)
class BackingOff:
    """A repository waiting out a registry backoff (invariant 7): why, and until when."""

    repository_id: int
    path: str
    state: str
    failures: int
    not_before: str
    last_error: str | None


@dataclass(frozen=True, kw_only=True)
class Breaker:
    """The shared registry breaker as etcd holds it."""

    state: str  # closed, open, half_open
    reason: str
    window_s: float
    remaining_s: float


@dataclass(frozen=True, kw_only=True)
class Lease:
    """A held lease key, flattened for JSON."""

    key: str
    token: int
    ttl_remaining: int
    holder: dict[str, Any]


@dataclass(kw_only=True)
class MigrationStatus:
    """One snapshot of the migration.

    :param taken_at: the database's ``now()`` for the snapshot.
    :param total: repositories in the table.
    :param counts: repositories per state (every state present).
    :param skipped_by_reason: ``import_skipped`` repositories per skip reason.
    :param done_by_reason: ``import_done`` repositories that needed no import, per reason
        (``native_import``: the registry held it already; ``not_found``: it did not know it).
    :param excluded_by_deny_list: repositories in ``default`` or ``import_aborted`` whose
        root namespace is denied: runs never pick them, so they stay where they are.
    :param excluded_by_cutoff: repositories in ``default`` created at or after
        ``created_before`` (not denied), also never picked.
    :param eligible_remaining: repositories not terminal and not excluded: the work left.
    :param in_flight: repositories in an active state (they count against the capacity).
    :param capacity: the capacity setting.
    :param import_done_per_minute: window minutes -> accepted ``finish_import`` and
        ``already_migrated`` writes per minute over that window.
    :param oldest_active: the active repository with the oldest last step, if any.
    :param recent_ends: the latest aborts and skips, newest first.
    :param waiting_time_passed: False when ``enqueue_waiting_time`` holds new starts back.
    :param settings: the gating settings (:data:`GATING_SETTINGS`).
    :param leases: held lease keys; None when etcd could not be read.
    :param leases_error: why the leases are missing, else None.
    :param backing_off_count: repositories waiting out a registry backoff.
    :param backing_off: the next ones due (at most 10), with their last registry error.
    :param registry_breaker: the shared registry breaker; None when etcd could not be read.
    """

    taken_at: str
    total: int
    counts: dict[str, int]
    skipped_by_reason: dict[str, int]
    done_by_reason: dict[str, int]
    excluded_by_deny_list: int
    excluded_by_cutoff: int
    eligible_remaining: int
    in_flight: int
    capacity: int
    import_done_per_minute: dict[str, float]
    oldest_active: OldestActive | None
    recent_ends: list[RecentEnd]
    waiting_time_passed: bool
    settings: dict[str, Any]
    leases: list[Lease] | None = None
    leases_error: str | None = None
    backing_off_count: int = 0
    backing_off: list[BackingOff] = field(default_factory=list)
    registry_breaker: Breaker | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def terminal(self) -> int:
        """Repositories in import_done or import_skipped."""
        return sum(self.counts[s.value] for s in TERMINAL_STATES)

    @property
    def done(self) -> bool:
        """True when every eligible repository is terminal."""
        return self.eligible_remaining == 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly values (the ``status --json`` document)."""
        out = asdict(self)
        out.pop("extra")
        out["terminal"] = self.terminal
        out["done"] = self.done
        return out


def _read_etcd(config: Config) -> tuple[list[Lease] | None, str | None, Breaker | None]:
    try:
        with config.etcd_client(timeout=3.0) as client:
            held: list[HeldKey] = list_held(client, leases_prefix(config.etcd_prefix))
            breaker = SharedBreaker(client, registry_breaker_name(config.etcd_prefix)).state()
    except (EtcdUnavailable, LeaseError) as error:
        return None, f"etcd unreachable at {config.etcd_endpoints_text}: {error}", None
    leases = [
        Lease(key=h.key, token=h.token, ttl_remaining=h.ttl_remaining, holder=asdict(h.holder))
        for h in held
    ]
    state = "open" if breaker.open else "half_open" if breaker.half_open else "closed"
    return (
        leases,
        None,
        Breaker(
            state=state,
            reason=breaker.reason,
            window_s=breaker.window,
            remaining_s=round(breaker.remaining, 1),
        ),
    )


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def collect(config: Config, *, recent: int = 10, leases: bool = True) -> MigrationStatus:
    """Take a snapshot of the migration.

    :param config: where PostgreSQL and etcd are.
    :param recent: how many of the latest aborts and skips to include.
    :param leases: also list the held lease keys in etcd.
    :raises psycopg.Error: PostgreSQL cannot be read (the caller turns it into one line).
    :raises SchemaOutdated: the database's schema is older than this release needs.
    """
    with psycopg.connect(config.database_url, connect_timeout=5) as conn:
        conn.read_only = True
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        with conn.transaction():
            require_schema_on(conn)
            db = read_snapshot(conn, recent=recent, windows=THROUGHPUT_WINDOWS)
    settings: Settings = db["settings"]
    counts: dict[str, int] = db["counts"]
    total = sum(counts.values())
    terminal = sum(counts[s.value] for s in TERMINAL_STATES)
    oldest = db["oldest"]
    status = MigrationStatus(
        taken_at=db["now"].isoformat(),
        total=total,
        counts=counts,
        skipped_by_reason=db["skipped"],
        done_by_reason=db["done_by_reason"],
        excluded_by_deny_list=db["denied"],
        excluded_by_cutoff=db["cut"],
        eligible_remaining=total - terminal - db["denied"] - db["cut"],
        in_flight=sum(counts[s.value] for s in ACTIVE_STATES),
        capacity=settings.capacity,
        import_done_per_minute={str(m): round(n / m, 2) for m, n in db["done"].items()},
        oldest_active=OldestActive(
            repository_id=int(oldest["id"]),
            path=oldest["path"],
            state=oldest["migration_state"],
            last_step_at=_iso(oldest["last_step_at"]),
            age_s=round(oldest["age"], 1) if oldest["age"] is not None else None,
        )
        if oldest
        else None,
        recent_ends=[
            RecentEnd(
                repository_id=int(row["repository_id"]),
                path=row["path"],
                to_state=row["to_state"],
                at=row["at"].isoformat(),
                reason=row["reason"],
            )
            for row in db["ends"]
        ],
        waiting_time_passed=db["waited"],
        settings={k: v for k, v in settings.as_dict().items() if k in GATING_SETTINGS},
        backing_off_count=int(db["backing_off"][0]["total"]) if db["backing_off"] else 0,
        backing_off=[
            BackingOff(
                repository_id=int(row["id"]),
                path=row["path"],
                state=row["migration_state"],
                failures=int(row["registry_failures"]),
                not_before=row["registry_not_before"].isoformat(),
                last_error=row["registry_last_error"],
            )
            for row in db["backing_off"]
        ],
    )
    if leases:
        status.leases, status.leases_error, status.registry_breaker = _read_etcd(config)
    return status
