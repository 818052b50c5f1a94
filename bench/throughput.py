"""The reference's problem: one fixed lease key against one lease per repository.

One local migration (simulator, API, scheduler, 4 ``dramatiq actors`` workers x 8 threads)
migrates batches of repositories. The ``lease_scope`` setting is live, so the two modes take
turns on the same processes, in the order A B B A, and the machine's noise hits both alike:

- ``global``: every enqueuer run takes one fixed key (the reference before the change), so
  runs are serial, each holding the key through its registry start call;
- ``repository``: each run takes only its repository's key.

Two workloads:

- ``migration-bound`` (the issue's): start call 100 ms, pre-import and import 1-3 s each,
  capacity 40. Global mode is bounded by its serial start calls, about 1 / (start latency +
  overhead) runs a second; repository mode by the capacity, capacity / (time in flight)
  repositories a second. With 1-3 s migrations both bounds are close, so the ratio is small.
- ``start-bound``: the same start call, migrations of 0.05-0.1 s: the start call dominates.
  Repository mode's bound is then capacity (or threads) over about two start calls, and the
  ratio can approach min(concurrent runs, capacity) / 2 at most (each repository needs a
  pre-import and a final start call; the final one is not under the global key).

Per round: repositories per minute (first to last accepted state change, database clock),
capacity utilisation (mean in flight / capacity, sampled every 0.2 s), enqueuer runs and runs
that found a busy lease (``"lease_already_taken": true`` in the workers' logs), the global
key's mean hold time. The expected bound of each mode is computed and shown as measured /
expected.

Usage::

    uv run python bench/throughput.py            # about 7 minutes
    uv run python bench/throughput.py --quick    # under a minute

Prints tables, writes bench/results/throughput.json, and the headline as its last line.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import _common, support
from devtools.launcher import LocalMigration
from migration.store import Store

START_LATENCY = 0.1
CAPACITY = 40
GOAL_SHARE = 0.9  # of min(concurrent runs, capacity), where the start call dominates


@dataclass(frozen=True)
class Workload:
    """A simulator setting and how many repositories each mode migrates."""

    name: str
    pre_import_seconds: tuple[float, float]
    import_seconds: tuple[float, float]
    repositories: int  # per mode
    rounds: int  # per mode (order A B B A ...)

    @property
    def mean_migration(self) -> float:
        return sum(self.pre_import_seconds) / 2 + sum(self.import_seconds) / 2


def expected_bounds(
    workload: Workload, *, start_latency: float, capacity: int, threads: int
) -> dict[str, Any]:
    """Repositories per second each mode can reach at most, from the workload's timings.

    - global: one run at a time holds the key through its start call: 1 / start latency,
      and never more than the capacity bound;
    - repository: capacity / time in flight (two start calls plus both phases), or all
      worker threads busy on start calls (two per repository), whichever is lower.
    """
    in_flight_time = workload.mean_migration + 2 * start_latency
    capacity_bound = capacity / in_flight_time
    threads_bound = threads / (2 * start_latency)
    global_bound = min(1 / start_latency, capacity_bound)
    repository_bound = min(capacity_bound, threads_bound)
    return {
        "global_per_s": global_bound,
        "repository_per_s": repository_bound,
        "capacity_bound_per_s": capacity_bound,
        "threads_bound_per_s": threads_bound,
        "ratio": repository_bound / global_bound,
        "repository_limited_by": "capacity" if capacity_bound <= threads_bound else "threads",
    }


def order(rounds: int, first: str, second: str) -> list[str]:
    """A B B A A B ... of ``rounds`` turns each."""
    turns: list[str] = []
    for n in range(rounds):
        turns += [first, second] if n % 2 == 0 else [second, first]
    return turns


class Bench:
    """The migration the rounds run on."""

    def __init__(self, *, run: LocalMigration, store: Store, database_url: str) -> None:
        self.run = run
        self.store = store
        self.database_url = database_url
        self.workers = [run.log_path(f"worker-{i}") for i in range(len(run.worker_pids()))]
        self.rounds_done = 0

    def round(self, workload: Workload, scope: str, count: int) -> dict[str, Any]:
        """Migrate ``count`` new repositories with ``lease_scope=scope``; what it measured."""
        number = self.rounds_done
        self.rounds_done += 1
        self.store.update_settings(enabled=False)
        self.run_simulator_config(workload)
        ids = _common.add_repositories(
            self.database_url,
            (f"bench/{workload.name}-{scope}-r{number}/repo-{i}" for i in range(count)),
        )
        window = _common.LogWindow(self.workers)
        self.store.update_settings(lease_scope=scope, enabled=True)
        began = time.monotonic()
        with _common.InFlightSampler(self.store, interval=0.2) as sampler:
            _common.wait_until(
                lambda: _common.terminal_count(self.database_url, ids) == count,
                timeout=120 + count,
                what=f"round {number} ({workload.name}, {scope}): every repository terminal",
                interval=0.25,
            )
        self.store.update_settings(enabled=False)
        wall = time.monotonic() - began
        span = _common.event_span(self.database_url, ids)
        assert span is not None
        seconds = (span[1] - span[0]).total_seconds()
        runs = window.lines("enqueue_next_migration")
        statuses = Counter(str(r.get("job_status")) for r in runs)
        holds = [float(r["duration_s"]) for r in runs if r.get("job_status") == "started"]
        report = self.run.report()
        gaps = _common.step_gaps(self.database_url, ids)
        in_flight = sampler.mean_between(*span)
        return {
            "round": number,
            "workload": workload.name,
            "scope": scope,
            "repositories": count,
            "seconds": seconds,
            "wall_s": wall,
            "per_minute": 60 * count / seconds,
            "mean_in_flight": in_flight,
            "utilisation": in_flight / CAPACITY,
            "max_in_flight_sampled": max((n for _, n in sampler.samples), default=0),
            "enqueuer_runs": len(runs),
            "busy_lease_runs": sum(1 for r in runs if r.get("lease_already_taken") is True),
            "notification_lease_busy": len(window.lines("notification_lease_busy")),
            "step_gaps_s": gaps,
            "job_statuses": dict(statuses),
            "mean_started_run_s": statistics.fmean(holds) if holds else None,
            "registry_max_concurrent_imports": report["max_concurrent_imports"],
            "registry_double_start_attempts": len(report["double_start_attempts"]),
        }

    def run_simulator_config(self, workload: Workload) -> None:
        import httpx

        httpx.post(f"{self.run.simulator_url}/simulator/reset", timeout=10).raise_for_status()
        httpx.post(
            f"{self.run.simulator_url}/simulator/config",
            json={
                "pre_import_seconds": list(workload.pre_import_seconds),
                "import_seconds": list(workload.import_seconds),
                "start_latency_seconds": START_LATENCY,
            },
            timeout=10,
        ).raise_for_status()


def summarize(
    rows: list[dict[str, Any]], workload: Workload, bounds: dict[str, Any], threads: int
) -> dict[str, Any]:
    """Both modes of one workload: totals over their rounds, ratio, measured / expected."""
    modes: dict[str, Any] = {}
    for scope in ("global", "repository"):
        mine = [r for r in rows if r["workload"] == workload.name and r["scope"] == scope]
        repositories = sum(r["repositories"] for r in mine)
        seconds = sum(r["seconds"] for r in mine)
        per_s = repositories / seconds
        expected = bounds[f"{scope}_per_s"]
        modes[scope] = {
            "repositories": repositories,
            "seconds": seconds,
            "per_minute": 60 * per_s,
            "per_minute_by_round": [r["per_minute"] for r in mine],
            "utilisation": statistics.fmean(r["utilisation"] for r in mine),
            "busy_lease_runs": sum(r["busy_lease_runs"] for r in mine),
            "enqueuer_runs": sum(r["enqueuer_runs"] for r in mine),
            "expected_per_minute": 60 * expected,
            "measured_over_expected": per_s / expected,
        }
    ratio = modes["repository"]["per_minute"] / modes["global"]["per_minute"]
    concurrency = min(threads, CAPACITY)
    return {
        "workload": workload.name,
        "pre_import_seconds": list(workload.pre_import_seconds),
        "import_seconds": list(workload.import_seconds),
        "start_latency_s": START_LATENCY,
        "modes": modes,
        "ratio": ratio,
        "ratio_by_round_pair": [
            r["per_minute"] / g["per_minute"]
            for g, r in zip(
                [x for x in rows if x["workload"] == workload.name and x["scope"] == "global"],
                [x for x in rows if x["workload"] == workload.name and x["scope"] == "repository"],
                strict=True,
            )
        ],
        "expected": bounds,
        "ratio_over_expected": ratio / bounds["ratio"],
        "issue_goal_ratio": GOAL_SHARE * concurrency,
        "issue_goal_met": ratio >= GOAL_SHARE * concurrency,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Throughput of the migration with one fixed lease key vs per-repository "
        "leases, on the same processes, in turns.",
        epilog="Example: uv run python bench/throughput.py --quick",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run in under a minute")
    parser.add_argument("--repositories", type=int, help="per mode, migration-bound workload")
    parser.add_argument("--start-bound-repositories", type=int, help="per mode, start-bound")
    parser.add_argument("--workers", type=int, default=4, help="worker processes (default 4)")
    parser.add_argument("--threads", type=int, default=8, help="threads per worker (default 8)")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.threads < 1:
        parser.error("--workers and --threads must be at least 1")
    return args


def workloads(args: argparse.Namespace) -> list[Workload]:
    if args.quick:
        bound, start, rounds, migration = 60, 50, 1, (0.3, 0.9)
    else:
        bound, start, rounds, migration = 1000, 400, 2, (1.0, 3.0)
    return [
        Workload("migration-bound", migration, migration, args.repositories or bound, rounds),
        Workload("start-bound", (0.05, 0.1), (0.05, 0.1), args.start_bound_repositories or start,
                 rounds),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    support.quiet_logs()
    env = _common.stack_env()
    machine = support.machine()
    threads = args.workers * args.threads
    began = time.monotonic()
    plan = workloads(args)
    rows: list[dict[str, Any]] = []
    summaries: list[dict[str, Any]] = []
    with (
        _common.fresh_database(env["MIGRATOR_DATABASE_URL"], label="throughput") as url,
        Store(url, max_size=4) as store,
        tempfile.TemporaryDirectory(prefix="bench-throughput-") as logs,
    ):
        store.update_settings(
            enabled=False, capacity=CAPACITY, enqueue_waiting_time=0, max_tags_count=0,
            enqueue_interval=1, guard_interval=30, max_step_duration=120, pending_enqueues=None,
        )  # fmt: skip
        run = LocalMigration(
            env={**env, "MIGRATOR_DATABASE_URL": url, "MIGRATOR_LOG_LEVEL": "info"},
            log_dir=Path(logs), workers=args.workers, threads=args.threads, lease_ttl=10,
            simulator_args=["--start-latency", str(START_LATENCY), "--log-level", "warning",
                            "--seed", "1"],
        )  # fmt: skip
        _common.note(f"starting {args.workers} workers x {args.threads} threads...")
        run.start(timeout=120)
        try:
            bench = Bench(run=run, store=store, database_url=url)
            for number, workload in enumerate(plan):
                first, second = (
                    ("global", "repository") if number % 2 == 0 else ("repository", "global")
                )
                per_round = workload.repositories // workload.rounds
                for scope in order(workload.rounds, first, second):
                    row = bench.round(workload, scope, per_round)
                    rows.append(row)
                    _common.note(
                        f"{workload.name} {scope}: {row['repositories']} in "
                        f"{row['seconds']:.1f} s, {row['per_minute']:.0f}/min, "
                        f"utilisation {row['utilisation']:.2f}, busy-lease runs "
                        f"{row['busy_lease_runs']}/{row['enqueuer_runs']}, notifications"
                        f" on a busy lease {row['notification_lease_busy']}, mean s to "
                        + ", ".join(f"{k} {v:.3f}" for k, v in sorted(row["step_gaps_s"].items()))
                    )
        finally:
            run.stop(timeout=30)
            run.delete_queues()
    for workload in plan:
        bounds = expected_bounds(
            workload, start_latency=START_LATENCY, capacity=CAPACITY, threads=threads
        )
        summaries.append(summarize(rows, workload, bounds, threads))

    print(
        _common.table(
            [
                "round",
                "workload",
                "scope",
                "repos",
                "s",
                "repos/min",
                "util",
                "runs",
                "busy",
                "hold s",
                "max imports",
            ],
            [
                [
                    r["round"],
                    r["workload"],
                    r["scope"],
                    r["repositories"],
                    r["seconds"],
                    r["per_minute"],
                    r["utilisation"],
                    r["enqueuer_runs"],
                    r["busy_lease_runs"],
                    r["mean_started_run_s"] or 0.0,
                    r["registry_max_concurrent_imports"],
                ]
                for r in rows
            ],
        )
    )
    print()
    print(
        _common.table(
            [
                "workload",
                "scope",
                "repos/min",
                "expected/min",
                "measured/expected",
                "util",
                "busy runs",
            ],
            [
                [
                    s["workload"],
                    scope,
                    m["per_minute"],
                    m["expected_per_minute"],
                    m["measured_over_expected"],
                    m["utilisation"],
                    m["busy_lease_runs"],
                ]
                for s in summaries
                for scope, m in s["modes"].items()
            ],
        )
    )
    print()
    for s in summaries:
        print(
            f"{s['workload']}: ratio repository/global {s['ratio']:.2f} "
            f"(by round pair {', '.join(f'{x:.2f}' for x in s['ratio_by_round_pair'])}); "
            f"expected from the bounds {s['expected']['ratio']:.2f} "
            f"(repository limited by {s['expected']['repository_limited_by']}); "
            f"issue goal {s['issue_goal_ratio']:.1f} "
            f"({'met' if s['issue_goal_met'] else 'missed'})"
        )
    migration_bound, start_bound = summaries
    count = migration_bound["modes"]["global"]["repositories"]
    low, high = migration_bound["pre_import_seconds"]
    headline = (
        f"{migration_bound['ratio']:.2f} x throughput, per-repository over fixed key "
        f"({count} repos{', quick' if args.quick else ''}, {low:g}-{high:g} s migrations, "
        "capacity-bound; "
        f"expected {migration_bound['expected']['ratio']:.2f}); "
        f"{start_bound['ratio']:.1f} x where the start call dominates "
        f"(expected <= {start_bound['expected']['ratio']:.1f}, "
        f"issue goal {start_bound['issue_goal_ratio']:.1f})"
    )
    support.publish(
        "throughput",
        {
            "benchmark": "throughput",
            "settings": {
                "quick": args.quick,
                "workers": args.workers,
                "threads": args.threads,
                "capacity": CAPACITY,
                "start_latency_s": START_LATENCY,
                "workloads": [w.__dict__ for w in plan],
            },
            "machine": machine,
            "duration_s": time.monotonic() - began,
            "rounds": rows,
            "summary": summaries,
            "headline": headline,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
