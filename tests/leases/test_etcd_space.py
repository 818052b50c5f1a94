"""etcd's space under a long migration: bounded with auto-compaction, a typed outage without.

Every hold and release writes a revision into etcd's history (about 200 bytes each,
``bench/etcd_growth.py``); etcd keeps the history until it is compacted. Against a private
etcd with a small ``--quota-backend-bytes``:

- with auto-compaction (periodic, 1 s) the lease cycles that fill the quota without it
  leave the database at a fraction of it;
- without, the same cycles end in etcd's NOSPACE alarm: every lease write then fails with
  :class:`~leases.EtcdNoSpace` (an :class:`~leases.EtcdUnavailable`), while reads, releases
  and keep-alives go on; :func:`leases.recover_space` (compact, defragment, disarm) brings
  the writes back.

The default quota is 4 MiB (about 10,000 cycles, under a minute); ``--long`` runs 16 MiB.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from devtools.servers import EtcdCluster
from leases import (
    EtcdClient,
    EtcdNoSpace,
    EtcdUnavailable,
    HolderInfo,
    Session,
    recover_space,
    space_report,
    try_acquire,
)
from leases.hold import MAX_FIELD_CHARS, MAX_HOLDER_BYTES

MIB = 1024 * 1024
QUOTAS = [
    pytest.param(4 * MIB, id="4MiB"),
    pytest.param(16 * MIB, marks=pytest.mark.slow, id="16MiB-long"),
]
#: A worker's hold: the actor and a Dramatiq message id, as the enqueuer writes it.
HOLDER = HolderInfo(
    actor="enqueue_next_migration", message_id="2f1c9a8e-9c1e-4e0b-8d7a-0f3b5b2a1c9d"
)


@dataclass
class Cycles:
    """What :func:`lease_cycles` did: cycles completed, the error that stopped them, the
    largest database size sampled while they ran."""

    done: int = 0
    error: BaseException | None = None
    max_db_size: int = 0
    samples: list[tuple[int, int]] = field(default_factory=list)  # (cycles, db bytes)
    lock: threading.Lock = field(default_factory=threading.Lock)


def lease_cycles(
    session: Session,
    prefix: str,
    *,
    count: int | None,
    threads: int = 8,
    sample_every: float = 0.5,
    until_db_size: int | None = None,
) -> Cycles:
    """Take and release keys under ``prefix`` (one create and one delete each) from
    ``threads`` threads until ``count`` cycles are done or etcd refuses one (``count``
    None: until it refuses), or the database has grown to ``until_db_size`` bytes. Samples
    the database size meanwhile."""
    result = Cycles()
    stop = threading.Event()
    started = 0

    def cycle_loop(index: int) -> None:
        nonlocal started
        n = 0
        while not stop.is_set():
            with result.lock:
                if count is not None and started >= count:
                    return
                started += 1
            try:
                hold = try_acquire(session, f"{prefix}/{index}-{n}", holder=HOLDER).hold
                assert hold is not None
                hold.release()
            except EtcdUnavailable as error:
                with result.lock:
                    result.error = result.error or error
                stop.set()
                return
            n += 1
            with result.lock:
                result.done += 1

    workers = [threading.Thread(target=cycle_loop, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    while any(w.is_alive() for w in workers):
        size = session.client.status().db_size
        result.max_db_size = max(result.max_db_size, size)
        result.samples.append((result.done, size))
        if until_db_size is not None and size >= until_db_size:
            stop.set()
        time.sleep(sample_every)
    for worker in workers:
        worker.join()
    result.max_db_size = max(result.max_db_size, session.client.status().db_size)
    return result


def _client(cluster: EtcdCluster) -> EtcdClient:
    host, port = cluster.endpoints[0].rsplit(":", 1)
    return EtcdClient([(host, int(port))], timeout=5)


def _private_etcd(data_root: Path, quota: int, *, compaction: bool) -> EtcdCluster:
    """A one-member etcd with a ``quota`` and, when asked, auto-compaction."""
    args = [f"--quota-backend-bytes={quota}"]
    if compaction:
        # Periodic with a retention under an hour compacts every retention period; the
        # local stack's revision mode would only look every 5 minutes.
        args += ["--auto-compaction-mode=periodic", "--auto-compaction-retention=1s"]
    return EtcdCluster(members=1, data_root=data_root, extra_args=args)


def test_a_holder_value_stays_small() -> None:
    assert len(HOLDER.to_json()) <= 200
    assert HolderInfo.from_json(HOLDER.to_json()) == HOLDER  # every field, as written
    huge = HolderInfo(host="h" * 5000, actor="\x00" * 5000, message_id="é" * 5000)
    value = huge.to_json()
    assert len(value) <= MAX_HOLDER_BYTES
    assert HolderInfo.from_json(value).host == "h" * MAX_FIELD_CHARS


@pytest.mark.parametrize("quota", QUOTAS)
def test_with_auto_compaction_the_database_stays_bounded(quota: int, tmp_path: Path) -> None:
    with (
        _private_etcd(tmp_path, quota, compaction=True) as cluster,
        _client(cluster) as client,
        Session(client, ttl=10) as session,
    ):
        first = client.status()
        # About 400 bytes of history per cycle (two revisions): this many cycles write
        # 1.5 times the quota, which without compaction ends in NOSPACE (the test below).
        count = int(1.5 * quota / 400)
        cycles = lease_cycles(session, "/space/bounded", count=count)
        last = client.status()
    revisions = last.revision - first.revision
    print(
        f"\n{cycles.done} cycles, {revisions} revisions, quota {quota} B: database at most"
        f" {cycles.max_db_size} B ({cycles.max_db_size / quota:.2f} of the quota), at the"
        f" end {last.db_size} B, {last.db_size_in_use} B in use"
    )
    assert cycles.error is None, cycles.error
    assert cycles.done == count
    # Every cycle wrote its history: two key changes, in two revisions, or in fewer when
    # the client sent the threads' transactions nested in one (leases._batch; 8 threads).
    assert revisions >= 2 * count / 8
    assert cycles.max_db_size < quota / 2
    assert 0 < last.db_size_in_use <= last.db_size  # etcd 3.4 reports it (leases._wire)


@pytest.mark.parametrize("quota", QUOTAS)
def test_without_compaction_nospace_is_an_outage_until_recovered(
    quota: int, tmp_path: Path
) -> None:
    with (
        _private_etcd(tmp_path, quota, compaction=False) as cluster,
        _client(cluster) as client,
        Session(client, ttl=10) as session,
    ):
        before = try_acquire(session, "/space/held-before", holder=HOLDER).hold
        assert before is not None
        cycles = lease_cycles(session, "/space/filler", count=None)
        print(
            f"\nNOSPACE after {cycles.done} cycles ({quota / max(cycles.done, 1):.0f} B of"
            f" quota per cycle): {cycles.error}"
        )
        # The writes fail, typed: an outage like any other, with its own name.
        assert isinstance(cycles.error, EtcdNoSpace), cycles.error
        assert space_report(client).nospace
        # The creates that crossed the quota were applied and answered NOSPACE: each was
        # deleted, none left on the live session (it would stay taken for its whole life).
        left = [kv.key for kv in client.get_prefix("/space/filler/")]
        assert left == [], f"keys created but answered NOSPACE were left: {left}"
        with pytest.raises(EtcdNoSpace):
            try_acquire(session, "/space/after", holder=HOLDER)
        with pytest.raises(EtcdNoSpace):
            client.grant(10)  # a new session cannot start either
        # What does not add history still works: reads, keep-alives, releases.
        time.sleep(session.ttl / 3 + 1)
        assert not session.lost, session.lost_reason
        assert before.is_current()
        assert before.release()

        done = recover_space(client)
        print(
            f"recovered: compacted at {done.revision}, db"
            f" {done.before.members[0].status.db_size} -> {done.after.members[0].status.db_size}"
            f" B, disarmed {done.disarmed}"
        )
        assert done.disarmed == 1
        assert not done.after.nospace
        assert done.after.members[0].status.db_size < quota / 4
        after = try_acquire(session, "/space/after", holder=HOLDER).hold
        assert after is not None
        assert after.release()
        assert not session.lost
