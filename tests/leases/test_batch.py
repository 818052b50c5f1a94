"""EtcdClient's creates and deletes from many threads go nested in shared transactions
(leases._batch), against the real etcd: each caller still gets its own answer, its token is
its key's create revision, and of two creates of one key exactly one wins."""

from __future__ import annotations

import threading
from collections.abc import Callable

from leases import EtcdClient

THREADS = 16


def run_threads(work: Callable[[int], None], count: int = THREADS) -> None:
    threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)


def test_concurrent_creates_and_deletes_each_get_their_own_answer(
    client: EtcdClient, prefix: str
) -> None:
    problems: list[str] = []
    lease_id, _ = client.grant(30)

    def work(index: int) -> None:
        for n in range(40):
            key = f"{prefix}/{index}/{n}"
            result = client.create(key, f"v{index}-{n}".encode(), lease_id=lease_id)
            current = client.get(key)
            if not result.created or current is None or result.current is None:
                problems.append(f"{key}: not created")
                continue
            if current.create_revision != result.current.create_revision:
                problems.append(f"{key}: token {result.current.create_revision}, key's"
                                f" {current.create_revision}")  # fmt: skip
            if current.value != f"v{index}-{n}".encode():
                problems.append(f"{key}: value {current.value!r}")
            if not client.delete_if_created_at(key, result.current.create_revision):
                problems.append(f"{key}: delete refused")
            if client.get(key) is not None:
                problems.append(f"{key}: still there")

    before = client._batcher.batches, client._batcher.transactions
    run_threads(work)
    client.revoke(lease_id)
    batches = client._batcher.batches - before[0]
    transactions = client._batcher.transactions - before[1]
    assert problems == []
    assert transactions == THREADS * 40 * 2
    assert batches < transactions  # some went together (16 threads on one client)


def test_of_two_creates_of_one_key_exactly_one_wins(client: EtcdClient, prefix: str) -> None:
    winners: dict[int, list[int]] = {}
    lock = threading.Lock()
    start = threading.Barrier(2)

    def work(index: int) -> None:
        for n in range(150):
            start.wait(10)
            result = client.create(f"{prefix}/{n}", f"{index}".encode())
            if result.created:
                with lock:
                    winners.setdefault(n, []).append(index)
            else:  # the loser reads the winner: the key as it stands
                assert result.current is not None

    run_threads(work, count=2)
    assert sorted(winners) == list(range(150))
    assert all(len(w) == 1 for w in winners.values()), {
        n: w for n, w in winners.items() if len(w) > 1
    }
    assert client.delete_prefix(prefix) == 150
