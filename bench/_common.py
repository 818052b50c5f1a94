"""What the migration benchmarks share: a fresh database, a local migration, sampling, logs.

Pieces:

- :func:`stack_env`: the ``MIGRATOR_*`` addresses of the local stack (started when down).
- :func:`fresh_database`: a new database with the schema, dropped afterwards.
- :func:`add_repositories`: COPY plain repository rows (old enough to be eligible).
- :class:`InFlightSampler`: samples the repositories in flight in a background thread.
- :class:`LogWindow`: the JSON lines the workers logged since a mark.
- :func:`reference_cpu_ms`: this machine's speed now, as the CPU time of a fixed workload.
- :func:`wait_until`, :func:`table`: small helpers.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

from bench import support
from devtools.demo import drop_database, recreate_database
from migration.store import Store

STACK_VARIABLES = ("MIGRATOR_DATABASE_URL", "MIGRATOR_ETCD_ENDPOINTS", "MIGRATOR_BROKER_URL")


def stack_env() -> dict[str, str]:
    """PostgreSQL, etcd and RabbitMQ addresses (``deploy/local/stack up`` when one is down)."""
    return support.ensure_stack(list(STACK_VARIABLES), with_redis=False)


@contextlib.contextmanager
def fresh_database(base_url: str, *, label: str) -> Iterator[str]:
    """A new database ``bench_<label>_<random>`` with the schema applied; dropped afterwards.

    :param base_url: a URL of the PostgreSQL server.
    :param label: part of the name, saying which benchmark made it.
    """
    name = f"bench_{label}_{uuid.uuid4().hex[:8]}"
    url = recreate_database(base_url, name)
    try:
        yield url
    finally:
        drop_database(base_url, name)


def add_repositories(database_url: str, paths: Iterable[str]) -> list[int]:
    """Insert plain repositories (state default, 3 tags, created a day ago); their ids."""
    created = datetime.now(UTC) - timedelta(days=1)
    rows = list(paths)
    with Store(database_url, max_size=1) as store:  # the store's one seeder
        return store.add_repositories(
            (path, created - timedelta(microseconds=len(rows) - n), 3)
            for n, path in enumerate(rows)
        )


def terminal_count(database_url: str, ids: Sequence[int]) -> int:
    """How many of ``ids`` are import_done or import_skipped."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM container_repositories WHERE id = ANY(%s)"
            " AND migration_state IN ('import_done', 'import_skipped')",
            (list(ids),),
        ).fetchone()
    return int(row[0]) if row else 0


def event_span(database_url: str, ids: Sequence[int]) -> tuple[datetime, datetime] | None:
    """(first, last) accepted state change of ``ids`` (database clock)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT min(at), max(at) FROM migration_events WHERE accepted"
            " AND repository_id = ANY(%s)",
            (list(ids),),
        ).fetchone()
    if not row or row[0] is None:
        return None
    return row[0], row[1]


def step_gaps(database_url: str, ids: Sequence[int]) -> dict[str, float]:
    """Mean seconds from each accepted state change of ``ids`` to the next one, by the state
    it led to (database clock): where a repository's time in flight goes."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT to_state, avg(gap), count(*) FROM ("
            " SELECT to_state, extract(epoch FROM at - lag(at) OVER ("
            "  PARTITION BY repository_id ORDER BY id)) AS gap"
            " FROM migration_events WHERE accepted AND to_state IS NOT NULL"
            " AND repository_id = ANY(%s)) AS steps"
            " WHERE gap IS NOT NULL GROUP BY to_state",
            (list(ids),),
        ).fetchall()
    return {str(state): float(gap) for state, gap, _ in rows}


class InFlightSampler:
    """Counts the repositories in flight every ``interval`` seconds, in a thread.

    :param store: a Store on the migration's database.
    :param interval: seconds between samples.
    """

    def __init__(self, store: Store, *, interval: float = 0.2) -> None:
        self.store = store
        self.interval = interval
        self.samples: list[tuple[datetime, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="in-flight-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):  # a blip loses one sample, not the run
                self.samples.append((datetime.now(UTC), self.store.in_flight()))
            self._stop.wait(self.interval)

    def __enter__(self) -> InFlightSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def mean_between(self, first: datetime, last: datetime) -> float:
        """Mean in flight over the samples taken between ``first`` and ``last``."""
        values = [n for at, n in self.samples if first <= at <= last]
        return statistics.fmean(values) if values else 0.0


class LogWindow:
    """The JSON lines written to some log files after a mark (by byte offset).

    :param paths: the log files (e.g. every worker's).
    """

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)
        self.offsets = {p: p.stat().st_size if p.exists() else 0 for p in self.paths}

    def lines(self, event: str | None = None) -> list[dict[str, Any]]:
        """Lines logged since the mark, optionally only those of ``event``."""
        found: list[dict[str, Any]] = []
        needle = f'"{event}"'.encode() if event else b""
        for path in self.paths:
            try:
                with open(path, "rb") as log:
                    log.seek(self.offsets[path])
                    data = log.read()
            except OSError:
                continue
            for raw in data.splitlines():
                if not raw.startswith(b"{") or needle not in raw:
                    continue
                try:
                    line = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(line, dict) and (event is None or line.get("event") == event):
                    found.append(line)
        return found


def wait_until(
    condition: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.2
) -> None:
    """Poll ``condition`` until true; exit with a clear line after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: {what} not reached within {timeout:.0f} s")
        time.sleep(interval)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain text table, right-aligned numbers, ``headers`` first."""
    cells = [[str(h) for h in headers], *[[_cell(v) for v in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def note(text: str) -> None:
    """A progress line on stderr (the table and headline go to stdout)."""
    print(f"bench: {text}", file=sys.stderr, flush=True)


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of ``pids`` (seconds; exited ones count 0)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / ticks


#: The local stack's servers by process name (``comm``): PostgreSQL's postmaster and
#: backends, etcd, RabbitMQ's Erlang VM.
SERVER_PROCESSES = {"postgres": "PostgreSQL", "etcd": "etcd", "beam.smp": "RabbitMQ"}


def server_ticks() -> dict[int, tuple[str, int]]:
    """pid -> (server, utime + stime in clock ticks) of every running server process."""
    found: dict[int, tuple[str, int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                head, tail = stat.read().rsplit(b")", 1)
        except OSError:
            continue
        server = SERVER_PROCESSES.get(head.split(b"(", 1)[1].decode(errors="replace"))
        if server is not None:
            fields = tail.split()
            found[int(entry.name)] = (server, int(fields[11]) + int(fields[12]))
    return found


def server_seconds_since(before: dict[int, tuple[str, int]]) -> dict[str, float]:
    """CPU seconds each server spent since :func:`server_ticks` returned ``before``
    (a process that started since counts whole; one that exited since is not counted)."""
    spent: dict[str, float] = dict.fromkeys(SERVER_PROCESSES.values(), 0.0)
    ticks = os.sysconf("SC_CLK_TCK")
    for pid, (server, now) in server_ticks().items():
        then = before.get(pid)
        spent[server] += (now - (then[1] if then and then[0] == server else 0)) / ticks
    return spent


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat: every state but
    idle and iowait, summed over the cores): servers, benchmarks and anything else."""
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is inside user already)
    busy = sum(fields[:3]) + sum(fields[5:8])
    return busy / os.sysconf("SC_CLK_TCK")


def _reference_workload() -> int:
    # What our processes do most, in miniature: calls, dicts, JSON, string formatting.
    size = 0
    for i in range(4_000):
        record = {"event": "step", "repository_id": i, "path": f"group/repo-{i}", "ok": True}
        text = json.dumps(record)
        size += len(json.loads(text)["path"]) + len(f"{i}:{text[:20]}")
    return size


def reference_cpu_ms(*, repeat: int = 5) -> float:
    """Milliseconds of CPU a fixed pure-Python workload takes now (the median of ``repeat``).

    The machine's speed drifts, within seconds and by up to twice (other tenants, the
    host's clock): this workload took 24 to 46 ms, tried 15 times in a row, and the same
    tree measured minutes apart spent 20 and 31 ms of CPU per repository in
    bench/pipeline.py. See :class:`ReferenceSampler` for a run's average.
    """
    times = []
    for _ in range(repeat):
        began = time.thread_time()
        _reference_workload()
        times.append((time.thread_time() - began) * 1e3)
    return statistics.median(times)


class ReferenceSampler:
    """Times the reference workload (:func:`reference_cpu_ms`, once) every ``interval``
    seconds in a thread, while a measurement runs: its mean says how fast the machine was
    meanwhile, and CPU times divided by it compare across runs. It costs about 3 % of one core.

    :param interval: seconds between samples.
    """

    #: The workload's CPU time on this machine at its fast end (the scale's unit).
    NOMINAL_MS = 25.0

    def __init__(self, *, interval: float = 1.0) -> None:
        self.interval = interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> ReferenceSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while True:
            self.samples.append(reference_cpu_ms(repeat=1))
            if self._stop.wait(self.interval):
                return

    @property
    def mean_ms(self) -> float:
        """The workload's mean CPU time during the measurement."""
        return statistics.fmean(self.samples) if self.samples else float("nan")

    def at_nominal(self, cpu_ms: float) -> float:
        """``cpu_ms`` as it would have been at the nominal speed (scaled by the samples)."""
        return cpu_ms * self.NOMINAL_MS / self.mean_ms
