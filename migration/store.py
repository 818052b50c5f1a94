"""The PostgreSQL store: repositories, their migration state, the live settings, the events.

Thread-safe: one :class:`Store` per process, shared by every worker thread; each call takes
a connection from a ``psycopg_pool.ConnectionPool`` for one short transaction.

Two kinds of writes move a repository:

- :meth:`Store.claim` for the events that move it *into* an active state from outside
  (``start_pre_import``, ``retry_pre_import``, ``retry_import``). It locks the settings row
  (``SELECT ... FOR UPDATE``), so claims, and only claims, are serialized; under that lock
  it counts the active repositories and refuses past the capacity. Every other write can
  only keep or lower that count, so the capacity is a hard bound however many run at once.
- :meth:`Store.step` for every later event, and :meth:`Store.undo_claim`. Both are fenced
  like a claim: the write names the state it expects and the caller's fencing token, and is
  refused when the state differs or a newer token has written the row. A refusal changes
  nothing but is recorded in ``migration_events`` with ``accepted = false``.

Every fenced write is one call to the server function ``migration_fenced_write`` (schema
0005): fence check, refusal record, capacity check and event insert happen there, under the
row locks, so the locks are held for the server's work only, not across client round trips.
"""

from __future__ import annotations

import random
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from importlib import resources
from typing import Any

import psycopg
import structlog
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row, kwargs_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from migration import metrics
from migration import settings as settings_module
from migration.queries import ACTIVE_SQL, WAITING_TIME_PASSED_SQL
from migration.settings import Settings
from migration.states import (
    ARRIVAL_COLUMN,
    CLAIM_EVENTS,
    REQUEUE,
    REQUEUE_STATES,
    UNDO_CLAIM,
    Event,
    SkipReason,
    State,
    Transition,
    apply,
    undo_claim,
)

log = structlog.get_logger(__name__)

# A registry repository path: lower-case components joined by '/', at least two of them
# (root namespace and name), as the distribution spec names repositories.
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_PATH = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})+$")
_MAX_PATH = 255
# Key of the advisory lock that serializes schema upgrades (any fixed bigint will do).
_UPGRADE_LOCK = 0x5245_4D49_4752_0001


def _arrival_column(transition: Transition) -> str | None:
    """The timestamp column a transition stamps, if any.

    An undone claim returns to where it was without arriving anew: re-stamping
    migration_aborted_at or migration_pre_import_done_at would reorder the retries and
    restart the enqueue waiting time.
    """
    return ARRIVAL_COLUMN.get(transition.to_state) if transition.event != UNDO_CLAIM else None


# Counting these reads the partial index container_repositories_active.
_COUNT_ACTIVE = f"SELECT count(*) FROM container_repositories WHERE migration_state IN {ACTIVE_SQL}"  # noqa: S608 - constants only
# An active row with no last_step_at (written outside the project, e.g. imported from
# GitLab's tables) is stale too, and first: the reference counts nil as stale.
_SELECT_STALE = (
    f"SELECT * FROM container_repositories WHERE migration_state IN {ACTIVE_SQL}"  # noqa: S608
    " AND (last_step_at IS NULL OR last_step_at < now() - make_interval(secs => %(age)s))"
    " ORDER BY last_step_at NULLS FIRST LIMIT %(limit)s"
)
# Active repositories whose latest accepted write came from one message: what a delivery of
# that message left behind (partial index on the active states, then each one's last event).
_SELECT_LAST_WRITTEN_BY = (
    f"SELECT r.* FROM container_repositories r WHERE r.migration_state IN {ACTIVE_SQL}"  # noqa: S608
    " AND (SELECT e.message_id FROM migration_events e WHERE e.repository_id = r.id"
    " AND e.accepted ORDER BY e.id DESC LIMIT 1) = %(message_id)s ORDER BY r.id"
)
# How many times a fenced write reads the row again after the function found it moved
# since the read (each time another write got in between; more in a row is a bug).
_MISMATCH_RETRIES = 5
# The row a fenced write computes its transition from, read without a lock, with the
# max_retries setting (an abort needs it) in the same round trip.
_READ_FOR_WRITE = (
    "SELECT r.*, (SELECT max_retries FROM migration_settings WHERE id = 1)"
    " AS settings_max_retries FROM container_repositories r WHERE r.id = %s"
)
# Schema 0005's function; every argument is cast so that the call resolves whatever types
# the driver sends.
_FENCED_WRITE = (
    "SELECT w.outcome, (w.repository).* FROM migration_fenced_write(%(id)s::bigint,"
    " %(claim)s::boolean, %(from)s::text, %(from_retries)s::integer,"
    " %(from_aborted_in)s::text, %(token)s::bigint, %(to)s::text, %(retries)s::integer,"
    " %(aborted_in)s::text, %(reason)s::text, %(arrival)s::text, %(event)s::text,"
    " %(actor)s::text, %(message_id)s::text, %(detail)s::jsonb) AS w"
)

# A registry fault's backoff: 5 s * 2^(faults so far), capped, then scaled by 0.5-1 (equal
# jitter). The exponent is capped too, so a repository failing for days cannot overflow it.
_BACK_OFF = (
    "UPDATE container_repositories SET registry_failures = registry_failures + 1,"
    " registry_last_error = %(error)s,"
    " registry_not_before = now() + make_interval(secs => least("
    "(SELECT registry_backoff_max FROM migration_settings WHERE id = 1),"
    " 5 * power(2, least(registry_failures, 20))) * (0.5 + random() / 2))"
    " WHERE id = %(id)s AND fencing_token <= %(token)s RETURNING *"
)

# First in line: an aborted row just before the oldest abort (candidates take aborted rows
# by migration_aborted_at), and no registry backoff for either kind.
_TO_FRONT = (
    "UPDATE container_repositories SET registry_failures = 0, registry_not_before = NULL,"
    " registry_last_error = NULL, fencing_token = %(token)s,"
    " migration_aborted_at = CASE WHEN migration_state = 'import_aborted' THEN"
    " (SELECT coalesce(min(migration_aborted_at), now()) - interval '1 second'"
    "  FROM container_repositories WHERE migration_state = 'import_aborted')"
    " ELSE migration_aborted_at END"
    " WHERE id = %(id)s AND fencing_token <= %(token)s"
    " AND migration_state IN ('import_aborted', 'default') RETURNING *"
)


class StoreError(Exception):
    """Base of the store's own errors."""


class StoreUnavailable(StoreError):
    """PostgreSQL cannot be reached. ``str(error)`` is one line naming where."""


class InvalidRepository(StoreError, ValueError):
    """A repository to add is malformed or exists already. One line."""


class RepositoryNotFound(StoreError, KeyError):
    """No repository has that id."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "repository not found"


class Outcome(StrEnum):
    """What became of a claim or a step."""

    CLAIMED = "claimed"  # claim written
    STEPPED = "stepped"  # step or undo written
    DISABLED = "disabled"  # claim refused: the migration is paused
    AT_CAPACITY = "at_capacity"  # claim refused: capacity repositories are in flight
    STATE_CHANGED = "state_changed"  # refused (recorded): the state is not the expected one
    STALE_TOKEN = "stale_token"  # noqa: S105 - refused (recorded): a newer token wrote the row


def _value(member: StrEnum | None) -> str | None:
    """An optional enum member as the text stored in its column."""
    return member.value if member is not None else None


def _json_values(row: dict[str, Any]) -> dict[str, object]:
    """A row's values with timestamps as ISO 8601 text."""
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items()}


@dataclass(frozen=True, kw_only=True)
class Repository:
    """A ``container_repositories`` row."""

    id: int
    path: str
    root_namespace: str
    created_at: datetime
    tags_count: int
    migration_state: State
    migration_pre_import_started_at: datetime | None
    migration_pre_import_done_at: datetime | None
    migration_import_started_at: datetime | None
    migration_import_done_at: datetime | None
    migration_aborted_at: datetime | None
    migration_skipped_at: datetime | None
    migration_aborted_in_state: State | None
    migration_retries_count: int
    migration_skipped_reason: SkipReason | None
    fencing_token: int
    last_step_at: datetime | None
    registry_failures: int = 0
    registry_not_before: datetime | None = None
    registry_last_error: str | None = None

    @classmethod
    def from_row(cls, **row: Any) -> Repository:
        """Build from a row, turning the text columns into their enums."""
        row["migration_state"] = State(row["migration_state"])
        if row["migration_aborted_in_state"] is not None:
            row["migration_aborted_in_state"] = State(row["migration_aborted_in_state"])
        if row["migration_skipped_reason"] is not None:
            row["migration_skipped_reason"] = SkipReason(row["migration_skipped_reason"])
        return cls(**row)

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly values keyed by column."""
        return _json_values(self.__dict__)


@dataclass(frozen=True, kw_only=True)
class MigrationEvent:
    """A ``migration_events`` row: one accepted or refused write."""

    id: int
    repository_id: int
    from_state: str | None
    to_state: str | None
    event: str
    token: int
    actor: str
    message_id: str | None
    at: datetime
    detail: dict[str, Any]
    accepted: bool

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly values keyed by column."""
        return _json_values(self.__dict__)


@dataclass(frozen=True, kw_only=True)
class StepResult:
    """The outcome of :meth:`Store.claim`, :meth:`Store.step` or :meth:`Store.undo_claim`.

    :param outcome: what happened.
    :param repository: the row after the write, or as it is when the write was refused.
    :param transition: the transition written, or None when refused.
    """

    outcome: Outcome
    repository: Repository
    transition: Transition | None = None

    @property
    def ok(self) -> bool:
        """True when the write was made."""
        return self.outcome in (Outcome.CLAIMED, Outcome.STEPPED)


def validate_path(path: str) -> str:
    """Return ``path`` when it is a valid repository path, else raise :class:`InvalidRepository`."""
    if not isinstance(path, str) or len(path) > _MAX_PATH or not _PATH.match(path):
        raise InvalidRepository(
            f"invalid repository path {path!r}: expected root-namespace/.../name, lower-case "
            f"letters and digits separated by . _ __ or -, at most {_MAX_PATH} characters"
        )
    return path


def _where(database_url: str) -> str:
    try:
        params = conninfo_to_dict(database_url)
    except psycopg.ProgrammingError:
        return "the configured database"
    return (
        f"{params.get('host', 'localhost')}:{params.get('port', 5432)}/{params.get('dbname', '')}"
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def schema_files() -> list[tuple[str, str]]:
    """The schema files as (version, SQL), in the order they apply."""
    folder = resources.files("migration.schema")
    files = sorted(
        (item.name, item.read_text(encoding="utf-8"))
        for item in folder.iterdir()
        if item.name.endswith(".sql")
    )
    return [(name.removesuffix(".sql"), text) for name, text in files]


@dataclass(frozen=True, kw_only=True)
class _Author:
    """Who makes a fenced write: the fence it carries and what the events log records with it.

    :param token: the writer's fencing token (its lease key's create_revision).
    :param actor: who writes (actor name).
    :param message_id: the message being processed.
    :param detail: extra JSON for the events log.
    """

    token: int
    actor: str
    message_id: str | None
    detail: dict[str, Any] | None


class Store:
    """The migration's PostgreSQL state. Thread-safe; one per process.

    :param database_url: PostgreSQL URL (``Config.database_url``).
    :param min_size: connections the pool keeps open.
    :param max_size: most connections the pool opens (size it to the worker threads).
    :param timeout: seconds a call waits for a free connection before
        :class:`StoreUnavailable`.
    :raises StoreUnavailable: PostgreSQL cannot be reached now.
    """

    def __init__(
        self, database_url: str, *, min_size: int = 1, max_size: int = 10, timeout: float = 30.0
    ) -> None:
        self._where = _where(database_url)
        try:
            # Fail now, with one clear line, rather than after the pool's timeout.
            psycopg.connect(database_url, connect_timeout=5).close()
        except psycopg.Error as error:
            raise StoreUnavailable(
                f"cannot reach PostgreSQL at {self._where}: {_first_line(error)}"
            ) from None
        self._pool = ConnectionPool(
            database_url,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            kwargs={"autocommit": True, "connect_timeout": 5},
            check=ConnectionPool.check_connection,
            name="migration-store",
            open=True,
        )
        self._refused = 0
        self._refused_lock = threading.Lock()

    def close(self) -> None:
        """Close every connection."""
        self._pool.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        try:
            with self._pool.connection() as conn:
                yield conn
        except PoolTimeout as error:
            raise StoreUnavailable(
                f"no PostgreSQL connection to {self._where}: {_first_line(error)}"
            ) from None

    # -- schema -----------------------------------------------------------------------------

    def upgrade(self) -> list[str]:
        """Apply the schema files not applied yet, in order; return the versions applied.

        Idempotent. One transaction under an advisory lock, so concurrent upgraders wait
        for each other and the second finds nothing to do.
        """
        applied_now: list[str] = []
        with self._connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_UPGRADE_LOCK,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            applied = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
            for version, text in schema_files():
                if version in applied:
                    continue
                conn.execute(text.encode())  # several statements: simple query protocol
                conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
                applied_now.append(version)
        if applied_now:
            log.info("schema_upgraded", versions=applied_now)
        return applied_now

    def schema_versions(self) -> list[str]:
        """The versions applied so far (empty before the first upgrade)."""
        with self._connection() as conn:
            exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
            if not exists or not exists[0]:
                return []
            return [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY 1")]

    # -- settings ---------------------------------------------------------------------------

    def settings(self) -> Settings:
        """The live settings (read from the database on every call)."""
        with self._connection() as conn:
            cur = conn.cursor(row_factory=kwargs_row(Settings.from_row))
            row = cur.execute("SELECT * FROM migration_settings WHERE id = 1").fetchone()
        if row is None:
            raise StoreError(
                "the migration_settings row is missing; run `registry-migrator db upgrade`"
            )
        return row

    def update_settings(self, **changes: object) -> Settings:
        """Validate and write settings; return the settings after.

        :param changes: setting name -> value (typed, or strings as a command line gives).
        :raises SettingsError: an unknown key or a bad value; nothing is changed.
        """
        values = settings_module.validate(changes)
        if values.get("enabled") is True:
            values["paused_reason"] = None  # a resume ends a pause the system made, too
        assignments = sql.SQL(", ").join(
            sql.SQL("{} = {}").format(sql.Identifier(key), sql.Placeholder(key)) for key in values
        )
        query = sql.SQL(
            "UPDATE migration_settings SET {}, updated_at = now() WHERE id = 1 RETURNING *"
        ).format(assignments)
        with self._connection() as conn:
            cur = conn.cursor(row_factory=kwargs_row(Settings.from_row))
            row = cur.execute(query, values).fetchone()
        assert row is not None
        log.info("settings_changed", changes={k: str(v) for k, v in values.items()})
        return row

    def pause(self, reason: str) -> bool:
        """Pause the migration (``enabled = false``) for ``reason``, as the system does when
        the registry refuses our token; ``resume`` (enabled=true) clears the reason.

        :returns: True when this call paused it (it was running), False when already paused.
        """
        with self._connection() as conn:
            row = conn.execute(
                "UPDATE migration_settings SET enabled = false, paused_reason = %s,"
                " updated_at = now() WHERE id = 1 AND enabled RETURNING id",
                (reason[:500],),
            ).fetchone()
        return row is not None

    # -- registry backoff (invariant 7) -------------------------------------------------------

    def back_off(self, repository_id: int, *, token: int, error: str) -> Repository | None:
        """Count a registry fault against a repository's backoff, never its retries.

        The repository is not picked again before ``registry_not_before``: 5 s doubled per
        fault in a row, capped by the ``registry_backoff_max`` setting, with equal jitter (so
        repositories that failed together come back apart). Fenced by ``token``.

        :returns: the row after, or None when a newer token has written it (nothing changed).
        """
        with self._connection() as conn:
            cur = conn.cursor(row_factory=kwargs_row(Repository.from_row))
            return cur.execute(_BACK_OFF, {"id": repository_id, "token": token,
                                            "error": error[:500]}).fetchone()  # fmt: skip

    def clear_backoff(self, repository_id: int) -> None:
        """Forget a repository's registry faults (the registry answered for it again)."""
        with self._connection() as conn:
            conn.execute(
                "UPDATE container_repositories SET registry_failures = 0,"
                " registry_not_before = NULL, registry_last_error = NULL"
                " WHERE id = %s AND registry_failures > 0",
                (repository_id,),
            )

    def to_front(
        self, repository_id: int, *, token: int, actor: str, why: str
    ) -> Repository | None:
        """Put a waiting repository first in line: an aborted one before every other aborted
        one, and either kind out of its registry backoff. Fenced by ``token``; one accepted
        ``to_front`` event records it. Only ``import_aborted`` and ``default`` rows move.

        :returns: the row after, or None when it is in another state or a newer token wrote it.
        """
        with self._connection() as conn, conn.transaction():
            cur = conn.cursor(row_factory=kwargs_row(Repository.from_row))
            row = cur.execute(_TO_FRONT, {"id": repository_id, "token": token}).fetchone()
            if row is not None:
                conn.execute(
                    "INSERT INTO migration_events (repository_id, from_state, to_state, event,"
                    " token, actor, message_id, detail, accepted)"
                    " VALUES (%s, %s, %s, 'to_front', %s, %s, NULL, %s, true)",
                    (row.id, row.migration_state.value, row.migration_state.value, token, actor,
                     Jsonb({"why": why})),
                )  # fmt: skip
        return row

    def backing_off(self, *, limit: int = 20) -> tuple[int, list[Repository]]:
        """Repositories waiting out a registry backoff: how many, and the next ones due."""
        with self._connection() as conn:
            row = conn.execute(
                "SELECT count(*) FROM container_repositories WHERE registry_not_before > now()"
            ).fetchone()
            cur = conn.cursor(row_factory=kwargs_row(Repository.from_row))
            rows = cur.execute(
                "SELECT * FROM container_repositories WHERE registry_not_before > now()"
                " ORDER BY registry_not_before LIMIT %s",
                (limit,),
            ).fetchall()
        return (int(row[0]) if row else 0), rows

    # -- repositories -----------------------------------------------------------------------

    def add_repository(
        self, path: str, *, created_at: datetime | None = None, tags_count: int = 0
    ) -> int:
        """Add a repository in state ``default``; return its id.

        :param path: ``root-namespace/.../name``.
        :param created_at: when the repository was created (default now); needs a UTC offset.
        :param tags_count: how many tags it has.
        :raises InvalidRepository: bad path, tags count or timestamp, or the path exists.
        """
        validate_path(path)
        if (
            isinstance(tags_count, bool)
            or not isinstance(tags_count, int)
            or not 0 <= tags_count < 2**31
        ):
            raise InvalidRepository(f"invalid tags count {tags_count!r}: expected an integer >= 0")
        if created_at is not None and created_at.tzinfo is None:
            raise InvalidRepository(f"created_at {created_at.isoformat()} has no UTC offset")
        with self._connection() as conn:
            try:
                row = conn.execute(
                    "INSERT INTO container_repositories (path, created_at, tags_count)"
                    " VALUES (%s, coalesce(%s, now()), %s) RETURNING id",
                    (path, created_at, tags_count),
                ).fetchone()
            except psycopg.errors.UniqueViolation:
                raise InvalidRepository(f"repository {path!r} exists already") from None
        assert row is not None
        return int(row[0])

    def seed(
        self,
        count: int,
        *,
        rng_seed: int = 0,
        batch_size: int = 50_000,
        progress: Callable[[int, int], None] | None = None,
    ) -> int:
        """Add ``count`` generated repositories with COPY; return how many were added.

        A realistic spread: a few hundred root namespaces of Zipf-like sizes, nested groups,
        ages over eight years (more recent ones more numerous), tags counts mostly small
        with a long tail and a few very large. Paths are unique (a counter continues after
        the table's highest id), so seeding twice adds more.

        :param count: how many repositories.
        :param rng_seed: seed of the generator (same seed, same empty table: same rows).
        :param batch_size: rows per COPY (one transaction each).
        :param progress: called with (rows done, count) after each batch.
        """
        if count < 0:
            raise ValueError("count must be >= 0")
        rng = random.Random(rng_seed)
        now = datetime.now(UTC)
        rows = _SeedRows(rng, roots=max(1, min(5_000, count // 200 + 1)), now=now)
        with self._connection() as conn:
            start = conn.execute(
                "SELECT coalesce(max(id), 0) FROM container_repositories"
            ).fetchone()[0]  # type: ignore[index]
        done = 0
        while done < count:
            size = min(batch_size, count - done)
            first = start + done
            with (
                self._connection() as conn,
                conn.transaction(),
                conn.cursor() as cur,
                cur.copy(
                    "COPY container_repositories (path, created_at, tags_count) FROM STDIN"
                ) as copy,
            ):
                # Written in chunks so the server inserts while the next chunk is made.
                for chunk in range(first, first + size, 2_000):
                    end = min(chunk + 2_000, first + size)
                    copy.write("".join([rows.line(serial) for serial in range(chunk, end)]))
            done += size
            if progress is not None:
                progress(done, count)
        with self._connection() as conn:
            conn.execute("VACUUM (ANALYZE) container_repositories")
        return done

    def get(self, repository_id: int) -> Repository | None:
        """The repository with that id, or None."""
        return self._one("SELECT * FROM container_repositories WHERE id = %s", (repository_id,))

    def get_by_path(self, path: str) -> Repository | None:
        """The repository with that path, or None."""
        if "\x00" in path:
            return None  # text cannot hold NUL (PostgreSQL refuses the query): no such path
        return self._one("SELECT * FROM container_repositories WHERE path = %s", (path,))

    def _one(self, query: str, params: tuple[object, ...]) -> Repository | None:
        with self._connection() as conn:
            cur = conn.cursor(row_factory=kwargs_row(Repository.from_row))
            return cur.execute(query.encode(), params).fetchone()

    def _many(self, query: str | sql.Composed, params: dict[str, object]) -> list[Repository]:
        with self._connection() as conn:
            cur = conn.cursor(row_factory=kwargs_row(Repository.from_row))
            text = query.encode() if isinstance(query, str) else query
            return cur.execute(text, params).fetchall()

    def events(self, repository_id: int, *, limit: int | None = None) -> list[MigrationEvent]:
        """The repository's events, oldest first (the last ``limit`` when given)."""
        with self._connection() as conn:
            cur = conn.cursor(row_factory=kwargs_row(MigrationEvent))
            rows = cur.execute(
                "SELECT * FROM (SELECT * FROM migration_events WHERE repository_id = %s"
                " ORDER BY id DESC LIMIT %s) e ORDER BY id",
                (repository_id, limit),
            ).fetchall()
        return rows

    def counts_by_state(self) -> dict[State, int]:
        """How many repositories are in each state (every state present). Scans the table."""
        counts = dict.fromkeys(State, 0)
        with self._connection() as conn:
            for state, n in conn.execute(
                "SELECT migration_state, count(*) FROM container_repositories GROUP BY 1"
            ):
                counts[State(state)] = int(n)
        return counts

    def in_flight(self) -> int:
        """How many repositories are active (count against the capacity)."""
        with self._connection() as conn:
            row = conn.execute(_COUNT_ACTIVE).fetchone()
        return int(row[0]) if row else 0

    def counts_by_skip_reason(self) -> dict[SkipReason, int]:
        """How many repositories were skipped for each reason (every reason present)."""
        counts = dict.fromkeys(SkipReason, 0)
        with self._connection() as conn:
            for reason, n in conn.execute(
                "SELECT migration_skipped_reason, count(*) FROM container_repositories"
                " WHERE migration_state = 'import_skipped' GROUP BY 1"
            ):
                if reason is not None:
                    counts[SkipReason(reason)] = int(n)
        return counts

    def count_eligible(self, settings: Settings) -> int:
        """How many repositories a run could still start or retry: the candidates, uncapped.

        Aborted ones and ready ones (``default``, created before the cut-off when set), both
        outside the deny list; what :meth:`candidates` reads, counted, except that those
        backing off after registry faults count too (they are work left; :meth:`backing_off`
        counts them). Scans the table.
        """
        query = sql.SQL(
            "SELECT count(*) FROM container_repositories WHERE (migration_state = 'import_aborted'"
            " OR (migration_state = 'default'{cutoff})){deny}"
        ).format(
            cutoff=sql.SQL(" AND created_at < %(cutoff)s" if settings.created_before else ""),
            deny=sql.SQL(
                " AND root_namespace <> ALL(%(deny)s::text[])"
                if settings.root_namespace_deny_list
                else ""
            ),
        )
        params = {
            "cutoff": settings.created_before,
            "deny": list(settings.root_namespace_deny_list),
        }
        with self._connection() as conn:
            row = conn.execute(query, params).fetchone()
        return int(row[0]) if row else 0

    def candidates(self, settings: Settings, *, limit: int = 5) -> list[Repository]:
        """The next repositories to work on: aborted ones first (oldest abort), then ready ones.

        Ready = state ``default``, created before the cut-off (when set), by created_at, id.
        Both kinds skip root namespaces in the deny list. Each part reads a partial index;
        the id-only inner select lets the deny-list filter run on index entries.
        """
        found = self._many(
            _select_ordered(
                state="import_aborted",
                order=("migration_aborted_at", "id"),
                deny=bool(settings.root_namespace_deny_list),
                cutoff=False,
                limit=limit,
            ),
            {"deny": list(settings.root_namespace_deny_list)},
        )
        if len(found) < limit:
            found += self._many(
                _select_ordered(
                    state="default",
                    order=("created_at", "id"),
                    deny=bool(settings.root_namespace_deny_list),
                    cutoff=settings.created_before is not None,
                    limit=limit - len(found),
                ),
                {
                    "deny": list(settings.root_namespace_deny_list),
                    "cutoff": settings.created_before,
                },
            )
        return found

    def waiting_time_passed(self, settings: Settings) -> bool:
        """True when ``enqueue_waiting_time`` has passed since the last finished step.

        A finished step is a pre-import done, an import done, an abort or a skip, of a
        repository still in that finished state (the reference's "last import step done at"
        of its recently_done_migration_step).
        """
        if settings.enqueue_waiting_time <= 0:
            return True
        with self._connection() as conn:
            row = conn.execute(
                WAITING_TIME_PASSED_SQL,
                {"now": None, "wait": settings.enqueue_waiting_time},  # the server's now()
            ).fetchone()
        return bool(row and row[0])

    def stale(self, settings: Settings, *, limit: int = 100) -> list[Repository]:
        """Active repositories whose last step is older than ``max_step_duration``, oldest first."""
        return self._many(
            _SELECT_STALE,
            {"age": settings.max_step_duration, "limit": limit},
        )

    def active_last_written_by(self, message_id: str) -> list[Repository]:
        """Active repositories whose latest accepted write was made by ``message_id``.

        A message redelivered after its worker died finds here the repositories its first
        delivery left in an active state, possibly before the registry call that should
        have followed.
        """
        return self._many(_SELECT_LAST_WRITTEN_BY, {"message_id": message_id})

    # -- fenced writes ----------------------------------------------------------------------

    def refused_writes(self) -> int:
        """How many fenced writes this Store had refused (stale token or state changed).

        Each one is also a ``migration_events`` row with ``accepted = false``, recorded by
        the server function that refused it.
        """
        with self._refused_lock:
            return self._refused

    def claim(
        self,
        repository_id: int,
        *,
        expected_state: State,
        event: Event,
        token: int,
        actor: str,
        message_id: str | None,
        detail: dict[str, Any] | None = None,
        seen: Repository | None = None,
    ) -> StepResult:
        """Move a repository into an active state, within the capacity.

        One call to ``migration_fenced_write`` (schema 0005): under the settings-row lock
        (serializes claims) and the repository row's, it checks the token and the expected
        state (a refusal is recorded), then enabled and capacity, then writes the
        transition and an event. The lock is held for the server's work only.

        :param repository_id: the repository.
        :param expected_state: the state the caller saw (``default`` or ``import_aborted``).
        :param event: ``start_pre_import``, ``retry_pre_import`` or ``retry_import``.
        :param token: the caller's fencing token (its lease key's create_revision).
        :param actor: who writes (actor name), for the events log.
        :param message_id: the message being processed, for the events log.
        :param detail: extra JSON for the events log.
        :param seen: the row as the caller read it, if it has it: the transition is
            computed from it, which saves a read (the function checks it under the lock;
            when it no longer holds, the row is read again).
        :raises RepositoryNotFound: no such repository.
        :raises InvalidTransition: the event is not allowed from ``expected_state``.
        """
        event = Event(event)
        if event not in CLAIM_EVENTS:
            raise ValueError(f"{event} does not enter an active state; use step()")
        return self._fenced_write(
            repository_id, expected_state=State(expected_state), event=event, claim=True,
            author=_Author(token=token, actor=actor, message_id=message_id, detail=detail),
            transition_of=lambda repo, max_retries: apply(
                repo.migration_state, event, retries_count=repo.migration_retries_count,
                max_retries=max_retries, aborted_in_state=repo.migration_aborted_in_state,
            ),
            seen=seen,
        )  # fmt: skip

    def step(
        self,
        repository_id: int,
        *,
        expected_state: State,
        event: Event,
        token: int,
        actor: str,
        message_id: str | None,
        detail: dict[str, Any] | None = None,
        skip_reason: SkipReason | None = None,
        seen: Repository | None = None,
    ) -> StepResult:
        """Write one fenced transition that does not enter an active state from outside.

        :param repository_id: the repository.
        :param expected_state: the state the caller saw; the write is refused otherwise.
        :param event: any event but the claim events (see :meth:`claim`).
        :param token: the caller's fencing token; refused when a newer one wrote the row.
        :param actor: who writes, for the events log.
        :param message_id: the message being processed, for the events log.
        :param detail: extra JSON for the events log.
        :param skip_reason: required with ``skip_import``.
        :param seen: the row as the caller read it (see :meth:`claim`); an abort reads
            the row anyway (it needs the ``max_retries`` setting).
        :raises RepositoryNotFound: no such repository.
        :raises InvalidTransition: the event is not allowed from ``expected_state``.
        """
        event = Event(event)
        if event in CLAIM_EVENTS:
            raise ValueError(f"{event} enters an active state; use claim() (capacity check)")
        reason = SkipReason(skip_reason) if skip_reason is not None else None
        return self._fenced_write(
            repository_id, expected_state=State(expected_state), event=event, claim=False,
            author=_Author(token=token, actor=actor, message_id=message_id, detail=detail),
            transition_of=lambda repo, max_retries: apply(
                repo.migration_state, event, retries_count=repo.migration_retries_count,
                max_retries=max_retries, aborted_in_state=repo.migration_aborted_in_state,
                skip_reason=reason,
            ),
            seen=seen if event is not Event.ABORT_IMPORT else None,
        )  # fmt: skip

    def undo_claim(
        self,
        repository_id: int,
        *,
        expected_state: State,
        claimed_from: State,
        token: int,
        actor: str,
        message_id: str | None,
        detail: dict[str, Any] | None = None,
        seen: Repository | None = None,
    ) -> StepResult:
        """Put a claimed repository back (the registry said 429), counting no retry. Fenced.

        :param expected_state: the claimed state (``pre_importing`` or ``importing``).
        :param claimed_from: the state the claim came from (``StepResult.transition.from_state``).
        :param token: the caller's fencing token.
        :param seen: the row as the caller read it (see :meth:`claim`).
        :raises InvalidTransition: ``claimed_from -> expected_state`` is not a claim.
        """
        back_to = State(claimed_from)
        return self._fenced_write(
            repository_id, expected_state=State(expected_state), event=UNDO_CLAIM, claim=False,
            author=_Author(token=token, actor=actor, message_id=message_id, detail=detail),
            transition_of=lambda repo, _max_retries: undo_claim(
                repo.migration_state, claimed_from=back_to,
                retries_count=repo.migration_retries_count,
                aborted_in_state=repo.migration_aborted_in_state,
            ),
            seen=seen,
        )  # fmt: skip

    def requeue(
        self,
        *,
        state: State,
        reason: SkipReason | None = None,
        since: datetime | None = None,
        path_prefix: str | None = None,
        limit: int | None = None,
        dry_run: bool = False,
    ) -> list[Repository]:
        """Move repositories that ended in ``state`` back to ``default``, retries reset.

        The operator's repair after an incident that skipped or aborted repositories that
        were not at fault. Each moved row gets ``migration_retries_count = 0`` and no skip
        reason or aborted-in state, and one accepted ``requeue`` event (actor ``operator``,
        the row's own fencing token, the old state, reason and retries in the detail). One
        transaction; the rows are locked, so a run that claims one of them at the same
        moment either wins (the row is no longer in ``state`` and is left alone) or is
        refused by its fence.

        :param state: import_skipped or import_aborted (:data:`REQUEUE_STATES`).
        :param reason: only rows skipped for this reason (import_skipped only).
        :param since: only rows that arrived in ``state`` at or after this moment.
        :param path_prefix: only rows whose path starts with this text.
        :param limit: at most this many rows, those that arrived in ``state`` first.
        :param dry_run: select and return the rows, change nothing.
        :returns: the matching rows as they were before (moved unless ``dry_run``).
        :raises ValueError: a state that may not be requeued, or a reason with
            import_aborted, or a limit below 1.
        """
        state = State(state)
        reason = SkipReason(reason) if reason is not None else None
        if state not in REQUEUE_STATES:
            allowed = ", ".join(sorted(REQUEUE_STATES))
            raise ValueError(f"cannot requeue from {state}: only from {allowed}")
        if reason is not None and state is not State.IMPORT_SKIPPED:
            raise ValueError(f"a skip reason applies to {State.IMPORT_SKIPPED} only")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        if since is not None and since.tzinfo is None:
            raise ValueError(f"since {since.isoformat()} has no UTC offset")
        arrival = sql.Identifier(ARRIVAL_COLUMN[state])
        # The state is a literal, as in the other queries (partial indexes).
        filters: list[sql.Composable] = [
            sql.SQL("migration_state = {}").format(sql.Literal(state.value))
        ]
        params: dict[str, object] = {}
        if reason is not None:
            filters.append(sql.SQL("migration_skipped_reason = %(reason)s"))
            params["reason"] = reason.value
        if since is not None:
            filters.append(sql.SQL("{} >= %(since)s").format(arrival))
            params["since"] = since
        if path_prefix:
            filters.append(sql.SQL("starts_with(path, %(prefix)s)"))
            params["prefix"] = path_prefix
        select = sql.SQL(
            "SELECT * FROM container_repositories WHERE {filters} ORDER BY {arrival}, id{limit}"
        ).format(
            filters=sql.SQL(" AND ").join(filters),
            arrival=arrival,
            limit=sql.SQL(" LIMIT {}").format(sql.Literal(limit)) if limit else sql.SQL(""),
        )
        if dry_run:
            return self._many(select, params)
        with self._connection() as conn, conn.transaction():
            cur = conn.cursor(row_factory=kwargs_row(Repository.from_row))
            # FOR UPDATE re-checks the filters on a row a concurrent write changed meanwhile
            # and skips it when it no longer matches.
            rows = cur.execute(select + sql.SQL(" FOR UPDATE"), params).fetchall()
            if not rows:
                return []
            ids = [row.id for row in rows]
            # The events first: they read the old values of the locked rows.
            conn.execute(
                "INSERT INTO migration_events (repository_id, from_state, to_state, event,"
                " token, actor, message_id, detail, accepted)"
                " SELECT id, migration_state, %(to)s, %(event)s, fencing_token, %(actor)s,"
                " NULL, jsonb_build_object('previous_state', migration_state,"
                " 'skipped_reason', migration_skipped_reason,"
                " 'retries_count', migration_retries_count,"
                " 'aborted_in_state', migration_aborted_in_state), true"
                " FROM container_repositories WHERE id = ANY(%(ids)s) ORDER BY id",
                {"to": State.DEFAULT.value, "event": REQUEUE, "actor": "operator", "ids": ids},
            )
            conn.execute(
                "UPDATE container_repositories SET migration_state = %(to)s,"
                " migration_retries_count = 0, migration_skipped_reason = NULL,"
                " migration_aborted_in_state = NULL, last_step_at = now()"
                " WHERE id = ANY(%(ids)s)",
                {"to": State.DEFAULT.value, "ids": ids},
            )
        log.info(
            "repositories_requeued", count=len(rows), from_state=state.value,
            skipped_reason=_value(reason), since=since.isoformat() if since else None,
            path_prefix=path_prefix or None,
        )  # fmt: skip
        return rows

    def _fenced_write(
        self,
        repository_id: int,
        *,
        expected_state: State,
        event: str,
        claim: bool,
        author: _Author,
        transition_of: Callable[[Repository, int], Transition],
        seen: Repository | None,
    ) -> StepResult:
        """A fenced write: one ``migration_fenced_write`` call (schema 0005), after a read.

        The transition is computed here (migration/states.py is the one state machine)
        from the row as last read, and the function writes it only when the locked row
        still holds what it was computed from. When the row shows the write fenced out,
        the function is asked to refuse it: it records the refusal under the row lock.
        When the row moved in between (``mismatch``), it is read again.

        :param event: the event name the events log records (a refusal's too).
        :param transition_of: the transition from a row and the ``max_retries`` setting.
        :param seen: the row as the caller read it, used instead of the first read when
            it is in ``expected_state``.
        """
        with self._connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            repo = seen if seen is not None and seen.migration_state is expected_state else None
            max_retries = 1  # only an abort needs the setting, and an abort reads the row
            for _attempt in range(_MISMATCH_RETRIES):
                if repo is None:
                    row = cur.execute(_READ_FOR_WRITE, (repository_id,)).fetchone()
                    if row is None:
                        raise RepositoryNotFound(f"no repository with id {repository_id}")
                    max_retries = int(row.pop("settings_max_retries") or 1)
                    repo = Repository.from_row(**row)
                transition: Transition | None = None
                if repo.fencing_token <= author.token and repo.migration_state is expected_state:
                    transition = transition_of(repo, max_retries)  # may raise InvalidTransition
                written = cur.execute(
                    _FENCED_WRITE,
                    {
                        "id": repository_id,
                        "claim": claim,
                        "from": expected_state.value,
                        "from_retries": repo.migration_retries_count,
                        "from_aborted_in": _value(repo.migration_aborted_in_state),
                        "token": author.token,
                        "to": _value(transition.to_state) if transition else None,
                        "retries": transition.retries_count if transition else None,
                        "aborted_in": _value(transition.aborted_in_state) if transition else None,
                        "reason": _value(transition.skipped_reason) if transition else None,
                        "arrival": _arrival_column(transition) if transition else None,
                        "event": str(event),
                        "actor": author.actor,
                        "message_id": author.message_id,
                        "detail": Jsonb(author.detail or {}),
                    },
                ).fetchone()
                assert written is not None
                outcome = written.pop("outcome")
                if outcome == "not_found":
                    raise RepositoryNotFound(f"no repository with id {repository_id}")
                if outcome == "mismatch":
                    repo = None  # the row moved since it was read: read it again
                    continue
                result = Repository.from_row(**written)
                if outcome in ("claimed", "stepped"):
                    return StepResult(
                        outcome=Outcome(outcome), repository=result, transition=transition
                    )
                if outcome in (Outcome.STALE_TOKEN, Outcome.STATE_CHANGED):
                    self._count_refusal(result, Outcome(outcome), event, expected_state, author)
                return StepResult(outcome=Outcome(outcome), repository=result)
        raise StoreError(
            f"repository {repository_id} changed under {_MISMATCH_RETRIES} fenced writes in a row"
        )

    def _count_refusal(
        self,
        repo: Repository,
        outcome: Outcome,
        event: str,
        expected_state: State,
        author: _Author,
    ) -> None:
        """Count and log a refusal the function recorded."""
        with self._refused_lock:
            self._refused += 1
        metrics.FENCED_WRITES_REFUSED.labels(outcome.value).inc()
        log.warning(
            "fenced_write_refused", repository_id=repo.id, migration_event=str(event),
            token=author.token, actor=author.actor, message_id=author.message_id,
            reason=outcome.value, expected_state=expected_state.value,
            row_state=repo.migration_state.value, row_token=repo.fencing_token,
        )  # fmt: skip


def _select_ordered(
    *, state: str, order: tuple[str, str], deny: bool, cutoff: bool, limit: int
) -> sql.Composed:
    # The state is a literal (see the schema's note on partial indexes); the optional
    # filters are left out of the text rather than disabled with an OR, for the same reason.
    # The limit is a literal too: under a generic plan a parameter limit is assumed large,
    # and the outer lookup by id turns into a hash join over a sequential scan.
    assert state in {"default", "import_aborted"}
    filters: list[sql.Composable] = [sql.SQL("migration_state = {}").format(sql.Literal(state))]
    if cutoff:
        filters.append(sql.SQL("created_at < %(cutoff)s"))
    if deny:
        filters.append(sql.SQL("root_namespace <> ALL(%(deny)s::text[])"))
    # A repository backing off after registry faults waits (invariant 7).
    filters.append(sql.SQL("(registry_not_before IS NULL OR registry_not_before <= now())"))
    order_by = sql.SQL(", ").join(sql.Identifier(c) for c in order)
    return sql.SQL(
        "SELECT * FROM container_repositories WHERE id IN ("
        " SELECT id FROM container_repositories WHERE {filters} ORDER BY {order} LIMIT {limit})"
        " ORDER BY {order}"
    ).format(filters=sql.SQL(" AND ").join(filters), order=order_by, limit=sql.Literal(int(limit)))


_WORDS = (
    "api", "app", "web", "core", "data", "infra", "ml", "ops", "auth", "billing", "search",
    "mobile", "docs", "tools", "edge", "cache", "queue", "media", "agent", "runner", "build",
    "deploy", "frontend", "backend", "platform", "security", "analytics", "payments", "chat",
)  # fmt: skip
_IMAGES = ("base", "ci", "dev", "prod", "cache", "builder", "runtime", "test", "debug")


class _SeedRows:
    """Generates seed rows as COPY text lines; formatting is precomputed to keep it fast."""

    def __init__(self, rng: random.Random, *, roots: int, now: datetime) -> None:
        self._rng = rng
        self._roots = roots
        today = now.replace(hour=0, minute=0, second=0, microsecond=0)
        # "YYYY-MM-DD" for each of the last eight years, newest first.
        self._days = [(today - timedelta(days=d)).strftime("%Y-%m-%d") for d in range(2920)]

    def line(self, serial: int) -> str:
        rng = self._rng
        # Root namespaces are Zipf-like: a few large organisations, many small ones.
        root = int(self._roots * rng.random() ** 3)
        path = f"{_WORDS[root % len(_WORDS)]}-org-{root}"
        if rng.random() < 0.45:
            path += f"/{rng.choice(_WORDS)}-{rng.randrange(40)}"
            if rng.random() < 0.2:
                path += f"/{rng.choice(_WORDS)}"
        path += f"/{rng.choice(_WORDS)}-{serial:x}"  # the serial makes the path unique
        if rng.random() < 0.35:
            path += f"/{rng.choice(_IMAGES)}"
        # More recent repositories are more numerous. Day 0 is today: keep its time early
        # enough to be in the past for any "now" later on.
        day = int(2920 * rng.random() ** 1.6)
        second = rng.randrange(86_400) if day else 0
        hours, rest = divmod(second, 3600)
        stamp = f"{self._days[day]} {hours:02d}:{rest // 60:02d}:{rest % 60:02d}+00"
        draw = rng.random()
        if draw < 0.001:
            tags = rng.randrange(10_000, 250_000)  # a few very large
        elif draw < 0.03:
            tags = rng.randrange(500, 10_000)  # the long tail
        else:
            tags = min(int(rng.lognormvariate(1.6, 1.2)), 499)  # most are small
        return f"{path}\t{stamp}\t{tags}\n"
