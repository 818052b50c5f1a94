"""The pieces of ``registry-migrator demo``: a fresh database, a realistic seed, progress.

- :func:`recreate_database`: drop and create the demo's own database (never the configured
  one), then apply the schema.
- :func:`plan_repositories`: N repository rows with a realistic spread: tags counts mostly
  small with a few over the limit, one denied root namespace, a share the simulator fails
  once or always (path markers ``fail-once`` / ``fail-always`` / ``fail-import-once``), a
  few ``native`` (already imported) and ``missing`` (not found).
- :class:`Progress`: the rate and ETA from successive snapshots.
- :func:`live_view`, :func:`progress_line`, :func:`summary_table`: what is shown.
- :func:`busy_lease_runs`: enqueuer runs that found a busy lease, from the workers' JSON logs.
"""

from __future__ import annotations

import json
import random
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql
from rich.console import Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from migration.states import State
from migration.store import Store
from migration.store.seed import insert_repositories as store_insert
from migration.store.status import migration_seconds as store_migration_seconds
from service.status import DONE_REASON_LABEL, STATE_STYLE, MigrationStatus

#: The root namespace the demo puts in the deny list.
DENIED_NAMESPACE = "legacy-vault"
#: Root namespaces of the other repositories, largest first (sizes are Zipf-like).
NAMESPACES = ("acme", "globex", "initech", "umbrella", "hooli", "stark", "wayne", "tyrell")
#: Tags above this are skipped (too_many_tags) in the demo.
MAX_TAGS = 1000
#: Share of repositories per special kind: (share, path marker or namespace, description).
SPECIAL_SHARES: tuple[tuple[str, float], ...] = (
    ("denied", 0.02),  # root namespace in the deny list: never picked
    ("too_many_tags", 0.02),  # skipped: too_many_tags
    ("fail-once", 0.05),  # first pre-import fails: aborted once, then done
    ("fail-always", 0.02),  # every pre-import fails: skipped after max_retries
    ("fail-import-once", 0.02),  # first final import fails: retried from the import
    ("native", 0.02),  # registry answers 200: done, reason native_import
    ("missing", 0.01),  # registry answers 404: done, reason not_found
)
_WORDS = ("api", "web", "worker", "billing", "search", "auth", "cache", "ml", "docs", "ops")
_IMAGES = ("base", "builder", "runtime", "ci", "debug")


class DemoDatabaseError(RuntimeError):
    """The demo database cannot be made (one line)."""


def database_url_for(base_url: str, name: str) -> str:
    """``base_url`` with its database name replaced by ``name``."""
    parts = urlsplit(base_url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def recreate_database(base_url: str, name: str) -> str:
    """Drop database ``name`` if it exists, create it, apply the schema; return its URL.

    :param base_url: a URL of the PostgreSQL server (``MIGRATOR_DATABASE_URL``).
    :param name: the demo database's name; must differ from ``base_url``'s database, so the
        demo can never drop the migration's own data.
    :raises DemoDatabaseError: same name, or PostgreSQL refused.
    """
    if not name.replace("_", "").isalnum() or not name[0].isalpha():
        raise DemoDatabaseError(f"database name {name!r}: letters, digits and _ only")
    if urlsplit(base_url).path.lstrip("/") == name:
        raise DemoDatabaseError(
            f"the demo database {name!r} is MIGRATOR_DATABASE_URL's database; "
            "choose another --database (the demo drops and recreates it)"
        )
    try:
        with psycopg.connect(base_url, dbname="postgres", autocommit=True, connect_timeout=5) as c:
            c.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
            c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.Error as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DemoDatabaseError(f"cannot create database {name!r}: {first}") from None
    url = database_url_for(base_url, name)
    with Store(url, max_size=1) as store:
        store.upgrade()
    return url


def drop_database(base_url: str, name: str) -> None:
    """Drop database ``name`` if it exists (tests clean up with it)."""
    drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
    with psycopg.connect(base_url, dbname="postgres", autocommit=True, connect_timeout=5) as c:
        c.execute(drop)


@dataclass(frozen=True)
class PlannedRepository:
    """A repository row to insert."""

    path: str
    created_at: datetime
    tags_count: int


def _special_counts(count: int) -> dict[str, int]:
    counts: dict[str, int] = {}
    left = count
    for kind, share in SPECIAL_SHARES:
        n = max(1, round(share * count)) if count >= 20 else round(share * count)
        n = min(n, left)
        counts[kind] = n
        left -= n
    return counts


def plan_repositories(count: int, *, seed: int) -> list[PlannedRepository]:
    """``count`` repositories with the demo's spread (same seed, same rows).

    :param count: how many.
    :param seed: seed of the random generator.
    """
    rng = random.Random(seed)
    kinds: list[str] = []
    for kind, n in _special_counts(count).items():
        kinds += [kind] * n
    kinds += ["normal"] * (count - len(kinds))
    rng.shuffle(kinds)
    weights = [1 / (rank + 1) for rank in range(len(NAMESPACES))]
    now = datetime.now(UTC).replace(microsecond=0)
    planned = []
    for serial, kind in enumerate(kinds):
        root = DENIED_NAMESPACE if kind == "denied" else rng.choices(NAMESPACES, weights)[0]
        name = f"{rng.choice(_WORDS)}-{serial}"
        if kind in {"fail-once", "fail-always", "fail-import-once", "native", "missing"}:
            name += f"-{kind}"
        path = f"{root}/{rng.choice(_WORDS)}/{name}"
        if rng.random() < 0.3:
            path += f"/{rng.choice(_IMAGES)}"
        if kind == "too_many_tags":
            tags = rng.randrange(MAX_TAGS + 1, 20 * MAX_TAGS)
        else:
            tags = min(int(rng.lognormvariate(2.0, 1.2)), MAX_TAGS)
        created = now - timedelta(days=1 + int(1800 * rng.random() ** 1.5))
        planned.append(PlannedRepository(path, created, tags))
    return planned


def insert_repositories(database_url: str, rows: Iterable[PlannedRepository]) -> int:
    """Insert ``rows`` with the store's one seeder; return how many."""
    with psycopg.connect(database_url, connect_timeout=5) as conn:
        return store_insert(conn, ((r.path, r.created_at, r.tags_count) for r in rows))


def migration_seconds(database_url: str) -> float | None:
    """Seconds from the first accepted write to the last one (the migration's own span).

    Measured in the database so that process start-up and shutdown are not counted.
    """
    with psycopg.connect(database_url, connect_timeout=5) as conn:
        return store_migration_seconds(conn)


class Progress:
    """Repositories per minute and ETA from the terminal count over a sliding window.

    :param window: seconds of history the rate is computed over.
    """

    def __init__(self, *, window: float = 30.0) -> None:
        self.started = time.monotonic()
        self._window = window
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, terminal: int) -> None:
        """Record the terminal count now."""
        now = time.monotonic()
        self._samples.append((now, terminal))
        while len(self._samples) > 2 and now - self._samples[0][0] > self._window:
            self._samples.popleft()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def per_minute(self) -> float:
        """Repositories that became terminal per minute, over the window."""
        if len(self._samples) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        return 60.0 * (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def eta_s(self, remaining: int) -> float | None:
        """Seconds until ``remaining`` more are terminal at the current rate (None: unknown)."""
        rate = self.per_minute()
        if remaining == 0:
            return 0.0
        return 60.0 * remaining / rate if rate > 0 else None


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _leases(status: MigrationStatus) -> str:
    return str(len(status.leases)) if status.leases is not None else "?"


def progress_line(status: MigrationStatus, progress: Progress) -> str:
    """One plain line (``--no-live``)."""
    c = status.counts
    eligible = status.total - status.excluded_by_deny_list - status.excluded_by_cutoff
    return (
        f"[{progress.elapsed:6.1f}s] terminal {status.terminal}/{eligible} "
        f"(done {c['import_done']}, skipped {c['import_skipped']}), "
        f"aborted {c['import_aborted']}, default {c['default'] - status.excluded_by_deny_list}, "
        f"in flight {status.in_flight}/{status.capacity}, "
        f"{progress.per_minute():.0f}/min, "
        f"ETA {_duration(progress.eta_s(status.eligible_remaining))}, "
        f"leases {_leases(status)}"
    )


def live_view(status: MigrationStatus, progress: Progress) -> RenderableType:
    """The live screen: a bar per state, rate, ETA, in flight vs capacity, leases held."""
    table = Table(show_edge=False, box=None, padding=(0, 1))
    table.add_column("state")
    table.add_column("", width=42)
    table.add_column("count", justify="right")
    for state in State:
        n = status.counts[state.value]
        if state is State.DEFAULT:
            n -= status.excluded_by_deny_list
        bar = ProgressBar(total=max(status.total, 1), completed=n, width=40,
                          complete_style=STATE_STYLE[state])  # fmt: skip
        table.add_row(Text(state.value, style=STATE_STYLE[state]), bar, f"{n:,}")
    if status.excluded_by_deny_list:
        table.add_row("excluded (deny list)", "", f"{status.excluded_by_deny_list:,}")
    in_flight = ProgressBar(total=max(status.capacity, 1), completed=status.in_flight, width=40)
    table.add_row(Text("in flight", style="bold"), in_flight,
                  f"{status.in_flight}/{status.capacity}")  # fmt: skip
    eligible = status.total - status.excluded_by_deny_list - status.excluded_by_cutoff
    head = Text.assemble(
        ("registry-migrator demo", "bold"),
        f"  {progress.elapsed:.0f}s elapsed   terminal {status.terminal}/{eligible}   ",
        (f"{progress.per_minute():.0f} repositories/min", "bold"),
        f"   ETA {_duration(progress.eta_s(status.eligible_remaining))}",
        f"   leases held {_leases(status)}",
    )
    return Group(head, table, Text("Ctrl-C stops every process cleanly.", style="dim"))


def busy_lease_runs(log_files: Iterable[Path]) -> tuple[int, int]:
    """(enqueuer runs, runs that found a busy lease) from worker JSON log files.

    A run logs one ``enqueue_next_migration`` line; ``"lease_already_taken": true`` means at
    least one candidate's lease was held by another run (which then tried the next one).
    """
    runs = busy = 0
    for path in log_files:
        try:
            handle = open(path, "rb")  # noqa: SIM115 - closed below
        except OSError:
            continue
        with handle:
            for raw in handle:
                if b'"enqueue_next_migration"' not in raw or not raw.startswith(b"{"):
                    continue
                try:
                    line = json.loads(raw)
                except ValueError:
                    continue
                if line.get("event") != "enqueue_next_migration":
                    continue
                runs += 1
                busy += line.get("lease_already_taken") is True
    return runs, busy


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """How the demo ended, for the summary."""

    status: MigrationStatus
    elapsed_s: float
    finished: bool
    enqueuer_runs: int
    busy_lease_runs: int
    registry: dict[str, object] | None


def summary_table(outcome: Outcome) -> Table:
    """The closing summary: final counts, skip reasons, duration, throughput, busy leases."""
    status = outcome.status
    table = Table(title="demo summary", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    for state in State:
        n = status.counts[state.value]
        if n or state in (State.IMPORT_DONE, State.IMPORT_SKIPPED):
            shown = n - (status.excluded_by_deny_list if state is State.DEFAULT else 0)
            if shown:
                table.add_row(Text(state.value, style=STATE_STYLE[state]), f"{shown:,}")
    for reason, n in status.done_by_reason.items():
        table.add_row(f"  {DONE_REASON_LABEL.get(reason, reason)}", f"{n:,}")
    for reason, n in status.skipped_by_reason.items():
        table.add_row(f"  skipped: {reason}", f"{n:,}")
    table.add_row("excluded by deny list (never picked)", f"{status.excluded_by_deny_list:,}")
    table.add_row("every eligible repository terminal", "yes" if outcome.finished else "NO")
    table.add_row("duration (first to last state change)", _duration(outcome.elapsed_s))
    minutes = max(outcome.elapsed_s / 60.0, 1e-9)
    table.add_row("throughput", f"{status.terminal / minutes:.0f} repositories/min")
    table.add_row("enqueuer runs", f"{outcome.enqueuer_runs:,}")
    table.add_row("runs that found a busy lease", f"{outcome.busy_lease_runs:,}")
    if outcome.registry is not None:
        table.add_row("registry: most imports at once",
                      f"{outcome.registry.get('max_concurrent_imports')} "
                      f"(capacity {status.capacity})")  # fmt: skip
        doubles = outcome.registry.get("double_start_attempts")
        table.add_row(
            "registry: starts refused as already running",
            str(len(doubles)) if isinstance(doubles, list) else "?",
        )
    return table
