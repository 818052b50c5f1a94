"""Inserting repositories in bulk: the one seeder.

:func:`insert_repositories` is the only place rows are inserted in bulk (COPY); the store's
:meth:`~SeedMixin.seed` (a realistic spread at any size), :meth:`~SeedMixin.add_repositories`
(given rows, their ids back), the demo's and the tests' plans and the benchmarks all go
through it, each with its own plan of paths.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from itertools import islice
from typing import Any

import psycopg

from migration.store.base import StoreBase
from migration.store.model import InvalidRepository

#: A repository to insert: (path, created_at, tags_count). ``created_at`` is a datetime
#: with a UTC offset, or the text PostgreSQL reads as one ("2026-01-02 03:04:05+00").
NewRepository = tuple[str, datetime | str, int]
# Rows per COPY write: the server inserts one chunk while the next is made.
_CHUNK = 2_000


def _line(row: NewRepository) -> str:
    path, created_at, tags_count = row
    # COPY text format: a tab, newline or backslash in a value would need escaping; valid
    # paths (validate_path) have none, so one in a path is an error, not something to escape.
    if "\t" in path or "\n" in path or "\\" in path:
        raise InvalidRepository(f"invalid repository path {path!r}")
    if isinstance(created_at, datetime):
        if created_at.tzinfo is None:
            raise InvalidRepository(f"created_at {created_at.isoformat()} has no UTC offset")
        created_at = created_at.isoformat()
    return f"{path}\t{created_at}\t{int(tags_count)}\n"


def insert_repositories(conn: psycopg.Connection[Any], rows: Iterable[NewRepository]) -> int:
    """COPY ``rows`` into ``container_repositories`` (state ``default``); how many.

    Runs in the connection's current transaction (autocommit: its own).

    :param conn: a connection to the store's database.
    :param rows: (path, created_at, tags_count) each.
    :raises psycopg.errors.UniqueViolation: a path exists already (nothing is inserted).
    """
    done = 0
    rows = iter(rows)
    with (
        conn.cursor() as cur,
        cur.copy("COPY container_repositories (path, created_at, tags_count) FROM STDIN") as copy,
    ):
        while chunk := list(islice(rows, _CHUNK)):
            copy.write("".join([_line(row) for row in chunk]))
            done += len(chunk)
    return done


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

    def row(self, serial: int) -> NewRepository:
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
        return path, stamp, tags


class SeedMixin(StoreBase):
    """Generated repositories."""

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
            with self._connection() as conn, conn.transaction():
                insert_repositories(
                    conn, (rows.row(serial) for serial in range(first, first + size))
                )
            done += size
            if progress is not None:
                progress(done, count)
        with self._connection() as conn:
            conn.execute("VACUUM (ANALYZE) container_repositories")
        return done

    def add_repositories(self, rows: Iterable[NewRepository]) -> list[int]:
        """Insert ``rows`` (state ``default``) in one transaction; their ids, in that order.

        :raises InvalidRepository: a path is repeated or exists already, or a row is
            malformed; nothing is inserted.
        """
        planned = list(rows)
        with self._connection() as conn:
            try:
                with conn.transaction():
                    insert_repositories(conn, planned)
            except psycopg.errors.UniqueViolation:
                raise InvalidRepository("a repository to add exists already") from None
            ids = dict(
                conn.execute(
                    "SELECT path, id FROM container_repositories WHERE path = ANY(%s)",
                    ([path for path, _, _ in planned],),
                ).fetchall()
            )
        return [int(ids[path]) for path, _, _ in planned]
