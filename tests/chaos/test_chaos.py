"""The chaos run: a whole migration under faults, DESIGN.md's invariants checked at the end.

Real processes on a private stack (``conftest.py``): the simulator (repositories fail
as their paths say, 429 above its concurrency limit, its double-start guard off so that a
second start of a running repository is accepted and *flagged* instead of refused), the
notification API, 3 workers under the test's supervisor, 2 schedulers and a 3-member etcd
cluster. While it runs a worker is SIGKILLed every few seconds, and once each, at seeded
random times: a worker is SIGSTOPped past its lease TTL then SIGCONTed, RabbitMQ is
restarted, the etcd leader is killed (then restarted), PostgreSQL is restarted, and the
registry faults: it is stopped (then started again, its state kept), it answers 503 to
every start, it answers every call later than the client's timeout, it answers 401 to
every call (then ``registry-migrator resume`` runs, as an operator would after fixing the
token). With ``--long`` worker 0 talks to etcd, PostgreSQL and the registry through
cuttable links (``tests/partition/links.py``), and two zombies join the heavy faults: a
lease holder cut from etcd, and a worker SIGSTOPped inside its registry start call, each
past its TTL (issue 13's scenarios a and e); the fenced writes refused to their tokens are
counted apart (``fenced_writes_refused_zombie``).

Checked at the end: DESIGN.md's invariants, each repository's end state against its path
marker (``tests.invariants.END_BY_MARKER``), no retry charged for a registry fault (every
accepted abort carries a cause of the repository's own), and the longest stall measured from
the end of the faults. ``CHAOS_REPORT=path`` writes the figures as one JSON object.

The same workload also runs without faults on the same stack, for the rate comparison.
Bounded by default (300 repositories under faults, 100 without); ``--long``: 1,000 each
(``CHAOS_LONG_COUNT``), with the zombies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from devtools.launcher import LocalMigration, queue_depth
from leases import EtcdClient, HolderInfo, LeaseError, SharedBreaker
from migration.config import Config
from migration.keys import leases_prefix, registry_breaker_name
from migration.states import State
from migration.store import Store, StoreError
from tests.chaos.conftest import PrivateStack
from tests.chaos.harness import FaultInjector, FaultLog, WorkerSupervisor
from tests.fixtures import seed_spread, temporary_database, wait_until
from tests.invariants import (
    ChargedAbort,
    TriggerAccount,
    WrongEnd,
    aborts_without_a_repository_cause,
    accepted_events,
    account_triggers,
    all_terminal,
    registry_fault_undos,
    replay_in_flight,
    stale_accepted_writes,
    stall_after_faults,
    throughput_per_minute,
    wrong_end_states,
)
from tests.partition.links import ProcessLinks

CAPACITY = 10
#: The simulator answers 429 above this many running imports (below the capacity, so the
#: migrator's undo of a refused claim is exercised all along).
REGISTRY_LIMIT = 8
LEASE_TTL = 3.0
WORKERS = 3
#: Workers behind cuttable links in the --long run (the zombies are among them).
ZOMBIE_WORKERS = 1
SCHEDULERS = 2
SEED = int(os.environ.get("CHAOS_SEED", "1207"))
#: The breaker's longest open window during the run (the live setting
#: ``registry_breaker_max_window``) and one repository's longest backoff
#: (``registry_backoff_max``): short, so a registry fault costs seconds, not minutes.
BREAKER_MAX_WINDOW = 4.0
BACKOFF_MAX = 4.0
#: The workers' registry client timeout (seconds, ``MIGRATOR_REGISTRY_TIMEOUT``) and the
#: delay of every answer during the slow fault (longer).
REGISTRY_TIMEOUT = 2.0
SLOW_ANSWER_S = 3.0
#: Seconds each registry fault lasts (at least: until the migrator met it).
REGISTRY_FAULT_S = 4.0
#: The longest stall (capacity free, no start) allowed, counted from the end of the faults
#: it overlaps: the breaker's cap + 5 s after a registry fault (issue 11), plus a lease TTL
#: for a killed worker's repository (invariant 4).
STALL_BOUND_S = BREAKER_MAX_WINDOW + 5 + LEASE_TTL
BIN = Path(sys.executable).parent


@dataclass
class RunFigures:
    """What one run measured."""

    repositories: int
    terminal: int
    span_s: float
    counts: dict[str, int]
    report: dict[str, Any]
    replay_most: int
    over_capacity: list[Any]
    claims: int
    undone: int
    longest_stall_s: float
    stall_from: datetime | None
    stale_writes: list[Any]
    refused_writes: dict[str, int]
    triggers: TriggerAccount
    scheduler_gap_s: float
    dead_letters: int
    never_ran_lines: list[str]
    wrong_ends: list[WrongEnd] = field(default_factory=list)
    charged_aborts: list[ChargedAbort] = field(default_factory=list)
    registry_fault_undos: int = 0
    stall_after_faults_s: float = 0.0
    stall_after_faults_from: datetime | None = None
    faults: FaultLog | None = None
    #: The faults injected once each in this run.
    once: tuple[str, ...] = ()
    #: Fenced writes refused to the zombies' tokens (the --long run's zombie faults).
    zombie_refused: int = 0
    worker_restarts: int = 0
    exit_codes: dict[str, int | None] = field(default_factory=dict)

    @property
    def per_minute(self) -> float:
        return 60 * self.terminal / self.span_s if self.span_s else 0.0


def _terminal_now(store: Store) -> bool:
    try:
        return all_terminal(store)
    except (StoreError, psycopg.Error):
        return False  # PostgreSQL is restarting: ask again


def _refused_writes(url: str) -> dict[str, int]:
    """Fenced writes refused, by reason (stale_token, state_changed)."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT detail->>'reason', count(*) FROM migration_events WHERE NOT accepted GROUP BY 1"
        ).fetchall()
    return {str(reason): int(n) for reason, n in rows}


def _refused_of(url: str, tokens: set[int]) -> int:
    """Fenced writes refused to one of ``tokens``."""
    if not tokens:
        return 0
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM migration_events WHERE NOT accepted AND token = ANY(%s)",
            (sorted(tokens),),
        ).fetchone()
    return int(row[0]) if row else 0


def _tokens_of(run: LocalMigration, client: EtcdClient, index: int) -> set[int]:
    """The tokens (create revisions) of the repository leases worker ``index`` holds."""
    group = set(run.worker_group(index))
    try:
        kvs = client.get_prefix(leases_prefix(run.env["MIGRATOR_ETCD_PREFIX"]))
    except LeaseError:
        return set()
    return {kv.create_revision for kv in kvs if HolderInfo.from_json(kv.value).pid in group}


def _all_lines(run: LocalMigration) -> list[dict[str, Any]]:
    names = ["api", *(f"worker-{i}" for i in range(WORKERS))]
    names += [f"scheduler-{i}" for i in range(SCHEDULERS)]
    return [line for name in names for line in run.log_events(name)]


def _lease_holder(run: LocalMigration, client: EtcdClient) -> int | None:
    """A worker that holds a repository's lease now (mid-step), or None."""
    prefix = leases_prefix(run.env["MIGRATOR_ETCD_PREFIX"])
    try:
        holders = [HolderInfo.from_json(kv.value) for kv in client.get_prefix(prefix)]
    except LeaseError:
        return None
    for holder in holders:
        index = run.worker_index_of(holder.pid)
        if index is not None:
            return index
    return None


def _queued(run: LocalMigration, suffix: str) -> int:
    """Messages ready in the run's queue (``""``), its delay (``.DQ``) or dead-letter queue."""
    return queue_depth(run.env, run.env["MIGRATOR_QUEUE_NAME"] + suffix)


def _mentions(lines: list[dict[str, Any]], ids: set[str], *, most: int = 5) -> list[str]:
    """The log lines that mention the first ``most`` of ``ids``, for the failure report."""
    wanted = sorted(ids)[:most]
    return [
        json.dumps(line)[:400]
        for line in lines
        if any(i in (line.get("message_id"), line.get("triggered_message_id")) for i in wanted)
    ]


def _longest_scheduler_gap(lines: list[dict[str, Any]]) -> float:
    """Longest time between two scheduler triggers that got through the gate decision."""
    times = sorted(
        datetime.fromisoformat(str(line["timestamp"])).timestamp()
        for line in lines
        if line.get("source") == "scheduler"
        and line.get("event") in ("enqueue_triggered", "enqueue_collapsed")
    )
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def _resume(run: LocalMigration, store: Store) -> str:
    """``registry-migrator resume``, as an operator would once the token is fixed; again if
    a 401 answered before the fault ended paused the migration after the first resume."""
    resumes = 0
    deadline = time.monotonic() + 3
    while True:
        if not store.settings().enabled:
            done = subprocess.run(
                [str(BIN / "registry-migrator"), "resume"],
                env={**os.environ, **run.env},
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            if done.returncode != 0:
                raise RuntimeError(f"resume failed ({done.returncode}): {done.stderr.strip()}")
            resumes += 1
        if time.monotonic() > deadline:
            return f"registry-migrator resume x{resumes}"
        time.sleep(0.5)


def _migrate(
    stack: PrivateStack,
    url: str,
    *,
    count: int,
    log_dir: Path,
    faults: bool,
    zombies: bool = False,
) -> RunFigures:
    """Seed ``count`` repositories and migrate them all; with faults when asked, and the
    zombie faults (workers behind cuttable links) with ``zombies``."""
    with Store(url, max_size=2) as store:
        seed_spread(store, count, seed=SEED)
        store.update_settings(
            capacity=CAPACITY,
            enqueue_interval=1,
            guard_interval=2,
            max_step_duration=8,
            registry_breaker_max_window=BREAKER_MAX_WINDOW,
            registry_backoff_max=BACKOFF_MAX,
        )
        env = {
            **stack.env,
            "MIGRATOR_DATABASE_URL": url,
            "MIGRATOR_LOG_LEVEL": "info",
            "MIGRATOR_REGISTRY_TIMEOUT": f"{REGISTRY_TIMEOUT:g}",
        }
        run = LocalMigration(
            env=env,
            log_dir=log_dir,
            workers=WORKERS,
            threads=4,
            schedulers=SCHEDULERS,
            lease_ttl=LEASE_TTL,
            # No random failures: each repository's fate is its path's (fail-once,
            # fail-always...), so that its end state can be checked.
            simulator_args=[
                "--pre-import-seconds", "0.3", "1.0", "--import-seconds", "0.3", "1.0",
                "--max-concurrent", str(REGISTRY_LIMIT), "--no-double-start-guard",
                "--seed", str(SEED), "--start-latency", "0.2",
            ],
        )  # fmt: skip
        # Worker 0's etcd, PostgreSQL and registry links through proxies that a zombie
        # fault cuts or slows (RabbitMQ stays direct: its restart is a fault of its own).
        # One worker only: the proxies forward in this process, and with all three behind
        # them the 300-repository --long run went 3 times slower (30 repositories/minute
        # under faults against 100 without proxies) and stalled past the bound.
        links = [
            ProcessLinks(run.env, name=f"worker-{i}", services=("etcd", "postgres", "registry"))
            for i in range(ZOMBIE_WORKERS if zombies else 0)
        ]
        for index, worker_links in enumerate(links):
            run.set_env(f"worker-{index}", worker_links.env())
        locks = [threading.Lock() for _ in range(WORKERS)]
        log = FaultLog()
        supervisor = WorkerSupervisor(run, locks, log)
        injector = FaultInjector(
            run=run,
            locks=locks,
            etcd=stack.etcd,
            restart_service=stack.restart,
            log=log,
            seed=SEED,
            lease_ttl=LEASE_TTL,
            lease_holder=lambda: _lease_holder(run, etcd_client),
            resume=lambda: _resume(run, store),
            registry_fault_s=REGISTRY_FAULT_S,
            registry_seen=lambda: (
                registry_fault_undos(url) + breaker.state().opened_at,
                store.settings().paused_reason is not None,
            ),
            slow_s=SLOW_ANSWER_S,
            heavy_gap=(3.0, 6.0),
            links=links,
            holder_tokens=lambda index: _tokens_of(run, etcd_client, index),
        )
        etcd_client = Config.from_env(run.env).etcd_client()
        breaker = SharedBreaker(etcd_client, registry_breaker_name(run.env["MIGRATOR_ETCD_PREFIX"]))
        run.start(timeout=120)
        try:
            supervisor.start()
            log.started = time.monotonic()
            if faults:
                injector.start()
            # Not terminal in time is reported with the rest (the figures, CHAOS_REPORT),
            # as a violation. The registry's faults hold until the migrator met them and a
            # restarted simulator takes its time on a loaded machine: 300 s of slack.
            with contextlib.suppress(AssertionError):
                wait_until(
                    lambda: _terminal_now(store) and (not faults or injector.heavy_done.is_set()),
                    timeout=300 + count * (1.0 if faults else 0.5),
                    interval=1,
                    what=f"{count} repositories terminal",
                )
            if faults:
                injector.stop()

            # Triggers sent just before the end still run: wait for the queue to drain.
            def drained() -> bool:
                account = account_triggers(_all_lines(run))
                return not account.never_ran and _queued(run, "") + _queued(run, ".DQ") == 0

            with contextlib.suppress(AssertionError):  # reported with what never ran
                wait_until(drained, timeout=30, interval=1, what="queue drained")
            report = run.report()
            dead_letters = _queued(run, ".XQ")
        finally:
            injector.stop()
            supervisor.stop_restarting()
            codes = run.stop(timeout=30)
            supervisor.finish()
            injector.finish()
            run.delete_queues()
            etcd_client.close()
            for worker_links in links:
                worker_links.close()
        lines = _all_lines(run)
        counts = {str(state): n for state, n in store.counts_by_state().items() if n}
    replay = replay_in_flight(accepted_events(url), capacity=CAPACITY)
    stall_s, stall_from = stall_after_faults(replay.stalls, log.windows())
    terminal, span = throughput_per_minute(url)
    return RunFigures(
        repositories=count,
        terminal=terminal,
        span_s=span,
        counts=counts,
        report=report,
        replay_most=replay.most,
        over_capacity=replay.over_capacity,
        claims=replay.claims,
        undone=replay.undone,
        longest_stall_s=replay.longest_stall_s,
        stall_from=replay.stall_from,
        stale_writes=stale_accepted_writes(url),
        refused_writes=_refused_writes(url),
        triggers=account_triggers(lines),
        scheduler_gap_s=_longest_scheduler_gap(lines),
        dead_letters=dead_letters,
        never_ran_lines=_mentions(lines, account_triggers(lines).never_ran),
        wrong_ends=wrong_end_states(url),
        charged_aborts=aborts_without_a_repository_cause(url),
        registry_fault_undos=registry_fault_undos(url),
        stall_after_faults_s=stall_s,
        stall_after_faults_from=stall_from,
        faults=log if faults else None,
        once=injector.once if faults else (),
        zombie_refused=_refused_of(url, injector.zombie_tokens),
        worker_restarts=supervisor.restarts,
        exit_codes=codes,
    )


def _print(title: str, figures: RunFigures) -> None:
    report = figures.report
    print(f"\n== {title}: {figures.repositories} repositories")
    print(f"  states: {figures.counts}")
    print(
        f"  {figures.terminal} terminal in {figures.span_s:.1f} s:"
        f" {figures.per_minute:.1f} repositories/minute"
    )
    print(
        f"  in flight: max {figures.replay_most} (events replay), registry max"
        f" {report['max_concurrent_imports']}, capacity {CAPACITY}; over capacity:"
        f" {len(figures.over_capacity)}"
    )
    print(
        f"  claims {figures.claims} ({figures.undone} undone after 429); registry answers"
        f" {report['answers']}; outcomes {report['outcomes']}"
    )
    print(
        f"  overlapping repositories: {report['overlapping_repositories']};"
        f" stale accepted writes: {len(figures.stale_writes)};"
        f" refused fenced writes: {figures.refused_writes}"
    )
    stall_at = figures.stall_from.isoformat(timespec="seconds") if figures.stall_from else "-"
    after = figures.stall_after_faults_from
    print(
        f"  longest stall (capacity free, no start): {figures.longest_stall_s:.2f} s at {stall_at};"
        f" counted from the end of the faults: {figures.stall_after_faults_s:.2f} s from"
        f" {after.isoformat(timespec='seconds') if after else '-'} (bound {STALL_BOUND_S:g} s)"
    )
    print(
        f"  wrong end states: {len(figures.wrong_ends)}; aborts without a repository cause:"
        f" {len(figures.charged_aborts)}; claims undone for a registry fault:"
        f" {figures.registry_fault_undos}; faulted registry answers"
        f" {report.get('faulted_answers', {})}"
    )
    for wrong in figures.wrong_ends[:10]:
        print(f"    wrong end: {wrong}")
    for abort in figures.charged_aborts[:10]:
        print(f"    charged abort: {abort}")
    triggers = figures.triggers
    by_source = {source: dict(outcomes) for source, outcomes in triggers.by_source.items()}
    print(
        f"  triggers by source: {by_source}; sent {len(triggers.triggered)}, ran"
        f" {len(triggers.triggered & triggers.ran)}, never ran {len(triggers.never_ran)};"
        f" longest gap between scheduler triggers {figures.scheduler_gap_s:.2f} s"
    )
    for line in figures.never_ran_lines:
        print(f"    never ran: {line}")
    print(f"  notifications: {report['notifications']}; dead letters: {figures.dead_letters}")
    if figures.faults is not None:
        kinds = dict(figures.faults.counts())
        print(f"  faults injected: {kinds}; supervisor restarts: {figures.worker_restarts}")
        print(f"  fenced writes refused to the zombies' tokens: {figures.zombie_refused}")
    print(f"  exit codes at stop: {figures.exit_codes}")


def _violations(figures: RunFigures) -> dict[str, object]:
    """Every invariant broken in the run (empty when all held)."""
    found: dict[str, object] = {}
    if figures.terminal != figures.repositories:
        found["not terminal"] = figures.counts
    if figures.report["overlapping_repositories"]:
        found["two imports of one repository at once"] = figures.report["overlapping_starts"]
    if figures.over_capacity:
        found["over capacity (events replay)"] = [e.id for e in figures.over_capacity]
    if figures.report["max_concurrent_imports"] > CAPACITY:
        found["over capacity (registry)"] = figures.report["max_concurrent_imports"]
    if figures.stale_writes:
        found["stale token accepted"] = figures.stale_writes
    if figures.triggers.never_ran:
        found["triggered but never ran"] = sorted(figures.triggers.never_ran)
    if figures.wrong_ends:
        found["ended other than its path says"] = [
            f"{w.path}: {w.state}/{w.reason} retries {w.retries} (interrupted {w.excused}),"
            f" expected {w.expected.state.value}/{w.expected.reason}"
            f" charged {w.expected.charged}"
            for w in figures.wrong_ends
        ]
    if figures.charged_aborts:
        found["retry charged without a repository cause"] = [
            f"event {a.event_id}: {a.path} cause {a.cause}" for a in figures.charged_aborts
        ]
    if figures.stall_after_faults_s > STALL_BOUND_S:
        found["stalled after the faults ended"] = (
            f"{figures.stall_after_faults_s:.2f} s > {STALL_BOUND_S:g} s from"
            f" {figures.stall_after_faults_from}"
        )
    return found


def _write_report(path: str, figures: RunFigures, violations: dict[str, object]) -> None:
    """The ``CHAOS_REPORT`` file: the run's figures as one JSON object."""
    report = figures.report
    refused = sum(figures.refused_writes.values())
    overlaps = report.get("overlapping_imports", len(report["overlapping_starts"]))
    figures_out = {
        "faults": dict(figures.faults.counts()) if figures.faults else {},
        "violations": [f"{name}: {json.dumps(what, default=str)[:2000]}"
                       for name, what in violations.items()],
        "fenced_writes_refused": refused,
        "fenced_writes_refused_by_reason": figures.refused_writes,
        "fenced_writes_refused_zombie": figures.zombie_refused,
        "overlapping_starts": overlaps,
        "max_in_flight": figures.replay_most,
        "registry_max_concurrent_imports": report["max_concurrent_imports"],
        "capacity": CAPACITY,
        "longest_stall_s": round(figures.stall_after_faults_s, 2),
        "longest_stall_bound_s": STALL_BOUND_S,
        "longest_stall_raw_s": round(figures.longest_stall_s, 2),
        "terminal": figures.terminal,
        "total": figures.repositories,
        "states": figures.counts,
        "wrong_end_state": [w.path for w in figures.wrong_ends],
        "aborts_without_repository_cause": len(figures.charged_aborts),
        "registry_fault_undos": figures.registry_fault_undos,
        "faulted_answers": report.get("faulted_answers", {}),
        "per_minute": round(figures.per_minute, 1),
        "fault_log": [dataclasses.asdict(f) for f in figures.faults.faults]
        if figures.faults
        else [],
    }  # fmt: skip
    with open(path, "w") as out:
        json.dump(figures_out, out, indent=2, default=str)
        out.write("\n")


#: Repositories of the --long run (under faults, and without): ``CHAOS_LONG_COUNT`` makes it
#: shorter on a loaded machine (or longer).
LONG_COUNT = int(os.environ.get("CHAOS_LONG_COUNT", "1000"))


@pytest.mark.timeout(3600)
@pytest.mark.parametrize(
    ("count", "baseline_count", "zombies"),
    [
        (300, 100, False),
        pytest.param(LONG_COUNT, LONG_COUNT, True, marks=pytest.mark.slow, id="1000-long"),
    ],
    ids=str,
)
def test_chaos_run_keeps_the_invariants(
    count: int, baseline_count: int, zombies: bool, private_stack: PrivateStack, tmp_path: Path
) -> None:
    # CHAOS_LOG_DIR keeps the processes' logs after the run (pytest rotates tmp_path).
    logs = Path(os.environ.get("CHAOS_LOG_DIR") or tmp_path) / f"chaos-{count}"
    print(f"\nlogs in {logs}")
    with temporary_database(private_stack.env["MIGRATOR_DATABASE_URL"], prefix="chaos") as url:
        calm = _migrate(
            private_stack, url, count=baseline_count, log_dir=logs / "calm", faults=False
        )
    _print("without faults", calm)
    with temporary_database(private_stack.env["MIGRATOR_DATABASE_URL"], prefix="chaos") as url:
        chaos = _migrate(
            private_stack, url, count=count, log_dir=logs / "chaos", faults=True,
            zombies=zombies,
        )  # fmt: skip
    _print("under faults", chaos)
    assert chaos.faults is not None
    print(
        f"\n  rate under faults {chaos.per_minute:.1f}/min vs without {calm.per_minute:.1f}/min"
        f" ({chaos.per_minute / calm.per_minute:.2f}x)"
    )
    kinds = chaos.faults.counts()
    violations = _violations(chaos)
    if os.environ.get("CHAOS_REPORT"):
        _write_report(os.environ["CHAOS_REPORT"], chaos, violations)
    assert chaos.faults.errors == []
    for kind in chaos.once:
        assert kinds[kind] == 1, kinds
    assert kinds["worker_kill"] >= 3, kinds
    assert _violations(calm) == {}
    print(f"  invariant violations: {len(violations)} {violations if violations else ''}")
    assert violations == {}
    # Every repository ended as its path says (END_BY_MARKER), none charged for the registry.
    assert chaos.wrong_ends == [] and chaos.charged_aborts == []
    assert chaos.counts.keys() <= {str(State.IMPORT_DONE), str(State.IMPORT_SKIPPED)}
    assert chaos.stall_after_faults_s <= STALL_BOUND_S
    assert Counter(chaos.triggers.by_source.keys()) >= Counter({"scheduler": 1, "self": 1})
