"""Would batching the lease transactions of a process save etcd's CPU? Side by side in one run.

Every lease hold is two etcd transactions (a create on the session's lease, a delete by
create revision), one gRPC call each. etcd (3.3+) also takes transactions *nested* in one:
an outer ``Txn`` with no compare whose success branch is the callers' transactions, each
with its own compare, answered each on its own. A process could send whatever its threads
have queued while the previous call is under way as one such call (a group commit): no
wait when it is idle, one raft entry and one gRPC call for many when it is busy.

Contenders, taking turns within each round so the machine's noise hits both alike:

- ``single``: each thread sends its create, then its delete, as a call of its own;
- ``nested``: each thread queues them to one sender thread, which sends what is queued as
  one outer transaction and hands each caller its own answer.

Each thread creates and deletes keys of its own (the cost, not contention). Measured: etcd's
CPU per operation (its process's utime + stime), this process's CPU per operation, and the
mean batch. The two contenders encode with the same protobuf classes, so their client
figures compare; neither is the hand-encoded path the service uses (leases._wire).

Usage::

    uv run python bench/etcd_batch.py                  # about a minute
    uv run python bench/etcd_batch.py --quick          # seconds
    uv run python bench/etcd_batch.py --threads 2,16 --operations 100

Prints a table, writes bench/results/etcd_batch.json, and the headline as its last line.
"""

from __future__ import annotations

import argparse
import queue
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import etcd3
from etcd3.etcdrpc import rpc_pb2 as pb

from bench import _common, support

LEASE_TTL = 60
VALUE = b"x" * 80  # about a HolderInfo's JSON

Call = Callable[[Any], tuple[bool, int]]  # a TxnRequest -> (succeeded, header revision)


def create_request(key: bytes, lease_id: int) -> Any:
    """Put ``key`` on the lease if it does not exist (the service's create)."""
    return pb.TxnRequest(
        compare=[pb.Compare(key=key, result=pb.Compare.EQUAL, target=pb.Compare.CREATE,
                            create_revision=0)],
        success=[pb.RequestOp(request_put=pb.PutRequest(key=key, value=VALUE, lease=lease_id))],
        failure=[pb.RequestOp(request_range=pb.RangeRequest(key=key))],
    )  # fmt: skip


def delete_request(key: bytes, create_revision: int) -> Any:
    """Delete ``key`` while its create revision is the given one (the service's release)."""
    return pb.TxnRequest(
        compare=[pb.Compare(key=key, result=pb.Compare.EQUAL, target=pb.Compare.CREATE,
                            create_revision=create_revision)],
        success=[pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=key))],
    )  # fmt: skip


class NestedSender:
    """One thread that sends the queued transactions as one outer transaction.

    :param stub: etcd's KV stub.
    """

    def __init__(self, stub: Any) -> None:
        self.stub = stub
        self.batches: list[int] = []
        self._queue: queue.SimpleQueue[tuple[Any, list[Any], threading.Event] | None] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(target=self._send_loop, daemon=True)
        self._thread.start()

    def _send_loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)
                    break
                batch.append(item)
            self.batches.append(len(batch))
            outer = pb.TxnRequest(success=[pb.RequestOp(request_txn=r) for r, _, _ in batch])
            reply = self.stub.Txn(outer)
            for (_, box, done), op in zip(batch, reply.responses, strict=True):
                box.append((op.response_txn.succeeded, reply.header.revision))
                done.set()

    def call(self, request: Any) -> tuple[bool, int]:
        box: list[tuple[bool, int]] = []
        done = threading.Event()
        self._queue.put((request, box, done))
        done.wait()
        return box[0]

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)


def run_threads(call: Call, *, threads: int, operations: int, lease_id: int, tag: str) -> float:
    """Each thread creates and deletes ``operations`` keys of its own; the wall seconds."""

    def work(index: int) -> None:
        for n in range(operations):
            key = f"/bench/etcd-batch/{tag}/{index}/{n}".encode()
            created, revision = call(create_request(key, lease_id))
            assert created, key
            deleted, _ = call(delete_request(key, revision))
            assert deleted, key

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
    host, port = support.etcd_endpoints(env["MIGRATOR_ETCD_ENDPOINTS"])[0]
    client = etcd3.client(host=host, port=port)
    stub = client.kvstub
    lease = client.lease(LEASE_TTL)

    def single(request: Any) -> tuple[bool, int]:
        reply = stub.Txn(request)
        return reply.succeeded, reply.header.revision

    results: dict[str, dict[int, dict[str, list[float]]]] = {"single": {}, "nested": {}}
    try:
        for threads in thread_counts:
            for round_index in range(args.rounds):
                for name in ("single", "nested"):
                    lease.refresh()
                    sender = NestedSender(stub) if name == "nested" else None
                    call = sender.call if sender else single
                    servers = _common.server_ticks()
                    client_before = time.process_time()
                    seconds = run_threads(
                        call,
                        threads=threads,
                        operations=args.operations,
                        lease_id=lease.id,
                        tag=f"{name}-{round_index}",
                    )
                    client_cpu = time.process_time() - client_before
                    etcd_cpu = _common.server_seconds_since(servers)["etcd"]
                    ops = threads * args.operations * 2
                    runs = results[name].setdefault(threads, {})
                    runs.setdefault("ops_per_s", []).append(ops / seconds)
                    runs.setdefault("etcd_us", []).append(etcd_cpu / ops * 1e6)
                    runs.setdefault("client_us", []).append(client_cpu / ops * 1e6)
                    if sender is not None:
                        sender.close()
                        runs.setdefault("batch", []).append(statistics.fmean(sender.batches))
    finally:
        lease.revoke()
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
