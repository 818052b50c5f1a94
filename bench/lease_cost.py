"""What does a lease cost, against peers? Acquire + release, side by side in one run.

Contenders, each taking and giving back one key per operation:

- ``ours``: ``leases.try_acquire(session, key)`` then ``hold.release()`` on one Session;
- ``raw-client``: the same two transactions through ``EtcdClient.create`` and
  ``delete_if_created_at`` (no HolderInfo, no Hold object);
- ``raw-txn``: the floor: two ``KV.Txn`` calls with prebuilt request bytes and a trivial
  compare (put on a lease if absent, delete if present), answers decoded as ours are;
- ``etcd3-lock``: python-etcd3's ``Lock`` (``client.lock(name, ttl).acquire()/release()``);
- ``dramatiq``: Dramatiq's ``ConcurrentRateLimiter`` (limit 1) on Redis;
- ``pg-advisory``: ``pg_try_advisory_lock`` / ``pg_advisory_unlock``, one connection per thread.

With one thread and with eight (each thread its own key: the cost, not contention; with
``--contention`` also eight threads on one key). The measured time of each contender is cut
into rounds and the contenders take turns within each round, so the machine's noise (it is
shared) hits them all alike. Latency is per operation (acquire + release), from
``time.perf_counter_ns``; ops/s is operations over the wall time of the slices.

Usage::

    uv run python bench/lease_cost.py            # about 1.5 minutes
    uv run python bench/lease_cost.py --quick    # under a minute
    uv run python bench/lease_cost.py --seconds 10 --rounds 10 --profile ours

Prints a table, writes bench/results/leases.json, and prints the headline as its last line.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import etcd3
import etcd3.etcdrpc as rpc
import psycopg
from dramatiq.rate_limits import ConcurrentRateLimiter
from dramatiq.rate_limits.backends import RedisBackend

from bench import support
from leases import EtcdClient, HolderInfo, Session, try_acquire

Operation = Callable[[], bool]  # one acquire + release; False when the key was busy

LEASE_TTL = 10
FLOOR = "raw-txn"
ETCD3_LOCK = "etcd3-lock"
OURS = "ours"
GOAL_LATENCY = 1.3  # ours p50 within this many times the raw floor (1 thread)
GOAL_THROUGHPUT = 1.5  # ours ops/s at least this many times python-etcd3's Lock (8 threads)


class Contender(Protocol):
    name: str
    description: str

    def operation(self, *, slot: str, thread_index: int) -> Operation:
        """The acquire + release of the key named by ``slot``, for one worker thread."""
        ...

    def close(self) -> None: ...


class Ours:
    """``try_acquire`` + ``Hold.release`` on one shared Session."""

    name = OURS
    description = "leases.try_acquire + Hold.release (one Session)"

    def __init__(self, *, endpoints: list[tuple[str, int]], prefix: str) -> None:
        self.client = EtcdClient(endpoints, timeout=5)
        self.session = Session(self.client, ttl=LEASE_TTL)
        self.prefix = f"{prefix}/ours"

    def operation(self, *, slot: str, thread_index: int) -> Operation:
        session, key = self.session, f"{self.prefix}/{slot}"

        def acquire_release() -> bool:
            hold = try_acquire(session, key).hold
            if hold is None:
                return False
            return hold.release()

        return acquire_release

    def close(self) -> None:
        self.session.close()
        self.client.close()


class RawClient:
    """``EtcdClient.create`` + ``delete_if_created_at``: the same transactions, no objects."""

    name = "raw-client"
    description = "EtcdClient.create + delete_if_created_at"

    def __init__(self, *, endpoints: list[tuple[str, int]], prefix: str) -> None:
        self.client = EtcdClient(endpoints, timeout=5)
        # A long lease, revoked at the end: no keep-alive thread in the measurement.
        self.lease_id, _ = self.client.grant(600)
        self.prefix = f"{prefix}/raw-client"
        self.value = HolderInfo(actor="bench").to_json()

    def operation(self, *, slot: str, thread_index: int) -> Operation:
        client, key = self.client, f"{self.prefix}/{slot}"
        value, lease_id = self.value, self.lease_id

        def acquire_release() -> bool:
            result = client.create(key, value, lease_id=lease_id)
            if not result.created or result.current is None:
                return False
            return client.delete_if_created_at(key, result.current.create_revision)

        return acquire_release

    def close(self) -> None:
        self.client.revoke(self.lease_id)
        self.client.close()


class RawTxnFloor:
    """Two ``KV.Txn`` round trips with prebuilt request bytes: the absolute floor.

    The requests are serialized once; the calls go through the same pass-through Txn method
    and answer decoder (``leases._wire``) as ``EtcdClient``'s own transactions, so the floor
    is a floor for ours (with the stub it would parse every answer with pure-Python protobuf,
    which ours no longer does).
    """

    name = FLOOR
    description = "KV.Txn put-if-absent + Txn delete, prebuilt bytes (floor)"

    def __init__(self, *, endpoints: list[tuple[str, int]], prefix: str) -> None:
        self.client = EtcdClient(endpoints, timeout=5)
        self.lease_id, _ = self.client.grant(600)
        self.prefix = f"{prefix}/raw-txn"
        self.value = HolderInfo(actor="bench").to_json()

    def operation(self, *, slot: str, thread_index: int) -> Operation:
        raw = f"{self.prefix}/{slot}".encode()
        put = rpc.TxnRequest(
            compare=[
                rpc.Compare(
                    key=raw, target=rpc.Compare.CREATE, result=rpc.Compare.EQUAL, create_revision=0
                )
            ],
            success=[
                rpc.RequestOp(
                    request_put=rpc.PutRequest(key=raw, value=self.value, lease=self.lease_id)
                )
            ],
        )
        delete = rpc.TxnRequest(
            compare=[
                rpc.Compare(
                    key=raw, target=rpc.Compare.VERSION, result=rpc.Compare.GREATER, version=0
                )
            ],
            success=[rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=raw))],
        )
        put_bytes, delete_bytes = put.SerializeToString(), delete.SerializeToString()
        txn = self.client._txn  # the benchmark may reach into leases.etcd's internals
        timeout = self.client.timeout

        def acquire_release() -> bool:
            if not txn(put_bytes, timeout).succeeded:
                return False
            return bool(txn(delete_bytes, timeout).succeeded)

        return acquire_release

    def close(self) -> None:
        self.client.revoke(self.lease_id)
        self.client.close()


class Etcd3Lock:
    """python-etcd3's own ``Lock``: a new lease per acquire, then the txn; txn on release."""

    name = ETCD3_LOCK
    description = "python-etcd3 Lock acquire + release"

    def __init__(self, *, endpoints: list[tuple[str, int]], prefix: str) -> None:
        host, port = endpoints[0]
        self.client = etcd3.client(host=host, port=port, timeout=5)
        self.prefix = prefix.strip("/") + "/etcd3-lock"

    def operation(self, *, slot: str, thread_index: int) -> Operation:
        client, name = self.client, f"{self.prefix}/{slot}"

        def acquire_release() -> bool:
            lock = client.lock(name, ttl=LEASE_TTL)  # a fresh Lock per use, as in `with`
            try:
                if not lock.acquire(timeout=0):  # timeout 0: one try, never waits on a watch
                    return False
            except TypeError:
                # A busy key: python-etcd3 0.12's retry callback does not fit tenacity >= 8.2
                # (kragniz/python-etcd3#2149), so Lock.acquire raises instead of answering
                # False (and leaves the lease it granted to expire). Not acquired: busy.
                return False
            return bool(lock.release())

        return acquire_release

    def close(self) -> None:
        self.client.close()


class DramatiqMutex:
    """Dramatiq's ``ConcurrentRateLimiter`` with limit 1 on the Redis backend."""

    name = "dramatiq"
    description = "dramatiq ConcurrentRateLimiter(limit=1), Redis"

    def __init__(self, *, redis_url: str, prefix: str) -> None:
        self.backend = RedisBackend(url=redis_url)
        self.prefix = prefix.strip("/") + "-dramatiq"
        self.keys: set[str] = set()

    def operation(self, *, slot: str, thread_index: int) -> Operation:
        key = f"{self.prefix}-{slot}"
        self.keys.add(key)
        limiter = ConcurrentRateLimiter(self.backend, key, limit=1, ttl=60_000)

        def acquire_release() -> bool:
            with limiter.acquire(raise_on_failure=False) as acquired:
                return bool(acquired)

        return acquire_release

    def close(self) -> None:
        if self.keys:
            self.backend.client.delete(*self.keys)
        self.backend.client.close()


class PgAdvisoryLock:
    """``pg_try_advisory_lock`` / ``pg_advisory_unlock``, one connection per thread."""

    name = "pg-advisory"
    description = "PostgreSQL pg_try_advisory_lock + unlock"

    def __init__(self, *, database_url: str, prefix: str) -> None:
        self.database_url = database_url
        self.prefix = prefix
        self.connections: dict[int, psycopg.Connection[Any]] = {}

    def operation(self, *, slot: str, thread_index: int) -> Operation:
        if thread_index not in self.connections:
            self.connections[thread_index] = psycopg.connect(self.database_url, autocommit=True)
        cursor = self.connections[thread_index].cursor()
        digest = hashlib.blake2b(f"{self.prefix}/{slot}".encode(), digest_size=8).digest()
        lock_id = int.from_bytes(digest, "big", signed=True)

        def acquire_release() -> bool:
            cursor.execute("SELECT pg_try_advisory_lock(%s)", (lock_id,))
            row = cursor.fetchone()
            if not row or not row[0]:
                return False
            cursor.execute("SELECT pg_advisory_unlock(%s)", (lock_id,))
            row = cursor.fetchone()
            return bool(row and row[0])

        return acquire_release

    def close(self) -> None:
        for connection in self.connections.values():
            connection.close()


@dataclass
class Cell:
    """All measurements of one contender at one thread count (summed over rounds)."""

    contender: str
    threads: int
    shared_key: bool
    latencies_ns: list[int] = field(default_factory=list)
    busy: int = 0
    errors: int = 0
    first_error: str | None = None
    wall_ns: int = 0
    cpu_s: float = 0.0  # CPU time of this whole process (every thread) during the slices
    round_ops_per_s: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.threads}" + (" (1 key)" if self.shared_key else "")

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.latencies_ns)
        ops = len(ordered)
        return {
            "contender": self.contender,
            "threads": self.threads,
            "shared_key": self.shared_key,
            "operations": ops,
            "busy": self.busy,
            "errors": self.errors,
            "first_error": self.first_error,
            "wall_s": self.wall_ns / 1e9,
            "p50_ms": support.percentile(ordered, 0.50) / 1e6,
            "p90_ms": support.percentile(ordered, 0.90) / 1e6,
            "p99_ms": support.percentile(ordered, 0.99) / 1e6,
            "mean_ms": (sum(ordered) / ops / 1e6) if ops else 0.0,
            "ops_per_s": ops / (self.wall_ns / 1e9) if self.wall_ns else 0.0,
            "client_cpu_ms_per_op": self.cpu_s / ops * 1e3 if ops else 0.0,
            "round_ops_per_s": self.round_ops_per_s,
        }


def run_slice(
    cell: Cell,
    operations: list[Operation],
    *,
    seconds: float | None,
    ops_per_thread: int | None,
    record: bool = True,
) -> None:
    """Run every operation in its own thread for ``seconds`` (or ``ops_per_thread`` times)."""
    count = len(operations)
    barrier = threading.Barrier(count + 1)
    start = [0]
    results: list[tuple[list[int], int, int, str | None]] = [([], 0, 0, None)] * count

    def work(index: int) -> None:
        operation = operations[index]
        latencies: list[int] = []
        append = latencies.append
        clock = time.perf_counter_ns
        busy = errors = 0
        first_error = None
        barrier.wait()
        deadline = start[0] + int((seconds or 0) * 1e9)
        remaining = ops_per_thread
        while True:
            if remaining is None:
                if clock() >= deadline:
                    break
            elif remaining <= 0:
                break
            else:
                remaining -= 1
            began = clock()
            try:
                acquired = operation()
            except Exception as error:  # count and go on: one failure must not end the run
                errors += 1
                first_error = first_error or f"{type(error).__name__}: {error}"
                time.sleep(0.01)
                continue
            append(clock() - began)
            if not acquired:
                busy += 1
        results[index] = (latencies, busy, errors, first_error)

    workers = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(count)]
    for worker in workers:
        worker.start()
    cpu = time.process_time()
    start[0] = time.perf_counter_ns()
    barrier.wait()
    for worker in workers:
        worker.join()
    wall = time.perf_counter_ns() - start[0]
    cpu = time.process_time() - cpu
    if not record:
        return
    cell.wall_ns += wall
    cell.cpu_s += cpu
    cell.round_ops_per_s.append(sum(len(r[0]) for r in results) / (wall / 1e9))
    for latencies, busy, errors, first_error in results:
        cell.latencies_ns.extend(latencies)
        cell.busy += busy
        cell.errors += errors
        cell.first_error = cell.first_error or first_error


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Lease acquire + release cost: ours vs raw etcd, python-etcd3 Lock, "
        "Dramatiq ConcurrentRateLimiter (Redis), PostgreSQL advisory locks.",
        epilog="Example: uv run python bench/lease_cost.py --quick",
    )
    parser.add_argument("--quick", action="store_true", help="a whole run in under 60 s")
    parser.add_argument(
        "--seconds", type=float, help="measured seconds per contender and thread count"
    )
    parser.add_argument(
        "--ops", type=int, help="operations per thread per contender and thread count (not time)"
    )
    parser.add_argument("--rounds", type=int, help="turns the measurement is cut into")
    parser.add_argument(
        "--threads", default="1,8", help="comma-separated thread counts (default 1,8)"
    )
    parser.add_argument(
        "--contention", action="store_true", help="also 8 threads on one shared key per contender"
    )
    parser.add_argument("--only", help="comma-separated contender names to run (floor is kept)")
    parser.add_argument(
        "--profile",
        metavar="CONTENDER",
        help="after the run, profile CONTENDER with pyinstrument (1 thread, 3 s)",
    )
    args = parser.parse_args(argv)
    if args.seconds is not None and args.ops is not None:
        parser.error("--seconds and --ops exclude each other")
    if args.seconds is not None and args.seconds <= 0:
        parser.error("--seconds must be positive")
    if args.ops is not None and args.ops <= 0:
        parser.error("--ops must be positive")
    if args.rounds is not None and args.rounds <= 0:
        parser.error("--rounds must be positive")
    try:
        args.thread_counts = [int(t) for t in args.threads.split(",")]
    except ValueError:
        parser.error(f"--threads must be comma-separated integers, not {args.threads!r}")
    if any(t <= 0 for t in args.thread_counts):
        parser.error("--threads must be positive")
    if args.seconds is None and args.ops is None:
        args.seconds = 1.6 if args.quick else 6.0
    if args.rounds is None:
        args.rounds = 4 if args.quick else 6
    args.warmup = 0.25 if args.quick else 0.6
    return args


def build_contenders(only: set[str] | None, env: dict[str, str], prefix: str) -> list[Contender]:
    endpoints = support.etcd_endpoints(env["MIGRATOR_ETCD_ENDPOINTS"])
    makers: dict[str, Callable[[], Contender]] = {
        OURS: lambda: Ours(endpoints=endpoints, prefix=prefix),
        "raw-client": lambda: RawClient(endpoints=endpoints, prefix=prefix),
        FLOOR: lambda: RawTxnFloor(endpoints=endpoints, prefix=prefix),
        ETCD3_LOCK: lambda: Etcd3Lock(endpoints=endpoints, prefix=prefix),
        "dramatiq": lambda: DramatiqMutex(redis_url=env["MIGRATOR_REDIS_URL"], prefix=prefix),
        "pg-advisory": lambda: PgAdvisoryLock(
            database_url=env["MIGRATOR_DATABASE_URL"], prefix=prefix
        ),
    }
    if only:
        unknown = only - set(makers)
        if unknown:
            raise SystemExit(
                f"bench: unknown contender(s) {sorted(unknown)}; known: {sorted(makers)}"
            )
        only = only | {FLOOR}
    return [make() for name, make in makers.items() if not only or name in only]


_CATEGORIES = [
    ("google/protobuf", "protobuf (pure Python: build, serialize, parse)"),
    ("grpc/", "gRPC Python layer"),
    ("/leases/", "leases"),
    ("etcd3/", "python-etcd3"),
    ("tenacity/", "tenacity"),
    ("dramatiq/", "dramatiq"),
    ("redis/", "redis-py"),
    ("psycopg/", "psycopg"),
]


def time_by_category(root: Any) -> dict[str, float]:
    """Self time of a pyinstrument frame tree, by library; the blocking wait of a gRPC
    unary call (C core: network and etcd) gets its own line."""
    totals: dict[str, float] = {}
    stack = [root]
    while stack:
        frame = stack.pop()
        stack.extend(frame.children)
        if frame.is_synthetic:
            continue
        path = frame.file_path or ""
        if frame.function == "_blocking" and path.endswith("grpc/_channel.py"):
            category = "waiting in a gRPC unary call (etcd, network, C core)"
        else:
            category = next((name for marker, name in _CATEGORIES if marker in path), "other")
        totals[category] = totals.get(category, 0.0) + frame.total_self_time
    return totals


def profile(contender: Contender, *, seconds: float = 3.0) -> None:
    """Profile ``seconds`` of one thread's operations with pyinstrument (on this thread:
    pyinstrument sees only the thread it was started on), printed to stderr."""
    from pyinstrument import Profiler

    operation = contender.operation(slot="profile", thread_index=0)
    for _ in range(50):
        operation()
    profiler = Profiler(interval=0.0002)
    count = 0
    cpu = time.process_time()
    profiler.start()
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        operation()
        count += 1
    profiler.stop()
    cpu = time.process_time() - cpu
    print(
        f"\n--- pyinstrument: {contender.name}, 1 thread, {count / seconds:.0f} ops/s, "
        f"process CPU {cpu / count * 1e3:.3f} ms/op (profiler included) ---",
        file=sys.stderr,
    )
    print(profiler.output_text(unicode=True, color=False, show_all=False), file=sys.stderr)
    root = profiler.last_session.root_frame() if profiler.last_session else None
    if root is not None:
        print("time per operation by where it was spent (self time):", file=sys.stderr)
        for category, spent in sorted(time_by_category(root).items(), key=lambda kv: -kv[1]):
            print(f"  {spent / count * 1e3:7.3f} ms  {category}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    support.quiet_logs()
    env = support.ensure_stack(
        ["MIGRATOR_ETCD_ENDPOINTS", "MIGRATOR_DATABASE_URL", "MIGRATOR_REDIS_URL"],
        with_redis=True,
    )
    prefix = f"/bench-leases-{uuid.uuid4().hex[:8]}"
    only = set(args.only.split(",")) if args.only else None
    load_before = support.machine()
    began = time.monotonic()
    contenders = build_contenders(only, env, prefix)
    variants = [(t, False) for t in args.thread_counts]
    if args.contention:
        variants.append((8, True))
    cells = {(c.name, t, s): Cell(c.name, t, s) for c in contenders for t, s in variants}

    def operations_for(contender: Contender, threads: int, shared: bool) -> list[Operation]:
        return [
            contender.operation(slot="shared" if shared else f"t{i}", thread_index=i)
            for i in range(threads)
        ]

    try:
        prepared = {
            (c.name, t, s): operations_for(c, t, s) for c in contenders for t, s in variants
        }
        # Warm up: connections opened, statements prepared, code paths hot.
        for contender in contenders:
            for threads, shared in variants:
                run_slice(
                    cells[(contender.name, threads, shared)],
                    prepared[(contender.name, threads, shared)],
                    seconds=args.warmup,
                    ops_per_thread=None,
                    record=False,
                )
        slice_seconds = args.seconds / args.rounds if args.seconds else None
        slice_ops = max(1, args.ops // args.rounds) if args.ops else None
        for round_number in range(args.rounds):
            # Contenders take turns, starting one further each round.
            shift = round_number % len(contenders)
            order = contenders[shift:] + contenders[:shift]
            for threads, shared in variants:
                for contender in order:
                    key = (contender.name, threads, shared)
                    run_slice(
                        cells[key], prepared[key], seconds=slice_seconds, ops_per_thread=slice_ops
                    )
            print(
                f"bench: round {round_number + 1}/{args.rounds} done "
                f"({time.monotonic() - began:.0f} s)",
                file=sys.stderr,
            )
        if args.profile:
            target = next((c for c in contenders if c.name == args.profile), None)
            if target is None:
                raise SystemExit(f"bench: --profile {args.profile}: no such contender in this run")
            profile(target)
    finally:
        for contender in contenders:
            try:
                contender.close()
            except Exception as error:  # a close failing must not hide the results
                print(f"bench: closing {contender.name} failed: {error}", file=sys.stderr)

    rows = [cell.summary() for cell in cells.values()]
    by_key = {(r["contender"], r["threads"], r["shared_key"]): r for r in rows}
    descriptions = {c.name: c.description for c in contenders}
    for row in rows:
        floor = by_key.get((FLOOR, row["threads"], row["shared_key"]))
        row["description"] = descriptions[row["contender"]]
        row["p50_vs_floor"] = row["p50_ms"] / floor["p50_ms"] if floor and floor["p50_ms"] else None
        row["ops_vs_floor"] = (
            row["ops_per_s"] / floor["ops_per_s"] if floor and floor["ops_per_s"] else None
        )

    print_table(rows, variants, [c.name for c in contenders])
    goals, headline = judge(by_key, args.thread_counts)
    for goal in goals:
        print(goal["text"])
    data = {
        "benchmark": "leases",
        "settings": {
            "seconds_per_cell": args.seconds,
            "ops_per_thread_per_cell": args.ops,
            "rounds": args.rounds,
            "warmup_s_per_cell": args.warmup,
            "threads": args.thread_counts,
            "contention": args.contention,
            "quick": args.quick,
            "lease_ttl": LEASE_TTL,
            "etcd_endpoints": env["MIGRATOR_ETCD_ENDPOINTS"],
        },
        "machine_before": load_before,
        "machine_after": support.machine(),
        "duration_s": time.monotonic() - began,
        "rows": rows,
        "goals": goals,
        "headline": headline,
    }
    support.publish("leases", data)
    return 0 if all(r["errors"] == 0 for r in rows) else 1


def print_table(
    rows: list[dict[str, Any]], variants: list[tuple[int, bool]], order: list[str]
) -> None:
    header = (
        f"{'implementation':<13} {'threads':>9} {'p50 ms':>8} {'p99 ms':>8} {'ops/s':>8} "
        f"{'p50/floor':>9} {'ops/floor':>9} {'cpu ms/op':>9} {'ops':>7} {'busy':>6} {'err':>4}"
    )
    print(header)
    print("-" * len(header))
    index = {(r["contender"], r["threads"], r["shared_key"]): r for r in rows}
    for threads, shared in variants:
        for name in order:
            r = index[(name, threads, shared)]
            label = f"{threads}" + (" (1 key)" if shared else "")
            print(
                f"{name:<13} {label:>9} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
                f"{r['ops_per_s']:>8.0f} {_ratio(r['p50_vs_floor']):>9} "
                f"{_ratio(r['ops_vs_floor']):>9} {r['client_cpu_ms_per_op']:>9.3f} "
                f"{r['operations']:>7} {r['busy']:>6} "
                f"{r['errors']:>4}"
            )
        print()


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def judge(
    by_key: dict[tuple[str, int, bool], dict[str, Any]], thread_counts: list[int]
) -> tuple[list[dict[str, Any]], str]:
    """The two goals, judged as measured, and the headline."""
    goals: list[dict[str, Any]] = []
    parts: list[str] = []
    single = min(thread_counts)
    many = max(thread_counts)
    few = f"{single} thread" + ("s" if single > 1 else "")
    ours_single = by_key.get((OURS, single, False))
    floor_single = by_key.get((FLOOR, single, False))
    if ours_single and floor_single and floor_single["p50_ms"]:
        ratio = ours_single["p50_ms"] / floor_single["p50_ms"]
        met = ratio <= GOAL_LATENCY
        goals.append(
            {
                "goal": f"ours p50 <= {GOAL_LATENCY} x raw floor ({few})",
                "value": ratio,
                "met": met,
                "text": f"goal: ours p50 within {GOAL_LATENCY} x raw etcd floor ({few}): "
                f"{ratio:.2f} x -> {'met' if met else 'MISSED'}",
            }
        )
        parts.append(f"{ratio:.2f} x raw etcd floor (p50, {few})")
    ours_many = by_key.get((OURS, many, False))
    lock_many = by_key.get((ETCD3_LOCK, many, False))
    if ours_many and lock_many and lock_many["ops_per_s"]:
        ratio = ours_many["ops_per_s"] / lock_many["ops_per_s"]
        met = ratio >= GOAL_THROUGHPUT
        # The same ratio round by round (side by side within seconds): its spread shows how
        # much of the difference is the shared machine's noise.
        per_round = sorted(
            a / b
            for a, b in zip(ours_many["round_ops_per_s"], lock_many["round_ops_per_s"], strict=True)
            if b
        )
        spread = (
            f" (per round: median {statistics.median(per_round):.2f}, "
            f"{per_round[0]:.2f}..{per_round[-1]:.2f})"
            if per_round
            else ""
        )
        goals.append(
            {
                "goal": f"ours ops/s >= {GOAL_THROUGHPUT} x python-etcd3 Lock ({many} threads)",
                "value": ratio,
                "per_round": per_round,
                "met": met,
                "text": f"goal: ours throughput at least {GOAL_THROUGHPUT} x python-etcd3 Lock "
                f"({many} threads): {ratio:.2f} x{spread} -> {'met' if met else 'MISSED'}",
            }
        )
        parts.append(f"{ratio:.2f} x python-etcd3 Lock throughput ({many} threads)")
    return goals, "; ".join(parts) or "no headline: ours, raw-txn or etcd3-lock not measured"


if __name__ == "__main__":
    sys.exit(main())
