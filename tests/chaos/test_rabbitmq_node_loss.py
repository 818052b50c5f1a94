"""RabbitMQ loses the node holding the queue's leader mid-migration; nothing is lost.

A private stack (``deploy/local/stack up --rabbitmq-nodes 3`` on ports of its own, with its
own PostgreSQL and etcd) runs a three-node RabbitMQ cluster; the migration's queues are
quorum queues (``MIGRATOR_QUEUE_TYPE=quorum``, as ``stack env`` exports for a cluster) and
every process gets all three node URLs (``MIGRATOR_BROKER_URL``). Once a third of the
repositories are done, the node that leads the migration's queue is SIGKILLed and stays
down. Then:

- every repository ends as its path says (the simulator's special paths: native, missing,
  fail-once, fail-always; no random failures);
- no trigger lost: every ``enqueue_triggered`` message id has its enqueuer run (the chaos
  run's accounting, ``tests.invariants.account_triggers``);
- no notification lost: every notification the API accepted (it answers 202 only once
  RabbitMQ confirmed it) was handled by a worker, and the simulator gave none up;
- no dead letter, no stale token accepted, capacity never exceeded.

The three nodes start in about a minute here and the migration takes another: ``--long``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from devtools.launcher import LocalMigration, queue_depth
from migration.store import Store
from tests.conftest import STACK_SCRIPT, parse_stack_env
from tests.fixtures import seed_spread, temporary_database, wait_until
from tests.invariants import (
    accepted_events,
    account_triggers,
    all_terminal,
    replay_in_flight,
    stale_accepted_writes,
    wrong_end_states,
)

pytestmark = pytest.mark.slow

COUNT = 150
CAPACITY = 10
WORKERS = 3
SCHEDULERS = 2
SEED = 4242


def _free_run(count: int) -> int:
    """A port P with P..P+count-1 all free on 127.0.0.1 (below 32768, so that RabbitMQ's
    CLI dist ports, 10000 above the nodes' dist ports, stay valid)."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 22000 - count)
        sockets = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError("no run of free ports")


class ClusterStack:
    """A private ``deploy/local/stack`` with a three-node RabbitMQ cluster."""

    def __init__(self, root: Path) -> None:
        base = _free_run(10)
        self.stack_env = {
            "STACK_STATE_DIR": str(root / "stack"),
            "STACK_PG_PORT": str(base),
            "STACK_ETCD_CLIENT_PORT": str(base + 1),
            "STACK_ETCD_PEER_PORT": str(base + 2),
            "STACK_RABBITMQ_PORT": str(base + 3),  # nodes: +3, +4, +5
            "STACK_RABBITMQ_DIST_PORT": str(base + 6),  # nodes: +6, +7, +8
        }
        self.env: dict[str, str] = {}

    def run(self, *args: str, timeout: float = 180) -> str:
        done = subprocess.run(
            [str(STACK_SCRIPT), *args],
            env={**os.environ, **self.stack_env},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"stack {' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}"
            )
        return done.stdout

    def node_names(self) -> list[str]:
        base = f"migrator-{self.stack_env['STACK_RABBITMQ_PORT']}"
        return [f"{base}@localhost", f"{base}-1@localhost", f"{base}-2@localhost"]

    def leader_of(self, queue: str, *, ask: int) -> str | None:
        """The node leading quorum queue ``queue``, asked of node ``ask``."""
        out = self.run(
            "rabbitmqctl", "--node", str(ask), "list_queues", "name", "type", "leader",
            "--formatter", "json", "--quiet",
        )  # fmt: skip
        for row in json.loads(out[out.index("[") :]):
            if row["name"] == queue:
                assert row["type"] == "quorum", row
                return str(row["leader"])
        return None


@pytest.fixture(scope="module")
def cluster_stack(stack: dict[str, str]) -> Iterator[ClusterStack]:
    """Depends on ``stack`` only so that the system packages are installed first."""
    root = Path(tempfile.mkdtemp(prefix="rmq-ha-"))
    cluster = ClusterStack(root)
    try:
        started = time.monotonic()
        cluster.run("up", "--rabbitmq-nodes", "3", timeout=900)
        print(f"\nthree-node stack up in {time.monotonic() - started:.1f} s")
        cluster.env = parse_stack_env(cluster.run("env"))
        yield cluster
    finally:
        try:
            cluster.run("down", timeout=300)
        finally:
            shutil.rmtree(root, ignore_errors=True)


def _lines(run: LocalMigration) -> list[dict[str, Any]]:
    names = ["api", *(f"worker-{i}" for i in range(WORKERS))]
    names += [f"scheduler-{i}" for i in range(SCHEDULERS)]
    return [line for name in names for line in run.log_events(name)]


def _terminal_count(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM container_repositories"
            " WHERE migration_state IN ('import_done', 'import_skipped')"
        ).fetchone()
    return int(row[0]) if row else 0


@pytest.mark.timeout(1800)
def test_losing_the_queue_leader_node_loses_nothing(
    cluster_stack: ClusterStack, tmp_path: Path
) -> None:
    env = cluster_stack.env
    assert env["MIGRATOR_QUEUE_TYPE"] == "quorum"
    assert len(env["MIGRATOR_BROKER_URL"].split(",")) == 3
    with (
        temporary_database(env["MIGRATOR_DATABASE_URL"], prefix="ha") as url,
        Store(url, max_size=2) as store,
    ):
        seed_spread(store, COUNT, seed=SEED)
        store.update_settings(
            capacity=CAPACITY, enqueue_interval=1, guard_interval=2, max_step_duration=8
        )
        run = LocalMigration(
            env={**env, "MIGRATOR_DATABASE_URL": url, "MIGRATOR_LOG_LEVEL": "info"},
            log_dir=tmp_path / "logs",
            workers=WORKERS,
            threads=4,
            schedulers=SCHEDULERS,
            lease_ttl=3,
            simulator_args=[
                "--pre-import-seconds", "0.3", "1.0", "--import-seconds", "0.3", "1.0",
                "--seed", str(SEED), "--start-latency", "0.1",
            ],
        )  # fmt: skip
        queue = run.env["MIGRATOR_QUEUE_NAME"]
        run.start(timeout=180)
        try:
            started = time.monotonic()
            wait_until(
                lambda: _terminal_count(url) >= COUNT // 3,
                timeout=300,
                interval=0.5,
                what="a third of the repositories terminal",
            )
            leader = cluster_stack.leader_of(queue, ask=0)
            assert leader is not None, f"queue {queue} not declared"
            victim = cluster_stack.node_names().index(leader)
            before_kill = _terminal_count(url)
            killed_at = datetime.now().astimezone()
            kill_t = time.monotonic()
            cluster_stack.run("kill-rabbitmq-node", str(victim))
            survivor = (victim + 1) % 3
            new_leader = wait_until(
                lambda: (lead := cluster_stack.leader_of(queue, ask=survivor)) != leader and lead,
                timeout=60,
                interval=1,
                what="a new leader for the queue",
            )
            wait_until(
                lambda: all_terminal(store),
                timeout=600,
                interval=1,
                what=f"{COUNT} repositories terminal after the node loss",
            )
            finished_t = time.monotonic()

            def drained() -> bool:
                account = account_triggers(_lines(run))
                depth = queue_depth(run.env, queue) + queue_depth(run.env, f"{queue}.DQ")
                return not account.never_ran and depth == 0

            with contextlib.suppress(AssertionError):  # reported below with what never ran
                wait_until(drained, timeout=60, interval=1, what="queue drained")
            report = run.report()
            dead_letters = queue_depth(run.env, f"{queue}.XQ")
        finally:
            run.stop(timeout=30)
            with contextlib.suppress(Exception):
                run.delete_queues()
        lines = _lines(run)

        events = accepted_events(url)
        after_kill = [e.at for e in events if e.at >= killed_at]
        first_after = (min(after_kill) - killed_at).total_seconds() if after_kill else None
        replay = replay_in_flight(events, capacity=CAPACITY)
        triggers = account_triggers(lines)
        # A repository can be told the same status more than once (pre_import_failed on
        # each retry): every acceptance needs its own handling.
        accepted = Counter(
            (line["container_repository_path"], line["registry_status"])
            for line in lines
            if line.get("event") == "notification_accepted"
        )
        # The worker's line names the status it was told ``notified_status``: its step's
        # fields may carry the registry's current status as ``registry_status``.
        handled = Counter(
            (line["container_repository_path"], line["notified_status"])
            for line in lines
            if line.get("event") == "registry_notification_handled"
        )
        unhandled = accepted - handled
        # Where each path kind ends, and what it is charged: the one table (END_BY_MARKER).
        wrong = wrong_end_states(url)
        first = "none" if first_after is None else f"{first_after:.2f} s"
        print(
            f"\nkilled {leader} (node {victim}) leading {queue} with {before_kill}/{COUNT}"
            f" terminal, {kill_t - started:.1f} s in; new leader {new_leader}; first accepted"
            f" step {first} after the kill; all terminal {finished_t - kill_t:.1f} s after it;"
            f" longest stall with capacity free {replay.longest_stall_s:.2f} s"
        )
        ran = triggers.triggered & triggers.ran
        print(
            f"triggers sent {len(triggers.triggered)}, ran {len(ran)}, never ran"
            f" {len(triggers.never_ran)}; notifications accepted {accepted.total()}, handled"
            f" {handled.total()}, accepted but not handled {unhandled.total()}; simulator"
            f" {report['notifications']}; dead letters"
            f" {dead_letters}"
        )
        assert wrong == [], wrong[:5]
        assert triggers.never_ran == set(), sorted(triggers.never_ran)[:5]
        assert unhandled.total() == 0, sorted(unhandled)[:5]
        assert accepted.total() == report["notifications"]["sent"]
        assert report["notifications"]["failed"] == 0
        assert report["notifications"]["refused"] == 0
        assert report["notifications"]["pending"] == 0
        assert dead_letters == 0
        assert stale_accepted_writes(url) == []
        assert replay.over_capacity == []
        assert report["overlapping_repositories"] == []

    # The killed node comes back with 'up' and rejoins the cluster.
    began = time.monotonic()
    cluster_stack.run("up", "--rabbitmq-nodes", "3", timeout=600)
    print(f"node {victim} back in the cluster in {time.monotonic() - began:.1f} s")
    assert "rabbitmq  up" in cluster_stack.run("status")
