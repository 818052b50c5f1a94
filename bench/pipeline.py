"""Repositories per second through the whole state machine, and where the time goes.

A local migration with a zero-latency simulator (start calls answered at once, imports of
0 s), 2 ``dramatiq actors`` workers x 8 threads, capacity 64 (above the threads: never the
bound), migrates N repositories: default -> pre_importing -> pre_import_done -> importing ->
import_done, through an enqueuer run and two notifications (API -> RabbitMQ -> actor), the
second of which does the next enqueuer run in place.

The ceiling: each repository costs a number of PostgreSQL round trips, etcd requests and
RabbitMQ publishes (the model below, from the code: per enqueuer run by outcome, per
notification, per API call; the runs and notifications are counted in the workers' logs).
Each operation's latency is measured in this process, idle before the run and again under
load during it. With 16 threads each doing its repository's operations one after another,
the ceiling is 16 / (the sum of a repository's operation latencies). A second ceiling comes
from the CPU: 2 cores / the CPU seconds our processes spend per repository (from /proc),
and a third from the whole machine's (PostgreSQL, etcd and RabbitMQ share the cores; each
server's share is printed too).
A py-spy profile of one worker during the run says where its CPU time goes.

Goal: at least half the operations ceiling.

Usage::

    uv run python bench/pipeline.py            # 600 repositories, about 2 minutes
    uv run python bench/pipeline.py --quick    # 150 repositories, under a minute

Prints tables, writes bench/results/pipeline.json, and the headline as its last line.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pika

from bench import _common, support
from devtools.launcher import LocalMigration, _group_members
from leases import EtcdClient, HolderInfo, Session, try_acquire
from migration.config import split_broker_urls
from migration.store import Store

WORKERS = 2
THREADS = 8
CAPACITY = 64
GOAL_SHARE = 0.5
#: Issue 16's goal: CPU of our processes per migrated repository, milliseconds.
CPU_GOAL_MS = 20
PY_SPY = Path(sys.executable).with_name("py-spy")

# Operations per unit of work, read off the code (actors/, migration/, leases/gate.py):
# pg = PostgreSQL round trips (a transaction's BEGIN and COMMIT count), etcd = requests,
# rmq = publishes with confirm. Triggers are counted from the logs (enqueue_triggered,
# enqueue_collapsed), not assumed per run or notification: a trigger reads the gate's
# markers (etcd range 1); a sent one also creates a marker on the gate's shared lease
# (etcd 1) and publishes (rmq 1). The gate grants a new lease per process every
# GATE_LEASE_WINDOW seconds at most (etcd 1 each). Runs and triggers take the settings from
# a per-process copy read at most every SETTINGS_MAX_AGE seconds (pg 1 each, counted as if
# every worker process read them that often during the whole run: an upper bound).
_TRIGGER_SENT = {"pg": 0, "etcd": 2, "rmq": 1}
_TRIGGER_COLLAPSED = {"pg": 0, "etcd": 1, "rmq": 0}
GATE_LEASE_WINDOW = 30  # half of actors.runtime.GATE_TTL
SETTINGS_MAX_AGE = 1.0  # actors.runtime.SETTINGS_MAX_AGE
# An accepted claim or step: one call of schema 0005's migration_fenced_write (the migrator
# passes the row it saw, so no read before it; an abort reads, for the max_retries setting).
# The pool's connection check, one round trip per Store call, is counted nowhere here.
_CLAIM_TXN = 1
_STEP_TXN = 1
OPERATIONS: dict[str, dict[str, int]] = {
    # enqueuer run that started a repository: in_flight, candidates (aborted + default),
    # lease acquire, the claim with the read that checks it (Store.claim_as_listed; an
    # aborted candidate is read first, a pg more), registry start, release.
    "run_started": {"pg": 1 + 2 + _CLAIM_TXN, "etcd": 2, "rmq": 0},
    "run_at_capacity": {"pg": 1, "etcd": 0, "rmq": 0},
    "run_other": {"pg": 3, "etcd": 0, "rmq": 0},  # no candidate / every candidate busy
    # A run sent as a message leaves the gate first; one in place (a notification's) not.
    "gate_leave": {"pg": 0, "etcd": 1, "rmq": 0},
    # API: get_by_path, publish (with the id). Actor: acquire, get, step(s), release; the
    # pre-import's two steps in one statement (Store.step_twice).
    "notification_pre_import_complete": {"pg": 1 + 1 + _STEP_TXN, "etcd": 2, "rmq": 1},
    "notification_import_complete": {"pg": 1 + 1 + _STEP_TXN, "etcd": 2, "rmq": 1},
    "trigger_sent": _TRIGGER_SENT,
    "trigger_collapsed": _TRIGGER_COLLAPSED,
    "gate_lease_grant": {"pg": 0, "etcd": 1, "rmq": 0},
    # A run's try of a candidate whose lease a run of another process holds: one create
    # that fails. Held by a run of its own process: known from the session, no request.
    "run_lease_busy": {"pg": 0, "etcd": 1, "rmq": 0},
    "run_lease_busy_here": {"pg": 0, "etcd": 0, "rmq": 0},
    # A run's try of a candidate another run has started since it read the list: acquire,
    # get, release.
    "run_candidate_moved_on": {"pg": 1, "etcd": 2, "rmq": 0},
    # A notification that met its repository's lease held: one create that fails (and the
    # holder's time-to-live when another process holds it), then Dramatiq's retry: the
    # message through the delay queue and back (two publishes).
    "notification_lease_busy": {"pg": 0, "etcd": 1, "rmq": 2},
    "settings_read": {"pg": 1, "etcd": 0, "rmq": 0},
}  # fmt: skip


class OperationTimer:
    """Times one PostgreSQL round trip, one etcd request and one RabbitMQ publish.

    :param store: a Store on the migration's database.
    :param etcd_endpoints: ``host:port,...``.
    :param broker_url: the AMQP URL.
    """

    def __init__(self, *, store: Store, etcd_endpoints: str, broker_url: str) -> None:
        self.store = store
        self.etcd = EtcdClient(support.etcd_endpoints(etcd_endpoints), timeout=5)
        self.session = Session(self.etcd, ttl=10)
        self.key = f"/bench-pipeline-{uuid.uuid4().hex[:8]}/op"
        self.broker_url = broker_url
        self.queue = f"bench_pipeline_{uuid.uuid4().hex[:8]}"

    def _pg(self) -> None:
        self.store.get(1)

    def _etcd(self) -> None:
        # acquire + release: two requests; the caller halves the time.
        hold = try_acquire(self.session, self.key, holder=HolderInfo(actor="bench")).hold
        assert hold is not None
        hold.release()

    def _rmq(self, channel: Any) -> None:
        channel.basic_publish(exchange="", routing_key=self.queue, body=b"x")

    def measure(self, samples: int) -> dict[str, float]:
        """Median milliseconds of each operation, taking turns."""
        times: dict[str, list[float]] = {"pg": [], "etcd": [], "rmq": []}
        # A connection per measurement: an idle blocking connection misses its heartbeats.
        nodes = split_broker_urls(self.broker_url)
        connection = pika.BlockingConnection([pika.URLParameters(url) for url in nodes])
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            channel.queue_declare(queue=self.queue, auto_delete=True)
            calls: dict[str, tuple[Callable[[], None], int]] = {
                "pg": (self._pg, 1),
                "etcd": (self._etcd, 2),
                "rmq": (lambda: self._rmq(channel), 1),
            }
            for _ in range(samples):
                for name, (call, requests) in calls.items():
                    began = time.perf_counter()
                    call()
                    times[name].append((time.perf_counter() - began) * 1e3 / requests)
            channel.queue_delete(self.queue)
        finally:
            connection.close()
        return {name: statistics.median(values) for name, values in times.items()}

    def close(self) -> None:
        self.session.close()
        self.etcd.close()


def profile(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    """Start py-spy on ``pid`` for ``seconds`` (raw collapsed stacks into ``out``)."""
    if not PY_SPY.exists():
        return None
    return subprocess.Popen(
        [str(PY_SPY), "record", "--pid", str(pid), "--duration", str(int(seconds)),
         "--rate", "200", "--format", "raw", "--output", str(out), "--nonblocking", "--gil"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


_LIBRARIES = (
    ("psycopg", "PostgreSQL client (psycopg)"),
    ("grpc", "etcd client (grpc)"),
    ("etcd3", "etcd client (etcd3)"),
    ("google/protobuf", "etcd client (protobuf)"),
    ("pika", "RabbitMQ client (pika)"),
    ("dramatiq", "Dramatiq"),
    ("urllib3", "HTTP client (urllib3, http.client)"),
    ("http/client.py", "HTTP client (urllib3, http.client)"),
    ("structlog", "logging (structlog, json)"),
    ("json", "logging (structlog, json)"),
    ("/leases/", "ours: leases"),
    ("/migration/", "ours: migration"),
    ("/actors/", "ours: actors"),
    ("threading.py", "thread handoff (threading, queue)"),
    ("queue.py", "thread handoff (threading, queue)"),
)
_OURS = (
    "trigger_enqueue", "execute (actors/enqueuer.py", "claim (migration/store/writes.py",
    "step (migration/store/writes.py", "candidates (migration/store/repositories.py",
    "settings (migration/store/settings.py",
    "try_acquire (leases/hold.py", "release (leases/hold.py", "enter (leases/gate.py",
    "start_pre_import (migration/registry.py", "start_import (migration/registry.py",
    "handle_registry_notification", "_one (migration/store/base.py",
)  # fmt: skip


def summarize_profile(path: Path) -> dict[str, Any]:
    """Self time by library and inclusive time of our main functions, as shares of samples."""
    by_library: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    try:
        text = path.read_text()
    except OSError:
        return {}
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        leaf = frames[-1]
        library = next((name for needle, name in _LIBRARIES if needle in leaf), "other")
        by_library[library] += count
        for needle in _OURS:
            if any(needle in frame for frame in frames):
                inclusive[needle.split(" ")[0]] += count
    if not total:
        return {}
    return {
        "samples": total,
        "self_by_library": {k: v / total for k, v in by_library.most_common()},
        "inclusive": {k: v / total for k, v in inclusive.most_common()},
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Repositories per second through the whole state machine with a "
        "zero-latency registry, the ceiling its operations imply, and a profile.",
        epilog="Example: uv run python bench/pipeline.py --quick",
    )
    parser.add_argument("--quick", action="store_true", help="150 repositories")
    parser.add_argument("--repositories", type=int, help="default 600 (--quick 150)")
    parser.add_argument("--no-profile", action="store_true", help="skip py-spy")
    parser.add_argument(
        "--profile-process",
        choices=("worker", "api", "simulator"),
        default="worker",
        help="the process py-spy records (default: one worker's actor process)",
    )
    parser.add_argument(
        "--threads", type=int, default=THREADS, help=f"threads per worker (default {THREADS})"
    )
    parser.add_argument(
        "--keep-logs",
        type=Path,
        metavar="DIR",
        help="write the processes' logs into DIR and keep them (default: a temporary folder)",
    )
    args = parser.parse_args(argv)
    args.repositories = args.repositories or (150 if args.quick else 600)
    return args


def _log_dir(keep: Path | None) -> contextlib.AbstractContextManager[str]:
    """The folder for the children's logs: ``keep`` (made, and left), else a temporary one."""
    if keep is None:
        return tempfile.TemporaryDirectory(prefix="bench-pipeline-")
    keep.mkdir(parents=True, exist_ok=True)
    return contextlib.nullcontext(str(keep))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    support.quiet_logs()
    env = _common.stack_env()
    machine = support.machine()
    began = time.monotonic()
    threads = WORKERS * args.threads
    with (
        _common.fresh_database(env["MIGRATOR_DATABASE_URL"], label="pipeline") as url,
        Store(url, max_size=4) as store,
        _log_dir(args.keep_logs) as logs,
    ):
        store.update_settings(
            enabled=False, capacity=CAPACITY, enqueue_waiting_time=0, max_tags_count=0,
            enqueue_interval=1, guard_interval=30, max_step_duration=120,
        )  # fmt: skip
        ids = _common.add_repositories(
            url, (f"bench/pipeline/repo-{i}" for i in range(args.repositories))
        )
        run = LocalMigration(
            env={**env, "MIGRATOR_DATABASE_URL": url, "MIGRATOR_LOG_LEVEL": "info"},
            log_dir=Path(logs), workers=WORKERS, threads=args.threads, lease_ttl=10,
            simulator_args=["--pre-import-seconds", "0", "0", "--import-seconds", "0", "0",
                            "--log-level", "warning"],
        )  # fmt: skip
        _common.note(f"starting {WORKERS} workers x {args.threads} threads...")
        run.start(timeout=120)
        # After the children are started: no gRPC threads of ours while the launcher forks.
        timer = OperationTimer(
            store=store,
            etcd_endpoints=env["MIGRATOR_ETCD_ENDPOINTS"],
            broker_url=env["MIGRATOR_BROKER_URL"],
        )
        try:
            idle = timer.measure(100)
            # The scheduler's log too: its periodic triggers cost what the others do.
            window = _common.LogWindow(
                [run.log_path(f"worker-{i}") for i in range(WORKERS)]
                + [run.log_path("scheduler-0")]
            )
            groups = {f"worker-{i}": run.worker_group(i) for i in range(WORKERS)}
            groups.update({name: _pids(run, name) for name in ("api", "simulator", "scheduler-0")})
            pids = [p for members in groups.values() for p in members]
            cpu_before = _common.cpu_seconds(pids)
            machine_before = _common.machine_busy_seconds()
            servers_before = _common.server_ticks()
            group_before = {name: _common.cpu_seconds(m) for name, m in groups.items()}
            # A worker's forked process runs the actors; the others are one process each.
            profiled = (
                max(run.worker_group(0))
                if args.profile_process == "worker"
                else max(groups[args.profile_process])
            )
            spy_out = Path(logs) / "profile.txt"
            expected_s = max(3.0, args.repositories / 40)
            spy = None if args.no_profile else profile(profiled, expected_s, spy_out)
            under_load: dict[str, float] = {}

            def measure_under_load() -> None:
                time.sleep(1.0)  # the run is under way
                under_load.update(timer.measure(30))

            sampler = threading.Thread(target=measure_under_load, daemon=True)
            store.update_settings(enabled=True)
            sampler.start()
            with _common.ReferenceSampler() as speed:
                _common.wait_until(
                    lambda: _common.terminal_count(url, ids) == len(ids),
                    timeout=120 + args.repositories,
                    what="every repository terminal",
                    interval=0.2,
                )
                cpu_used = _common.cpu_seconds(pids) - cpu_before
                machine_used = _common.machine_busy_seconds() - machine_before
                server_cpu = _common.server_seconds_since(servers_before)
            cpu_by_process = {
                name: _common.cpu_seconds(m) - group_before[name] for name, m in groups.items()
            }
            sampler.join(timeout=60)
            if spy is not None:
                try:
                    spy.wait(timeout=expected_s + 30)
                except subprocess.TimeoutExpired:  # a loaded machine: keep what it wrote
                    spy.kill()
                    spy.wait()
            runs = window.lines("enqueue_next_migration")
            notifications = window.lines("registry_notification_handled")
            triggers = {
                "notification_lease_busy": len(window.lines("notification_lease_busy")),
                "trigger_sent": len(window.lines("enqueue_triggered")),
                "trigger_collapsed": len(window.lines("enqueue_collapsed")),
            }
        finally:
            run.stop(timeout=30)
            run.delete_queues()
            timer.close()
        span = _common.event_span(url, ids)
        assert span is not None
        seconds = (span[1] - span[0]).total_seconds()
        profile_summary = summarize_profile(spy_out) if spy is not None else {}
        if spy is not None and spy_out.exists():
            # The raw stacks, for a look below the libraries (py-spy's collapsed format).
            support.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
            suffix = "" if args.profile_process == "worker" else f"-{args.profile_process}"
            saved = support.RESULTS_DIR / f"pipeline-profile{suffix}.txt"
            saved.write_bytes(spy_out.read_bytes())
    count = len(ids)
    per_s = count / seconds
    statuses = Counter(str(r.get("job_status")) for r in runs)
    kinds: Counter[str] = Counter()
    for status, n in statuses.items():
        kind = {"started": "run_started", "at_capacity": "run_at_capacity"}.get(status)
        kinds[kind or "run_other"] += n
    kinds["gate_leave"] = sum(r.get("actor") == "enqueue_next_migration" for r in runs)
    # Each run's line counts its candidates found busy, and found started since it read them.
    here = sum(int(r.get("candidates_busy_here") or 0) for r in runs)
    kinds["run_lease_busy"] = sum(int(r.get("candidates_busy") or 0) for r in runs) - here
    kinds["run_lease_busy_here"] = here
    kinds["run_candidate_moved_on"] = sum(int(r.get("candidates_moved_on") or 0) for r in runs)
    for line in notifications:
        kinds[f"notification_{line.get('notified_status')}"] += 1
    kinds.update(triggers)
    # What sent the runs that found no free slot (or nothing to do): the trigger economy.
    by_source = Counter((str(r.get("source")), str(r.get("job_status"))) for r in runs)
    # At most one grant per worker process per window (and one at its first trigger).
    kinds["gate_lease_grant"] = WORKERS * (1 + int(seconds // GATE_LEASE_WINDOW))
    kinds["settings_read"] = WORKERS * (1 + int(seconds // SETTINGS_MAX_AGE))
    per_repository = {
        op: sum(OPERATIONS.get(kind, {}).get(op, 0) * n for kind, n in kinds.items()) / count
        for op in ("pg", "etcd", "rmq")
    }
    ceilings = {}
    for label, latency in (("idle", idle), ("under_load", under_load or idle)):
        repository_ms = sum(per_repository[op] * latency[op] for op in per_repository)
        ceilings[label] = {"repository_ms": repository_ms, "per_s": threads / repository_ms * 1e3}
    cpu_per_repository_ms = cpu_used / count * 1e3
    # The machine's speed drifts by up to twice within minutes: CPU at a nominal speed too.
    nominal_ms = speed.at_nominal(cpu_per_repository_ms)
    cpu_ceiling = (os.cpu_count() or 1) / (cpu_used / count)
    # Everything the run costs the machine: PostgreSQL, etcd and RabbitMQ too (and this
    # script and anything else running): the rate two cores can reach at most.
    machine_ms = machine_used / count * 1e3
    machine_ceiling = (os.cpu_count() or 1) / (machine_used / count)
    ceiling = ceilings["idle"]["per_s"]
    met = per_s >= GOAL_SHARE * ceiling

    print(_common.table(
        ["operation", "per repository", "idle ms", "under load ms", "ms per repository (load)"],
        [[op, per_repository[op], idle[op], (under_load or idle)[op],
          per_repository[op] * (under_load or idle)[op]] for op in per_repository],
    ))  # fmt: skip
    print()
    print(_common.table(
        ["unit of work", "count", "per repository"],
        [[kind, n, n / count] for kind, n in sorted(kinds.items())],
    ))  # fmt: skip
    print()
    print(_common.table(
        ["run source", "outcome", "runs", "per repository"],
        [[src, status, n, n / count] for (src, status), n in sorted(by_source.items())],
    ))  # fmt: skip
    print()
    print(_common.table(
        ["figure", "repos/s", "measured / figure"],
        [["measured", per_s, 1.0],
         ["ceiling: operations, idle latencies", ceiling, per_s / ceiling],
         ["ceiling: operations, latencies under load", ceilings["under_load"]["per_s"],
          per_s / ceilings["under_load"]["per_s"]],
         [f"ceiling: CPU ({cpu_per_repository_ms:.0f} ms of our processes per repository)",
          cpu_ceiling, per_s / cpu_ceiling],
         [f"ceiling: CPU ({machine_ms:.0f} ms of the whole machine per repository)",
          machine_ceiling, per_s / machine_ceiling]],
    ))  # fmt: skip
    print()
    print(_common.table(
        ["process", "CPU ms per repository"],
        [[name, cpu / count * 1e3] for name, cpu in cpu_by_process.items()]
        + [[f"({server})", cpu / count * 1e3] for server, cpu in server_cpu.items()]
        + [["(the whole machine)", machine_ms]],
    ))  # fmt: skip
    print(
        f"machine speed during the run: the reference workload took {speed.mean_ms:.1f} ms "
        f"of CPU ({len(speed.samples)} samples; nominal {speed.NOMINAL_MS:g}): "
        f"{nominal_ms:.1f} ms per repository at the nominal speed"
    )
    if profile_summary:
        print()
        print(
            f"{args.profile_process} profile (py-spy --gil: samples holding the GIL, one "
            f"{args.profile_process} process):"
        )
        print(_common.table(
            ["self time in", "share"],
            [[k, f"{v:.0%}"] for k, v in list(profile_summary["self_by_library"].items())[:10]],
        ))  # fmt: skip
        print(_common.table(
            ["inclusive time in", "share"],
            [[k, f"{v:.0%}"] for k, v in profile_summary["inclusive"].items()],
        ))  # fmt: skip
    headline = (
        f"{cpu_per_repository_ms:.0f} ms of CPU per migrated repository (our processes; "
        f"{nominal_ms:.0f} at the nominal speed; goal {CPU_GOAL_MS:g}), "
        f"{per_s:.1f} repositories/s through the state machine "
        f"({WORKERS} x {args.threads} threads, "
        f"zero-latency registry) = {per_s / ceiling:.2f} of the operations ceiling "
        f"{ceiling:.0f}/s (goal {GOAL_SHARE:g}: {'met' if met else 'missed'}); "
        f"{per_s / cpu_ceiling:.2f} of the CPU ceiling {cpu_ceiling:.0f}/s"
    )
    support.publish(
        "pipeline",
        {
            "benchmark": "pipeline",
            "settings": {
                "repositories": count,
                "workers": WORKERS,
                "threads": args.threads,
                "capacity": CAPACITY,
            },
            "machine": machine,
            "duration_s": time.monotonic() - began,
            "seconds": seconds,
            "per_s": per_s,
            "job_statuses": dict(statuses),
            "units_of_work": dict(kinds),
            "runs_by_source": {f"{src}/{status}": n for (src, status), n in by_source.items()},
            "operation_model": OPERATIONS,
            "operations_per_repository": per_repository,
            "latency_ms": {"idle": idle, "under_load": under_load},
            "ceilings": ceilings,
            "cpu_seconds": cpu_used,
            "cpu_ms_per_repository": cpu_per_repository_ms,
            "reference_workload_ms": {
                "mean": speed.mean_ms,
                "samples": speed.samples,
                "nominal": speed.NOMINAL_MS,
            },
            "cpu_ms_per_repository_at_nominal_speed": nominal_ms,
            "cpu_ms_per_repository_by_process": {
                name: cpu / count * 1e3 for name, cpu in cpu_by_process.items()
            },
            "cpu_ceiling_per_s": cpu_ceiling,
            "machine_cpu_ms_per_repository": machine_ms,
            "server_cpu_ms_per_repository": {
                server: cpu / count * 1e3 for server, cpu in server_cpu.items()
            },
            "machine_cpu_ceiling_per_s": machine_ceiling,
            "profile": profile_summary,
            "goal_met": met,
            "headline": headline,
        },
    )
    return 0


def _pids(run: LocalMigration, name: str) -> list[int]:
    for child in run._children():
        if child.name == name and child.process is not None:
            return _group_members(child.process.pid)
    return []


if __name__ == "__main__":
    sys.exit(main())
