"""Would batching the lease transactions of a process save etcd's CPU? Side by side in one run.

Every lease hold is two etcd transactions (a create on the session's lease, a delete by
create revision), one gRPC call each. etcd (3.3+) also takes transactions *nested* in one:
an outer ``Txn`` with no compare whose success branch is the callers' transactions, each
with its own compare, answered each on its own. A process could send whatever its threads
have queued while the previous call is under way as one such call (a group commit): no
wait when it is idle, one raft entry and one gRPC call for many when it is busy.

Contenders, the service's own client (``leases.EtcdClient``, requests encoded by
``leases._wire``) both, taking turns within each round so the machine's noise hits both alike:

- ``single``: each thread sends its create, then its delete, as a call of its own (the
  client's unbatched path, as before ``leases._batch``);
- ``nested``: ``EtcdClient.create`` and ``delete_if_created_at``, whose transactions go
  through ``leases._batch.TxnBatcher``: what the threads queue while a call is under way
  goes as one outer transaction.

Each thread creates and deletes keys of its own (the cost, not contention). Measured: etcd's
CPU per operation (its process's utime + stime), this process's CPU per operation, and the
mean batch.

Usage::

    uv run python bench/etcd_batch.py                  # about a minute
    uv run python bench/etcd_batch.py --quick          # seconds
    uv run python bench/etcd_batch.py --threads 2,16 --operations 100

Prints a table, writes bench/results/etcd_batch.json, and the headline as its last line.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

from bench import _common, support
from leases import EtcdClient, _wire

LEASE_TTL = 60
VALUE = b"x" * 80  # about a HolderInfo's JSON

#: (client, key, lease id) -> the create's token; (client, key, token) -> deleted.
Create = Callable[[EtcdClient, str, int], int | None]
Delete = Callable[[EtcdClient, str, int], bool]


def single_create(client: EtcdClient, key: str, lease_id: int) -> int | None:
    reply = client._send_txn("create", _wire.create_txn(key.encode(), VALUE, lease_id))
    return reply.revision if reply.succeeded else None


def single_delete(client: EtcdClient, key: str, token: int) -> bool:
    return client._send_txn("delete", _wire.delete_if_created_at_txn(key.encode(), token)).succeeded


def nested_create(client: EtcdClient, key: str, lease_id: int) -> int | None:
    result = client.create(key, VALUE, lease_id=lease_id)
    return result.revision if result.created else None


def nested_delete(client: EtcdClient, key: str, token: int) -> bool:
    return client.delete_if_created_at(key, token)


CONTENDERS: dict[str, tuple[Create, Delete]] = {
    "single": (single_create, single_delete),
    "nested": (nested_create, nested_delete),
}


def run_threads(
    client: EtcdClient, name: str, *, threads: int, operations: int, lease_id: int, tag: str
) -> float:
    """Each thread creates and deletes ``operations`` keys of its own; the wall seconds."""
    create, delete = CONTENDERS[name]

    def work(index: int) -> None:
        for n in range(operations):
            key = f"/bench/etcd-batch/{tag}/{index}/{n}"
            token = create(client, key, lease_id)
            assert token is not None, key
            assert delete(client, key, token), key

    started = time.perf_counter()
    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="Example: uv run python bench/etcd_batch.py"
    )
    parser.add_argument("--threads", default="2,4,8,16", help="thread counts (default 2,4,8,16)")
    parser.add_argument(
        "--operations",
        type=int,
        default=150,
        help="creates (and deletes) per thread per round (default 150)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds per thread count")
    parser.add_argument(
        "--quick", action="store_true", help="2 and 8 threads, 40 operations, 1 round (seconds)"
    )
    args = parser.parse_args()  # fmt: skip
    if args.quick:
        args.threads, args.operations, args.rounds = "2,8", 40, 1
    thread_counts = [int(t) for t in args.threads.split(",") if t.strip()]
    env = support.ensure_stack(["MIGRATOR_ETCD_ENDPOINTS"], with_redis=False)
    client = EtcdClient(support.etcd_endpoints(env["MIGRATOR_ETCD_ENDPOINTS"]), timeout=10)
    results: dict[str, dict[int, dict[str, list[float]]]] = {"single": {}, "nested": {}}
    try:
        for threads in thread_counts:
            for round_index in range(args.rounds):
                for name in CONTENDERS:
                    lease_id, _ = client.grant(LEASE_TTL)  # a round takes seconds
                    batched = client._batcher.batches, client._batcher.transactions
                    servers = _common.server_ticks()
                    client_before = time.process_time()
                    seconds = run_threads(
                        client,
                        name,
                        threads=threads,
                        operations=args.operations,
                        lease_id=lease_id,
                        tag=f"{name}-{round_index}",
                    )
                    client_cpu = time.process_time() - client_before
                    etcd_cpu = _common.server_seconds_since(servers)["etcd"]
                    ops = threads * args.operations * 2
                    runs = results[name].setdefault(threads, {})
                    runs.setdefault("ops_per_s", []).append(ops / seconds)
                    runs.setdefault("etcd_us", []).append(etcd_cpu / ops * 1e6)
                    runs.setdefault("client_us", []).append(client_cpu / ops * 1e6)
                    if name == "nested":
                        batches = client._batcher.batches - batched[0]
                        transactions = client._batcher.transactions - batched[1]
                        runs.setdefault("batch", []).append(transactions / max(batches, 1))
                    client.revoke(lease_id)
    finally:
        client.close()

    rows = []
    summary: dict[str, Any] = {}
    for threads in thread_counts:
        one = {k: statistics.median(v) for k, v in results["single"][threads].items()}
        many = {k: statistics.median(v) for k, v in results["nested"][threads].items()}
        summary[str(threads)] = {"single": one, "nested": many}
        for name, figures in (("single", one), ("nested", many)):
            rows.append([
                name, threads, f"{figures['ops_per_s']:.0f}", f"{figures['etcd_us']:.0f}",
                f"{figures['client_us']:.0f}", f"{figures.get('batch', 1.0):.1f}",
                f"{figures['etcd_us'] / one['etcd_us']:.2f}",
                f"{figures['client_us'] / one['client_us']:.2f}",
            ])  # fmt: skip
    print(_common.table(
        ["contender", "threads", "ops/s", "etcd us/op", "client us/op", "mean batch",
         "etcd / single", "client / single"], rows,
    ))  # fmt: skip
    ratios = [
        f"{s['nested']['etcd_us'] / s['single']['etcd_us']:.2f} at {t} threads"
        f" (batch {s['nested']['batch']:.1f})"
        for t, s in summary.items()
    ]
    headline = (
        f"{ratios[0]}: etcd's CPU per operation in nested batches over single transactions"
        + "".join(f"; {r}" for r in ratios[1:])
    )
    support.publish("etcd_batch", {
        "benchmark": "etcd_batch",
        "settings": {"threads": thread_counts, "operations": args.operations,
                     "rounds": args.rounds},
        "machine": support.machine(),
        "medians": summary,
        "runs": {name: {str(t): v for t, v in by.items()} for name, by in results.items()},
        "headline": headline,
    })  # fmt: skip


if __name__ == "__main__":
    main()
