"""The local stack really serves, `up` is idempotent, and EtcdCluster survives a leader loss."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import etcd3
import pika
import psycopg
import pytest

from devtools.servers import EtcdCluster
from devtools.stack_env import parse_stack_env
from tests.conftest import REPO_ROOT, STACK_SCRIPT


def _state_dir() -> Path:
    return Path(os.environ.get("STACK_STATE_DIR", REPO_ROOT / ".state" / "stack"))


def _stack_pids() -> dict[str, str]:
    """The pids in the stack's pid files, by service (the files 'down' relies on)."""
    state = _state_dir()
    files = {"postgres": state / "pg" / "data" / "postmaster.pid"}
    files |= {f"etcd {p.stem}": p for p in sorted((state / "etcd").glob("m*.pid"))}
    files["rabbitmq"] = state / "rabbitmq" / "rabbitmq.pid"
    return {name: path.read_text().splitlines()[0].strip() for name, path in files.items()}


def test_parse_stack_env_reads_exports_only() -> None:
    text = (
        "export MIGRATOR_DATABASE_URL=postgresql://postgres@127.0.0.1:1/m\n"
        "export MIGRATOR_BROKER_URL='amqp://g:g@127.0.0.1:2/%2F?heartbeat=30'\n"
        "stack: something else\n"
    )
    assert parse_stack_env(text) == {
        "MIGRATOR_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/m",
        "MIGRATOR_BROKER_URL": "amqp://g:g@127.0.0.1:2/%2F?heartbeat=30",
    }


def test_stack_env_is_exported(stack: dict[str, str]) -> None:
    for name in ("MIGRATOR_DATABASE_URL", "MIGRATOR_ETCD_ENDPOINTS", "MIGRATOR_BROKER_URL"):
        assert stack[name]
        assert os.environ[name] == stack[name]


def test_postgres_accepts_a_connection(stack: dict[str, str]) -> None:
    with psycopg.connect(stack["MIGRATOR_DATABASE_URL"], connect_timeout=10) as conn:
        row = conn.execute("SELECT 1, current_database()").fetchone()
    assert row == (1, "migrator")


def test_etcd_puts_and_gets(stack: dict[str, str]) -> None:
    host, port = stack["MIGRATOR_ETCD_ENDPOINTS"].split(",")[0].rsplit(":", 1)
    client = etcd3.client(host=host, port=int(port), timeout=10)
    prefix = f"/test-{uuid.uuid4().hex[:8]}"
    try:
        value = uuid.uuid4().hex
        client.put(f"{prefix}/key", value)
        stored, _meta = client.get(f"{prefix}/key")
        assert stored == value.encode()
    finally:
        client.delete_prefix(prefix)
        client.close()


def test_rabbitmq_round_trips_a_message(stack: dict[str, str]) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(stack["MIGRATOR_BROKER_URL"]))
    try:
        channel = connection.channel()
        queue = f"test-stack-{uuid.uuid4().hex[:8]}"
        channel.queue_declare(queue=queue, exclusive=True, auto_delete=True)
        body = uuid.uuid4().bytes
        channel.basic_publish(exchange="", routing_key=queue, body=body)
        received = None
        for _ in range(50):
            _method, _props, received = channel.basic_get(queue=queue, auto_ack=True)
            if received is not None:
                break
            connection.sleep(0.1)
        assert received == body
    finally:
        connection.close()
    assert connection.is_closed


def test_up_again_restarts_nothing(stack: dict[str, str]) -> None:
    before = _stack_pids()
    again = subprocess.run(
        [str(STACK_SCRIPT), "up"], capture_output=True, text=True, timeout=300, check=False
    )
    assert again.returncode == 0, again.stderr
    assert "started in" not in again.stdout, again.stdout
    assert again.stdout.count("already running") >= 3, again.stdout
    assert _stack_pids() == before
    status = subprocess.run(
        [str(STACK_SCRIPT), "status"], capture_output=True, text=True, timeout=60, check=False
    )
    assert status.returncode == 0, status.stdout


def _reserved(text: str) -> set[int]:
    ports: set[int] = set()
    for item in filter(None, text.strip().split(",")):
        low, _, high = item.partition("-")
        ports.update(range(int(low), int(high or low) + 1))
    return ports


def test_up_reserves_the_ports_in_the_ephemeral_range(stack: dict[str, str]) -> None:
    """A client socket given a server's port as its source port keeps the server from
    binding it (RabbitMQ's 56720 failed so at 'up'): as root, 'up' reserves them. The
    reservation outlives the stack, so the test takes the ports out of the list first: what
    is reserved afterwards is what this 'up' did."""
    reserved_file = Path("/proc/sys/net/ipv4/ip_local_reserved_ports")
    if os.geteuid() != 0 or not os.access(reserved_file, os.W_OK):
        pytest.skip("'up' reserves ports only as root")
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    servers = {
        urlsplit(stack[name]).port or 0 for name in ("MIGRATOR_DATABASE_URL", "MIGRATOR_BROKER_URL")
    }
    in_range = {port for port in servers if low <= port <= high}
    assert in_range, f"no server port in {low}-{high}: nothing to check"
    original = reserved_file.read_text()
    others = sorted(_reserved(original) - in_range)
    try:
        reserved_file.write_text(",".join(map(str, others)) + "\n")
        assert not in_range & _reserved(reserved_file.read_text())
        up = subprocess.run(
            [str(STACK_SCRIPT), "up"], capture_output=True, text=True, timeout=300, check=False
        )
        assert up.returncode == 0, up.stderr
        assert in_range <= _reserved(reserved_file.read_text()), up.stdout
        assert "reserved ports" in up.stdout, up.stdout
    finally:
        reserved_file.write_text(original)


@pytest.mark.timeout(120)
def test_etcd_cluster_elects_a_new_leader_after_the_leader_is_killed(tmp_path: Path) -> None:
    with EtcdCluster(members=3, data_root=tmp_path) as cluster:
        assert len(set(cluster.endpoints)) == 3
        old_leader = cluster.leader_index()
        cluster.kill(old_leader)
        assert not cluster.is_running(old_leader)

        new_leader = cluster.leader_index(timeout=20)
        assert new_leader != old_leader

        # The surviving majority still serves writes.
        host, port = cluster.endpoints[new_leader].split(":")
        client = etcd3.client(host=host, port=int(port), timeout=10)
        try:
            client.put("/after-failover", "yes")
            assert client.get("/after-failover")[0] == b"yes"
        finally:
            client.close()

        cluster.restart(old_leader)
        assert cluster.is_healthy(old_leader)
    assert cluster.running_indices() == []
