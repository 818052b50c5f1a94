"""Candidate selection and claim at scale: 100,000 and 1,000,000 repositories.

One operation is what an enqueuer run does in PostgreSQL to start a repository:
``Store.candidates(settings, limit=20)`` (aborted first, then ready by created_at, deny list
applied) and ``Store.claim`` of one of them (locks the settings row, counts the in-flight
repositories against the capacity, fenced write plus an event). Claimers are separate
processes, each with its own Store and connection (so the client's GIL is not what is
measured), started once before any timing and released together by a barrier each round;
each claims the candidate at its own index in the list, as runs whose leases are busy move
on to the next candidate. After each timed operation, untimed, the claimed repository is
set to import_done, so the in-flight count stays at most the number of claimers (as it
stays at most the capacity in a migration).

Two kinds of claim take turns in the same run, by the same claimer processes (issue 16's
P4 baseline):

- ``ours``: ``Store.candidates`` + ``Store.claim`` of one of them, given the row it saw (one
  call of schema 0005's ``migration_fenced_write``: fence, settings-row lock, capacity count,
  write, event);
- ``raw``: a bare ``SELECT id ... ORDER BY created_at, id LIMIT 1 FOR UPDATE SKIP LOCKED`` of
  one ready row and an ``UPDATE`` of its state in the same transaction: no capacity, no
  fence, no event, no deny list. The floor a claim can cost here.

Per table size, 1 and 16 claimers and the two kinds take turns in rounds (the machine is
shared). The headline is our CPU per operation over the raw claim's (goal <= 2).

Reported per (size, claimers, kind): p50 / p99 / max / mean of the operation and of its two
parts, operations per second, refused claims, and where the time can go:

- CPU per operation: the claimer processes' CPU plus their PostgreSQL backends' (from /proc)
  divided by the operations. ``cpu bound`` = claimers x CPU per operation / cores: by
  Little's law the mean latency of that many closed-loop claimers cannot be lower while
  the operations need the cores (other work on the machine only adds to it).
- the settings-row lock: a sampler asks ``pgrowlocks`` whether the row is locked; the
  fraction of samples that find it locked is the lock's utilisation U, and U / (operations
  per second) is the lock time per operation (the server-side hold of our claims; the raw
  claim never takes it).
  ``lock bound`` = claimers x that time: the mean latency if the lock were the only queue.

Goal: p99 <= 5 ms at 1,000,000 repositories with 16 claimers.

Usage::

    uv run python bench/claim.py            # 100k and 1M (seeding 1M takes a minute or two)
    uv run python bench/claim.py --quick    # 100k only, under a minute
    uv run python bench/claim.py --quick --kind ours

Prints a table, writes bench/results/claim.json, and the headline as its last line.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import multiprocessing
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Barrier
from typing import Any

import psycopg
import structlog
from psycopg.conninfo import make_conninfo

from bench import _common, support
from migration.states import Event, State
from migration.store import Outcome, Store

GOAL_P99_MS = 5.0
CANDIDATES = 20
CLAIMERS = (1, 16)
KINDS = ("ours", "raw")
GOAL_CPU_RATIO = 2.0  # ours / raw CPU per operation (issue 16, P4)
# The raw claim: one ready row, skipping the rows other claimers hold, and its state.
RAW_SELECT = (
    "SELECT id FROM container_repositories WHERE migration_state = 'default'"
    " ORDER BY created_at, id LIMIT 1 FOR UPDATE SKIP LOCKED"
)
RAW_UPDATE = (
    "UPDATE container_repositories SET migration_state = 'pre_importing',"
    " migration_pre_import_started_at = now(), last_step_at = now() WHERE id = %s"
)
DENY_LIST = ["api-org-0"]  # the largest root namespace: the filter has work to do
LOCK_SAMPLE_INTERVAL = 0.004  # seconds between pgrowlocks samples


@dataclass
class Measured:
    """What one claimer process measured in one round (empty when it sat the round out)."""

    total: list[int] = field(default_factory=list)
    candidates: list[int] = field(default_factory=list)
    claims: list[int] = field(default_factory=list)
    refused: int = 0
    cpu_client: float = 0.0  # seconds of this process
    cpu_server: float = 0.0  # seconds of its PostgreSQL backends


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    ticks = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values) - idle) / ticks, sum(values) / ticks


def with_application_name(url: str, name: str) -> str:
    """``url`` as a conninfo string whose sessions show ``name`` in pg_stat_activity."""
    return make_conninfo(url, application_name=name)


def claimer_process(
    index: int, url: str, barrier: Barrier, commands: Connection, results: Connection
) -> None:
    """One claimer: waits for a round's command, the barrier, then claims for its seconds.

    :param index: which candidate of the list it claims; also its name in PostgreSQL.
    :param url: the benchmark's database.
    :param barrier: every claimer process and the parent meet there to start a round.
    :param commands: receives ``{"claimers", "kind", "seconds"}`` per round, None to stop.
    :param results: sends a :class:`Measured` (as a dict) per round.
    """
    support.quiet_logs()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    name = f"bench-claimer-{index}"
    named = with_application_name(url, name)
    with (
        Store(named, min_size=1, max_size=1) as store,
        psycopg.connect(named, autocommit=True) as side,
        psycopg.connect(named) as raw,
    ):
        while (command := commands.recv()) is not None:
            settings = store.settings()
            kind = command["kind"]
            backends = [
                int(r[0])
                for r in side.execute(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (name,)
                )
            ]
            measured = Measured()
            barrier.wait()
            if index < command["claimers"]:
                client_began, server_began = time.process_time(), _common.cpu_seconds(backends)
                deadline = time.perf_counter() + command["seconds"]
                while time.perf_counter() < deadline:
                    if kind == "raw":
                        _raw_operation(raw, side, measured)
                    else:
                        _operation(store, settings, side, index, measured)
                measured.cpu_client = time.process_time() - client_began
                measured.cpu_server = _common.cpu_seconds(backends) - server_began
            results.send(asdict(measured))


def _operation(
    store: Store, settings: Any, side: psycopg.Connection[Any], index: int, into: Measured
) -> None:
    began = time.perf_counter_ns()
    found = store.candidates(settings, limit=CANDIDATES)
    picked = time.perf_counter_ns()
    candidate = found[index % len(found)]
    result = store.claim(
        candidate.id,
        expected_state=candidate.migration_state,
        event=Event.START_PRE_IMPORT
        if candidate.migration_state is State.DEFAULT
        else Event.RETRY_PRE_IMPORT,
        token=1,
        actor="bench-claim",
        message_id=None,
        seen=candidate,  # the fields the candidates' read gave (schema 0005's check)
    )
    done = time.perf_counter_ns()
    into.total.append(done - began)
    into.candidates.append(picked - began)
    into.claims.append(done - picked)
    if result.outcome is Outcome.CLAIMED:
        side.execute(
            "UPDATE container_repositories SET migration_state = 'import_done',"
            " migration_import_done_at = now() WHERE id = %s",
            (candidate.id,),
        )
    else:
        into.refused += 1


def _raw_operation(
    raw: psycopg.Connection[Any], side: psycopg.Connection[Any], into: Measured
) -> None:
    """The baseline: a bare SKIP LOCKED claim of one row, then (untimed) the same exit."""
    began = time.perf_counter_ns()
    with raw.transaction():
        row = raw.execute(RAW_SELECT).fetchone()
        picked = time.perf_counter_ns()
        if row is not None:
            raw.execute(RAW_UPDATE, (row[0],))
    done = time.perf_counter_ns()
    into.total.append(done - began)
    into.candidates.append(picked - began)
    into.claims.append(done - picked)
    if row is None:
        into.refused += 1
        return
    side.execute(
        "UPDATE container_repositories SET migration_state = 'import_done',"
        " migration_import_done_at = now() WHERE id = %s",
        (row[0],),
    )


class Claimers:
    """The claimer processes, started once (before any timing), driven round by round.

    :param url: the benchmark's database.
    :param count: how many processes (the most claimers of any round).
    """

    def __init__(self, url: str, *, count: int) -> None:
        # fork: the children inherit the imported modules; the parent has no threads yet.
        context = multiprocessing.get_context("fork")
        self.barrier = context.Barrier(count + 1)
        self.pipes: list[tuple[Connection, Connection]] = []
        self.processes = []
        for index in range(count):
            command_read, command_write = context.Pipe(duplex=False)
            result_read, result_write = context.Pipe(duplex=False)
            process = context.Process(
                target=claimer_process,
                args=(index, url, self.barrier, command_read, result_write),
                name=f"claimer-{index}",
                daemon=True,
            )
            process.start()
            self.processes.append(process)
            self.pipes.append((command_write, result_read))

    def round(
        self, *, claimers: int, kind: str, seconds: float, lock_probe: LockProbe | None
    ) -> Round:
        """One timed round; the processes beyond ``claimers`` sit it out."""
        for command, _ in self.pipes:
            command.send({"claimers": claimers, "kind": kind, "seconds": seconds})
        self.barrier.wait(timeout=120)
        busy_began, all_began = machine_busy()
        began = time.perf_counter()
        locked, samples = lock_probe.sample(seconds) if lock_probe else (0, 0)
        done = [Measured(**result.recv()) for _, result in self.pipes]
        wall = time.perf_counter() - began
        busy_done, all_done = machine_busy()
        return Round(
            claimers=claimers,
            kind=kind,
            measured=[m for m in done if m.total],
            wall=wall,
            lock_samples=samples,
            lock_locked=locked,
            machine_busy=(busy_done - busy_began) / max(all_done - all_began, 1e-9),
        )

    def close(self) -> None:
        for command, _ in self.pipes:
            with contextlib.suppress(OSError):  # a claimer that died has closed its end
                command.send(None)
        for process in self.processes:
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()


class LockProbe:
    """Samples whether the settings row is locked, with ``pgrowlocks`` (takes no lock).

    :param url: the benchmark's database (the extension is created there).
    """

    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(url, autocommit=True)
        self.conn.execute("CREATE EXTENSION IF NOT EXISTS pgrowlocks")

    def sample(self, seconds: float) -> tuple[int, int]:
        """(samples that found the row locked, samples) over ``seconds``."""
        locked = samples = 0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            row = self.conn.execute("SELECT count(*) FROM pgrowlocks('migration_settings')")
            locked += 1 if row.fetchone() != (0,) else 0
            samples += 1
            time.sleep(LOCK_SAMPLE_INTERVAL)
        return locked, samples

    def close(self) -> None:
        self.conn.close()


@dataclass
class Round:
    """One round's measurements, from every claimer that took part."""

    claimers: int
    kind: str
    measured: list[Measured]
    wall: float
    lock_samples: int
    lock_locked: int
    machine_busy: float  # fraction of the machine's CPUs busy (anyone's work)

    def values(self, part: str) -> list[int]:
        return [v for m in self.measured for v in getattr(m, part)]


def ms(values: list[int], fraction: float) -> float:
    return support.percentile(sorted(values), fraction) / 1e6


def summarize(size: int, claimers: int, kind: str, done: list[Round]) -> dict[str, Any]:
    """One result row from the rounds of one (size, claimers, kind)."""
    cores = os.cpu_count() or 1
    total = [v for r in done for v in r.values("total")]
    wall = sum(r.wall for r in done)
    operations = len(total)
    cpu = sum(m.cpu_client + m.cpu_server for r in done for m in r.measured)
    cpu_per_op_ms = cpu / operations * 1e3 if operations else 0.0
    samples = sum(r.lock_samples for r in done)
    lock_busy = sum(r.lock_locked for r in done) / samples if samples else None
    ops_per_s = operations / wall if wall else 0.0
    lock_ms = lock_busy / ops_per_s * 1e3 if lock_busy is not None and ops_per_s else None
    return {
        "repositories": size,
        "claimers": claimers,
        "kind": kind,
        "operations": operations,
        "ops_per_s": ops_per_s,
        "p50_ms": ms(total, 0.5),
        "p99_ms": ms(total, 0.99),
        "max_ms": max(total) / 1e6 if total else 0.0,
        "mean_ms": statistics.fmean(total) / 1e6 if total else 0.0,
        "p99_ms_by_round": [ms(r.values("total"), 0.99) for r in done],
        "candidates_p50_ms": ms([v for r in done for v in r.values("candidates")], 0.5),
        "candidates_p99_ms": ms([v for r in done for v in r.values("candidates")], 0.99),
        "claim_p50_ms": ms([v for r in done for v in r.values("claims")], 0.5),
        "claim_p99_ms": ms([v for r in done for v in r.values("claims")], 0.99),
        "refused": sum(m.refused for r in done for m in r.measured),
        "cpu_client_per_op_ms": sum(m.cpu_client for r in done for m in r.measured)
        / max(operations, 1)
        * 1e3,
        "cpu_server_per_op_ms": sum(m.cpu_server for r in done for m in r.measured)
        / max(operations, 1)
        * 1e3,
        "cpu_per_op_ms": cpu_per_op_ms,
        # Little's law: N closed-loop claimers, each operation needing cpu_per_op of the
        # machine's cores: mean latency >= N x cpu_per_op / cores.
        "cpu_bound_mean_ms": claimers * cpu_per_op_ms / cores,
        "lock_busy": lock_busy,
        "lock_ms_per_op": lock_ms,
        "lock_bound_mean_ms": claimers * lock_ms if lock_ms is not None else None,
        "machine_busy": statistics.fmean(r.machine_busy for r in done),
        "ours_busy": cpu / (wall * cores) if wall else 0.0,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="p50/p99 of candidate selection + claim at 100k and 1M repositories.",
        epilog="Example: uv run python bench/claim.py --quick",
    )
    parser.add_argument("--quick", action="store_true", help="100,000 repositories only")
    parser.add_argument("--sizes", help="comma-separated table sizes (default 100000,1000000)")
    parser.add_argument("--seconds", type=float, help="measured seconds per round")
    parser.add_argument("--rounds", type=int, help="rounds per claimer count and kind")
    parser.add_argument(
        "--kind",
        choices=("both", *KINDS),
        default="both",
        help="ours (candidates + Store.claim), raw (a bare SKIP LOCKED claim) or both, taking"
        " turns in each round (default both; the headline needs both)",
    )
    args = parser.parse_args(argv)
    text = args.sizes or ("100000" if args.quick else "100000,1000000")
    try:
        args.size_list = [int(s) for s in text.split(",")]
    except ValueError:
        parser.error(f"--sizes must be comma-separated integers, not {text!r}")
    if any(size < CANDIDATES * max(CLAIMERS) for size in args.size_list):
        parser.error(f"--sizes: each size must be at least {CANDIDATES * max(CLAIMERS)}")
    args.seconds = args.seconds or (1.5 if args.quick else 4.0)
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.kinds = KINDS if args.kind == "both" else (args.kind,)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    support.quiet_logs()
    # Racing claimers get refused writes by design (the store logs each as a warning).
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    env = _common.stack_env()
    machine = support.machine()
    began = time.monotonic()
    results: list[dict[str, Any]] = []
    with _common.fresh_database(env["MIGRATOR_DATABASE_URL"], label="claim") as url:
        claimers = Claimers(url, count=max(CLAIMERS))  # before this process has threads
        probe: LockProbe | None
        try:
            probe = LockProbe(url)
        except psycopg.Error as error:
            _common.note(f"no lock sampling (pgrowlocks: {str(error).strip()[:80]})")
            probe = None
        try:
            with Store(url, max_size=4) as store:
                store.update_settings(
                    capacity=2**31 - 1, root_namespace_deny_list=DENY_LIST, max_tags_count=0
                )
                seeded = 0
                for size in args.size_list:
                    _common.note(f"seeding up to {size:,} repositories...")
                    seeding = time.monotonic()
                    store.seed(size - seeded, rng_seed=size)
                    seeded = size
                    _common.note(f"seeded in {time.monotonic() - seeding:.0f} s")
                    results += measure(claimers, probe, size=size, args=args)
        finally:
            claimers.close()
            if probe is not None:
                probe.close()
    print(table(results))
    largest = max(args.size_list)

    def row_of(kind: str) -> dict[str, Any] | None:
        return next(
            (
                r
                for r in results
                if r["repositories"] == largest and r["claimers"] == 16 and r["kind"] == kind
            ),
            None,
        )

    ours, raw = row_of("ours"), row_of("raw")
    target = ours or raw
    assert target is not None
    met = target["p99_ms"] <= GOAL_P99_MS
    ratio = ours["cpu_per_op_ms"] / raw["cpu_per_op_ms"] if ours and raw else None
    ratio_met = ratio is not None and ratio <= GOAL_CPU_RATIO
    detail = (
        f"{target['kind']}: p99 {target['p99_ms']:.2f} ms, p50 {target['p50_ms']:.2f} ms,"
        f" CPU bound on the mean {target['cpu_bound_mean_ms']:.1f} ms;"
        f" p99 goal <= {GOAL_P99_MS:g} ms {'met' if met else 'missed'}"
    )
    if ours and raw and ratio is not None:
        headline = (
            f"{ratio:.2f} x our CPU per candidates + claim over a raw SKIP LOCKED claim's"
            f" ({ours['cpu_per_op_ms']:.2f} / {raw['cpu_per_op_ms']:.2f} ms) at {largest:,}"
            f" repositories with 16 claimers (goal <= {GOAL_CPU_RATIO:g} x:"
            f" {'met' if ratio_met else 'missed'}; raw p99 {raw['p99_ms']:.2f} ms; {detail})"
        )
    else:
        headline = f"{target['p99_ms']:.2f} ms p99 at {largest:,} repositories ({detail})"
    support.publish(
        "claim",
        {
            "benchmark": "claim",
            "settings": {
                "sizes": args.size_list,
                "seconds_per_round": args.seconds,
                "rounds": args.rounds,
                "kinds": list(args.kinds),
                "claimers": "processes, one Store (1 connection) + 1 raw + 1 side connection each",
                "candidates_per_run": CANDIDATES,
                "deny_list": DENY_LIST,
            },
            "machine": machine,
            "duration_s": time.monotonic() - began,
            "results": results,
            "goal_p99_ms": GOAL_P99_MS,
            "goal_met": met,
            "cpu_ratio_ours_over_raw": ratio,
            "goal_cpu_ratio": GOAL_CPU_RATIO,
            "goal_cpu_ratio_met": ratio_met,
            "headline": headline,
        },
    )
    return 0


def measure(
    claimers: Claimers, probe: LockProbe | None, *, size: int, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """The rounds of one table size: claimer counts and kinds take turns."""
    rounds: dict[tuple[int, str], list[Round]] = {(n, k): [] for n in CLAIMERS for k in args.kinds}
    for number in range(args.rounds):
        # Alternate the order, so neither count nor kind always goes first.
        counts = CLAIMERS if number % 2 == 0 else CLAIMERS[::-1]
        kinds = args.kinds if number % 2 == 0 else args.kinds[::-1]
        for count in counts:
            for kind in kinds:
                rounds[(count, kind)].append(
                    claimers.round(
                        claimers=count, kind=kind, seconds=args.seconds, lock_probe=probe
                    )
                )
    results = []
    for (count, kind), done in rounds.items():
        row = summarize(size, count, kind, done)
        results.append(row)
        _common.note(
            f"{size:,} x {count} {kind}: p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms,"
            f" {row['ops_per_s']:.0f} ops/s, CPU/op {row['cpu_per_op_ms']:.2f} ms"
        )
    return results


def table(results: list[dict[str, Any]]) -> str:
    def optional(value: float | None, scale: float = 1.0) -> object:
        return "-" if value is None else value * scale

    return _common.table(
        ["repositories", "claimers", "kind", "ops", "ops/s", "p50 ms", "p99 ms", "max ms",
         "mean ms", "cand p50", "cand p99", "claim p50", "claim p99", "refused",
         "CPU/op ms", "cpu bound", "lock %", "lock ms/op", "lock bound", "machine %"],
        [
            [f"{r['repositories']:,}", r["claimers"], r["kind"], r["operations"],
             r["ops_per_s"], r["p50_ms"], r["p99_ms"], r["max_ms"], r["mean_ms"],
             r["candidates_p50_ms"], r["candidates_p99_ms"], r["claim_p50_ms"],
             r["claim_p99_ms"], r["refused"], r["cpu_per_op_ms"], r["cpu_bound_mean_ms"],
             optional(r["lock_busy"], 100), optional(r["lock_ms_per_op"]),
             optional(r["lock_bound_mean_ms"]), r["machine_busy"] * 100]
            for r in results
        ],
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
