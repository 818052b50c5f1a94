"""A worker is SIGKILLed while it holds a repository's lease: how long does anything wait?

A local migration (simulator, API, scheduler, 2 ``dramatiq actors`` workers x 4 threads)
migrates a steady stream of repositories (capacity 8, imports of 0.3-0.8 s). In each trial
one repository with a marked path is put first in line; the simulator answers its start call
3 s late (``slow_start_seconds``). Once a worker has claimed it and waits on that call, with
the repository's lease held, the benchmark SIGKILLs that worker process (its group), at a
random point 0.3-1.5 s into the call. Two cases:

- ``after-start`` (path ``slow-start``): the registry began the import before the answer;
  its notification comes, and the notification actor retries (busy lease) until the dead
  worker's etcd lease expires, then steps the repository. Invariant 4: within TTL + 1 s.
- ``before-start`` (path ``slow-decide``): the registry decides after the wait and, the
  caller being gone, starts nothing. No notification will come. RabbitMQ redelivers the
  dead worker's message at once; the redelivered run waits for the dead worker's lease and
  reconciles the repository with the registry (``actors.reconcile``): aborted, then retried.
  The guard cannot be the one: ``max_step_duration`` is left at its default, 300 s.
  Invariant 4: within TTL + 1 s as well.

Measured from the kill: the repository's delay until its next accepted state change (the
events table), and the migration-wide stall: the longest time with free capacity and no new
start (``start_pre_import``/retry events against the in-flight count sampled every 0.1 s),
next to the same figure over the seconds before the kill (baseline), and next to the
reference's 30-minute lease timeout.

Usage::

    uv run python bench/recovery.py            # TTL 3 and 10, 3 trials of each case (~4 min)
    uv run python bench/recovery.py --quick    # TTL 3, one trial of each case

Prints a table, writes bench/results/recovery.json, and the headline as its last line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg

from bench import _common, support
from devtools.launcher import LocalMigration
from leases import EtcdClient
from migration.keys import repository_lease_key
from migration.store import Store

REFERENCE_TIMEOUT_S = 30 * 60
CAPACITY = 8
SLOW_START_S = 3.0  # below the registry client's 5 s timeout
MAX_STEP_DURATION = 300.0  # the default: the guard is not what recovers a trial
GUARD_INTERVAL = 1.0
STALL_GOAL_S = 1.0
CASES = {"after-start": "slow-start", "before-start": "slow-decide"}
CLAIM_EVENTS = ("start_pre_import", "retry_pre_import", "retry_import")


def stall(
    starts: list[float], samples: list[tuple[float, int]], *, begin: float, end: float
) -> float:
    """Longest time in [begin, end] with free capacity (sampled) and no start.

    :param starts: times of accepted claim events (epoch seconds).
    :param samples: (epoch seconds, in flight) samples.
    """
    marks = [begin, *sorted(t for t in starts if begin < t < end), end]
    longest = 0.0
    for left, right in itertools.pairwise(marks):
        inside = [(t, n) for t, n in samples if left <= t <= right]
        # Free-capacity time inside this start-less gap: sum of sample intervals under capacity.
        free = 0.0
        previous = left
        for t, n in inside:
            if n < CAPACITY:
                free += t - previous
            previous = t
        if inside and inside[-1][1] < CAPACITY:
            free += right - previous
        longest = max(longest, free)
    return longest


class Trials:
    """One local migration (one TTL) and the trials run on it."""

    def __init__(
        self, *, run: LocalMigration, store: Store, database_url: str, etcd: EtcdClient, ttl: int
    ) -> None:
        self.run = run
        self.store = store
        self.database_url = database_url
        self.etcd = etcd
        self.ttl = ttl
        self.prefix = run.env["MIGRATOR_ETCD_PREFIX"]
        self.serial = 0

    def top_up(self, count: int) -> None:
        """Keep the stream going: ``count`` more plain repositories."""
        self.serial += 1
        _common.add_repositories(
            self.database_url,
            (f"bench/stream-ttl{self.ttl}-{self.serial}/repo-{i}" for i in range(count)),
        )

    def trial(
        self, case: str, number: int, rng: random.Random, *, restart: bool = True
    ) -> dict[str, Any]:
        marker = CASES[case]
        path = f"bench/kill-ttl{self.ttl}-{number}/{marker}-{case}"
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            # Oldest of all: the next candidate of the next run.
            row = conn.execute(
                "INSERT INTO container_repositories (path, created_at, tags_count)"
                " VALUES (%s, %s, 3) RETURNING id",
                (path, datetime.now(UTC) - timedelta(days=3650)),
            ).fetchone()
        assert row is not None
        repository_id = int(row[0])
        key = repository_lease_key(self.prefix, repository_id)
        holder: dict[str, Any] | None = None
        deadline = time.monotonic() + 30
        while holder is None:
            kv = self.etcd.get(key)
            if kv is not None:
                repository = self.store.get(repository_id)
                if repository is not None and repository.migration_state == "pre_importing":
                    holder = json.loads(kv.value)
            if time.monotonic() > deadline:
                raise SystemExit(f"bench: nobody took {path} within 30 s")
            time.sleep(0.02)
        claimed = time.time()
        time.sleep(rng.uniform(0.3, 1.5))
        index = self.run.worker_index_of(int(holder["pid"]))
        if index is None:
            raise SystemExit(f"bench: holder pid {holder['pid']} is no worker of this run")
        killed = time.time()
        self.run.kill_worker(index)
        with _common.InFlightSampler(self.store, interval=0.1) as sampler:
            next_event = self._wait_next_event(repository_id, after=killed, limit=self.ttl + 40)
            time.sleep(1.0)  # the stall window extends a little past the recovery
        end = time.time()
        starts = self._claim_times(begin=killed - 10, end=end)
        samples = [(at.timestamp(), n) for at, n in sampler.samples]
        if restart:
            self.run.restart_worker(index)
        delay = next_event["at"] - killed
        return {
            "ttl": self.ttl,
            "case": case,
            "trial": number,
            "repository_id": repository_id,
            "kill_after_claim_s": killed - claimed,
            "delay_s": delay,
            "next_event": next_event["event"],
            "next_actor": next_event["actor"],
            "stall_s": stall(starts, samples, begin=killed, end=end),
            "starts_in_window": sum(1 for t in starts if killed < t < end),
            "delay_goal_s": self.ttl + 1,
            "delay_within_goal": delay <= self.ttl + 1,
            "reference_over_delay": REFERENCE_TIMEOUT_S / delay,
        }

    def baseline_stall(self, seconds: float) -> float:
        """The stall figure over ``seconds`` of the stream with nothing killed."""
        with _common.InFlightSampler(self.store, interval=0.1) as sampler:
            begin = time.time()
            time.sleep(seconds)
            end = time.time()
        samples = [(at.timestamp(), n) for at, n in sampler.samples]
        return stall(self._claim_times(begin=begin, end=end), samples, begin=begin, end=end)

    def _wait_next_event(self, repository_id: int, *, after: float, limit: float) -> dict[str, Any]:
        deadline = time.monotonic() + limit
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            while True:
                row = conn.execute(
                    "SELECT extract(epoch FROM at)::float8, event, actor FROM migration_events"
                    " WHERE repository_id = %s AND accepted AND at > to_timestamp(%s)"
                    " ORDER BY id LIMIT 1",
                    (repository_id, after),
                ).fetchone()
                if row is not None:
                    return {"at": float(row[0]), "event": row[1], "actor": row[2]}
                if time.monotonic() > deadline:
                    raise SystemExit(
                        f"bench: repository {repository_id} not stepped {limit:.0f} s after kill"
                    )
                time.sleep(0.05)

    def _claim_times(self, *, begin: float, end: float) -> list[float]:
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT extract(epoch FROM at)::float8 FROM migration_events WHERE accepted"
                " AND event = ANY(%s) AND at BETWEEN to_timestamp(%s) AND to_timestamp(%s)",
                (list(CLAIM_EVENTS), begin, end),
            ).fetchall()
        return [float(r[0]) for r in rows]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="SIGKILL a worker holding a repository's lease during the registry "
        "start call: the repository's delay and the migration-wide stall.",
        epilog="Example: uv run python bench/recovery.py --quick",
    )
    parser.add_argument("--quick", action="store_true", help="TTL 3, one trial of each case")
    parser.add_argument("--trials", type=int, help="trials per case and TTL (default 3)")
    parser.add_argument("--ttls", help="comma-separated TTLs in seconds (default 3,10)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the kill timing")
    args = parser.parse_args(argv)
    args.trials = args.trials or (1 if args.quick else 3)
    if args.trials < 1:
        parser.error("--trials must be positive")
    args.ttl_list = support.parse_ttls(parser, args.ttls or ("3" if args.quick else "3,10"))
    return args


def summarize(rows: list[dict[str, Any]], baselines: dict[int, float]) -> list[dict[str, Any]]:
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["ttl"], row["case"]), []).append(row)
    summary = []
    for (ttl, case), mine in groups.items():
        delays = [r["delay_s"] for r in mine]
        stalls = [r["stall_s"] for r in mine]
        summary.append(
            {
                "ttl": ttl,
                "case": case,
                "trials": len(mine),
                "delay_median_s": statistics.median(delays),
                "delay_max_s": max(delays),
                "delays_s": delays,
                "stall_max_s": max(stalls),
                "stalls_s": stalls,
                "baseline_stall_s": baselines[ttl],
                "next_events": sorted({f"{r['next_event']} by {r['next_actor']}" for r in mine}),
                "delay_goal_s": ttl + 1,
                "delay_goal_met": all(d <= ttl + 1 for d in delays),
                "stall_goal_met": max(stalls) <= STALL_GOAL_S,
                "reference_over_delay": REFERENCE_TIMEOUT_S / statistics.median(delays),
            }
        )
    return summary


def run_trials(
    args: argparse.Namespace,
    *,
    env: dict[str, str],
    url: str,
    store: Store,
    etcd: EtcdClient,
    ttl: int,
    rng: random.Random,
    rows: list[dict[str, Any]],
    log_dir: Path,
) -> float:
    """One local migration at ``ttl``: its trials appended to ``rows``; the baseline stall."""
    run = LocalMigration(
        env={**env, "MIGRATOR_DATABASE_URL": url, "MIGRATOR_LOG_LEVEL": "info"},
        log_dir=log_dir, workers=2, threads=4, lease_ttl=ttl,
        simulator_args=["--pre-import-seconds", "0.3", "0.8", "--import-seconds", "0.3",
                        "0.8", "--start-latency", "0.02", "--log-level", "warning"],
    )  # fmt: skip
    _common.note(f"TTL {ttl}: starting 2 workers...")
    run.start(timeout=120)
    try:
        httpx.post(
            f"{run.simulator_url}/simulator/config",
            json={"slow_start_seconds": SLOW_START_S},
            timeout=10,
        ).raise_for_status()
        trials = Trials(run=run, store=store, database_url=url, etcd=etcd, ttl=ttl)
        trials.top_up(200)
        time.sleep(2)  # the stream reaches its steady state
        baseline = trials.baseline_stall(3.0 if args.quick else 5.0)
        for number in range(args.trials):
            for case in CASES:
                trials.top_up(30 + 15 * ttl)
                last = number == args.trials - 1 and case == list(CASES)[-1]
                row = trials.trial(case, number, rng, restart=not last)
                rows.append(row)
                _common.note(
                    f"TTL {ttl} {case} #{number}: delay {row['delay_s']:.2f} s "
                    f"({row['next_event']} by {row['next_actor']}), "
                    f"stall {row['stall_s']:.2f} s"
                )
    finally:
        run.stop(timeout=30)
        run.delete_queues()
    return baseline


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    support.quiet_logs()
    rng = random.Random(args.seed)
    env = _common.stack_env()
    machine = support.machine()
    began = time.monotonic()
    rows: list[dict[str, Any]] = []
    baselines: dict[int, float] = {}
    etcd = EtcdClient(support.etcd_endpoints(env["MIGRATOR_ETCD_ENDPOINTS"]), timeout=5)
    with tempfile.TemporaryDirectory(prefix="bench-recovery-") as logs:
        for ttl in args.ttl_list:
            # A database per TTL: the previous run's simulator took its running imports with
            # it, and with max_step_duration at 300 s those repositories would fill the
            # capacity of the next run for five minutes.
            with (
                _common.fresh_database(env["MIGRATOR_DATABASE_URL"], label="recovery") as url,
                Store(url, max_size=4) as store,
            ):
                store.update_settings(
                    enabled=True, capacity=CAPACITY, enqueue_waiting_time=0, max_tags_count=0,
                    enqueue_interval=0.5, guard_interval=GUARD_INTERVAL,
                    max_step_duration=MAX_STEP_DURATION, pre_import_timeout=60,
                    import_timeout=60,
                )  # fmt: skip
                baselines[ttl] = run_trials(
                    args, env=env, url=url, store=store, etcd=etcd, ttl=ttl, rng=rng, rows=rows,
                    log_dir=Path(logs) / f"ttl{ttl}",
                )  # fmt: skip
    etcd.close()
    summary = summarize(rows, baselines)
    print(
        _common.table(
            [
                "TTL s",
                "case",
                "trials",
                "delay med s",
                "delay max s",
                "goal s",
                "stall max s",
                "baseline s",
                "30 min / delay",
                "next step",
            ],
            [
                [
                    s["ttl"],
                    s["case"],
                    s["trials"],
                    s["delay_median_s"],
                    s["delay_max_s"],
                    s["delay_goal_s"],
                    s["stall_max_s"],
                    s["baseline_stall_s"],
                    s["reference_over_delay"],
                    "; ".join(s["next_events"]),
                ]
                for s in summary
            ],
        )
    )
    after = [s for s in summary if s["case"] == "after-start"]
    first = min(after, key=lambda s: s["ttl"])
    worst_stall = max(s["stall_max_s"] for s in summary)
    worst_delay = max(s["delay_max_s"] for s in summary if s["ttl"] == first["ttl"])
    delay_goal = "met" if all(s["delay_goal_met"] for s in summary) else "missed"
    headline = (
        f"{first['delay_median_s']:.1f} s repository delay after SIGKILL at TTL {first['ttl']} "
        + "".join(
            f"({s['delay_median_s']:.1f} s at TTL {s['ttl']}) " for s in after if s is not first
        )
        + f"vs the reference's 30 min ({first['reference_over_delay']:.0f} x); "
        f"worst {worst_delay:.1f} s at TTL {first['ttl']} either case (TTL + 1 s: {delay_goal}); "
        f"migration-wide stall at most {worst_stall:.2f} s (goal {STALL_GOAL_S:g} s)"
    )
    support.publish(
        "recovery",
        {
            "benchmark": "recovery",
            "settings": {
                "trials": args.trials,
                "ttls": args.ttl_list,
                "capacity": CAPACITY,
                "slow_start_s": SLOW_START_S,
                "max_step_duration_s": MAX_STEP_DURATION,
                "guard_interval_s": GUARD_INTERVAL,
                "seed": args.seed,
            },
            "machine": machine,
            "duration_s": time.monotonic() - began,
            "trials": rows,
            "summary": summary,
            "headline": headline,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
