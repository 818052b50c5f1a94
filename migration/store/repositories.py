"""Repositories: add, read, count, select the candidates, back off, requeue."""

from __future__ import annotations

from datetime import datetime

import psycopg
from psycopg import sql
from psycopg.rows import kwargs_row
from psycopg.types.json import Jsonb

from migration.settings import Settings
from migration.states import ARRIVAL_COLUMN, REQUEUE, REQUEUE_STATES, SkipReason, State
from migration.store.base import StoreBase, log
from migration.store.model import (
    Candidate,
    InvalidRepository,
    MigrationEvent,
    Repository,
    _value,
    candidate_rows,
    validate_path,
)
from migration.store.sql import (
    BACK_OFF,
    COUNT_ACTIVE,
    SELECT_LAST_WRITTEN_BY,
    SELECT_ONE,
    SELECT_STALE,
    TO_FRONT,
    candidates_query,
)
from migration.store.status import waiting_time_passed_on


class RepositoriesMixin(StoreBase):
    """Repositories: add, read, count, select, back off, requeue."""

    def back_off(self, repository_id: int, *, token: int, error: str) -> Repository | None:
        """Count a registry fault against a repository's backoff, never its retries.

        The repository is not picked again before ``registry_not_before``: 5 s doubled per
        fault in a row, capped by the ``registry_backoff_max`` setting, with equal jitter (so
        repositories that failed together come back apart). Fenced by ``token``.

        :returns: the row after, or None when a newer token has written it (nothing changed).
        """
        with self._connection() as conn:
            cur = conn.cursor(row_factory=kwargs_row(Repository.from_row))
            return cur.execute(BACK_OFF, {"id": repository_id, "token": token,
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
            row = cur.execute(TO_FRONT, {"id": repository_id, "token": token}).fetchone()
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

    def get(self, repository_id: int) -> Repository | None:
        """The repository with that id, or None."""
        return self._one(SELECT_ONE, (repository_id,))

    def get_by_path(self, path: str) -> Repository | None:
        """The repository with that path, or None."""
        if "\x00" in path:
            return None  # text cannot hold NUL (PostgreSQL refuses the query): no such path
        return self._one("SELECT * FROM container_repositories WHERE path = %s", (path,))

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
            row = conn.execute(COUNT_ACTIVE).fetchone()
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

    def candidates(self, settings: Settings, *, limit: int = 5) -> list[Candidate]:
        """The next repositories to work on: aborted ones first (oldest abort), then ready ones.

        Ready = state ``default``, created before the cut-off (when set), by created_at, id.
        Both kinds skip root namespaces in the deny list. Each part reads a partial index;
        the id-only inner select lets the deny-list filter run on index entries. Each is a
        :class:`Candidate` (the fields to order, lease and claim it), not the whole row.
        """
        query, params = _candidates_query(settings, limit)
        with self._connection() as conn:
            found = conn.cursor(row_factory=candidate_rows).execute(query, params).fetchall()
        return _candidate_order(found)[:limit]

    def in_flight_and_candidates(
        self, settings: Settings, *, limit: int
    ) -> tuple[int, list[Candidate]]:
        """:meth:`in_flight` and :meth:`candidates` in one round trip (psycopg's pipeline
        mode: both queries sent, then one wait), for an enqueuer run, which needs both
        whenever it starts a repository.

        :returns: the active repositories' count, and the candidates as
            :meth:`candidates` orders them.
        """
        query, params = _candidates_query(settings, limit)
        with self._connection() as conn:
            with conn.pipeline():
                counted = conn.execute(COUNT_ACTIVE)
                listed = conn.cursor(row_factory=candidate_rows).execute(query, params)
            row = counted.fetchone()
            found = listed.fetchall()
        return (int(row[0]) if row else 0), _candidate_order(found)[:limit]

    def waiting_time_passed(self, settings: Settings) -> bool:
        """True when ``enqueue_waiting_time`` has passed since the last finished step.

        A finished step is a pre-import done, an import done, an abort or a skip, of a
        repository still in that finished state (the reference's "last import step done at"
        of its recently_done_migration_step).
        """
        if settings.enqueue_waiting_time <= 0:
            return True
        with self._connection() as conn:
            return waiting_time_passed_on(conn, settings)  # the server's now()

    def stale(self, settings: Settings, *, limit: int = 100) -> list[Repository]:
        """Active repositories whose last step is older than ``max_step_duration``, oldest first."""
        return self._many(
            SELECT_STALE,
            {"age": settings.max_step_duration, "limit": limit},
        )

    def active_last_written_by(self, message_id: str) -> list[Repository]:
        """Active repositories whose latest accepted write was made by ``message_id``.

        A message redelivered after its worker died finds here the repositories its first
        delivery left in an active state, possibly before the registry call that should
        have followed.
        """
        return self._many(SELECT_LAST_WRITTEN_BY, {"message_id": message_id})

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


def _candidate_order(found: list[Candidate]) -> list[Candidate]:
    """Aborted ones first (oldest abort), then ready ones by age: UNION ALL promises no
    order, each part comes in its own."""
    return sorted(
        found, key=lambda c: (c.migration_state is not State.IMPORT_ABORTED, c.order_at, c.id)
    )


def _candidates_query(settings: Settings, limit: int) -> tuple[bytes, dict[str, object]]:
    """The candidates' query for ``settings`` (each part limited to ``limit``), and its
    parameters."""
    query = candidates_query(
        deny=bool(settings.root_namespace_deny_list),
        cutoff=settings.created_before is not None,
        limit=limit,
    )
    return query, {
        "deny": list(settings.root_namespace_deny_list),
        "cutoff": settings.created_before,
    }
