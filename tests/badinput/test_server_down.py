"""A server down at start: the API and the scheduler wait for it, say so, and recover.

The process is pointed at a port where nothing listens (the shared stack is never
stopped); later a :class:`TcpProxy` opens that port and forwards it to the real server,
which is the server "coming back".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pika
import pytest

from devtools.servers import free_ports
from migration.store import Store
from tests.badinput.tcp_proxy import TcpProxy
from tests.fixtures import wait_until

SERVERS = ["postgresql", "etcd", "rabbitmq"]


def _with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


def _target(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


class Scenario:
    """One process with ``server`` behind a proxy port that is closed at first."""

    def __init__(
        self, *, server: str, stack: dict[str, str], database_url: str, log_path: Path
    ) -> None:
        self.server = server
        self.log_path = log_path
        port = free_ports(1)[0]
        run = uuid.uuid4().hex[:10]
        self.queue = f"serverdown_{run}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("MIGRATOR_")},
            **stack,
            "MIGRATOR_DATABASE_URL": database_url,
            "MIGRATOR_ETCD_PREFIX": f"/serverdown-{run}",
            "MIGRATOR_QUEUE_NAME": self.queue,
            "MIGRATOR_NOTIFICATION_SECRET": uuid.uuid4().hex,
            "MIGRATOR_PROMETHEUS": "0",
            "MIGRATOR_LEASE_TTL": "3",
            "PYTHONUNBUFFERED": "1",
        }
        if server == "postgresql":
            target = _target(database_url)
            self.env["MIGRATOR_DATABASE_URL"] = _with_port(database_url, port)
        elif server == "etcd":
            host, etcd_port = stack["MIGRATOR_ETCD_ENDPOINTS"].split(",")[0].rsplit(":", 1)
            target = (host, int(etcd_port))
            self.env["MIGRATOR_ETCD_ENDPOINTS"] = f"127.0.0.1:{port}"
        else:
            target = _target(stack["MIGRATOR_BROKER_URL"])
            self.env["MIGRATOR_BROKER_URL"] = _with_port(stack["MIGRATOR_BROKER_URL"], port)
        self.proxy = TcpProxy(port=port, target=target)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *command: str) -> None:
        script = Path(sys.executable).with_name("registry-migrator")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [str(script), *command],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.proxy.stop()
        self._delete_queues()

    def _delete_queues(self) -> None:
        connection = pika.BlockingConnection(pika.URLParameters(os.environ["MIGRATOR_BROKER_URL"]))
        channel = connection.channel()
        for name in (self.queue, f"{self.queue}.DQ", f"{self.queue}.XQ"):
            channel.queue_delete(name)
        connection.close()


@pytest.fixture
def scenario(
    request: pytest.FixtureRequest,
    stack: dict[str, str],
    database_url: str,
    store: Store,
    tmp_path: Path,
) -> Iterator[Callable[[str], Scenario]]:
    made: list[Scenario] = []

    def make(server: str) -> Scenario:
        made.append(
            Scenario(
                server=server, stack=stack, database_url=database_url, log_path=tmp_path / "log"
            )
        )
        return made[-1]

    yield make
    for one in made:
        one.stop()


def _get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=5)
    except httpx.HTTPError:
        return None


@pytest.mark.parametrize("server", SERVERS)
def test_the_api_waits_for_a_server_down_at_start(
    scenario: Callable[[str], Scenario], server: str
) -> None:
    down = scenario(server)
    port = free_ports(1)[0]
    base = f"http://127.0.0.1:{port}"
    down.start("api", "--port", str(port))
    healthy = wait_until(lambda: _get(f"{base}/healthz"), timeout=30, what="the API to serve")
    assert healthy.status_code == 200

    def unavailable_lines() -> list[dict[str, Any]]:
        return [
            line
            for line in down.lines()
            if line.get("event") == "server_unavailable" and line.get("server") == server
        ]

    # Retries with backoff, one line each naming the server (first delays 0.5 s, 1 s, 2 s).
    retries = wait_until(
        lambda: found if len(found := unavailable_lines()) >= 3 else None,
        timeout=30,
        what=f"three server_unavailable lines for {server}",
    )
    delays = [line["retry_in_s"] for line in retries]
    assert delays[:3] == sorted(delays[:3]) and delays[2] > delays[0], delays
    other_servers_down = {line.get("server") for line in down.lines()} - {server, None}
    if server != "postgresql":  # without PostgreSQL, etcd is not checked (runtime not made)
        assert other_servers_down == set(), other_servers_down
    ready = _get(f"{base}/readyz")
    assert ready is not None and ready.status_code == 503
    checks = ready.json()["checks"]
    assert checks[server] != "ok", checks
    assert checks["rabbitmq" if server != "rabbitmq" else "postgresql"] == "ok", checks
    assert down.running()

    down.proxy.start()  # the server comes back
    wait_until(
        lambda: (answer := _get(f"{base}/readyz")) is not None and answer.status_code == 200,
        timeout=20,
        what="/readyz to turn 200",
    )
    wait_until(
        lambda: any(line.get("event") == "servers_ready" for line in down.lines()),
        timeout=15,
        what="servers_ready in the log",
    )
    assert down.running()


@pytest.mark.parametrize("server", SERVERS)
def test_the_scheduler_waits_for_a_server_down_at_start(
    scenario: Callable[[str], Scenario], server: str
) -> None:
    down = scenario(server)
    down.start("scheduler", "--health-port", "0")

    def failures() -> list[dict[str, Any]]:
        return [
            line for line in down.lines() if line.get("level") == "warning" and "retry_in_s" in line
        ]

    retried = wait_until(
        lambda: found if len(found := failures()) >= 3 else None,
        timeout=30,
        what="three retry lines",
    )
    names = {"postgresql": "PostgreSQL", "etcd": "etcd", "rabbitmq": "RabbitMQ"}
    for line in retried:
        text = json.dumps(line)
        assert names[server].lower() in text.lower() or line.get("server") == server, line
    assert down.running()
    down.proxy.start()

    def queued() -> int:
        connection = pika.BlockingConnection(pika.URLParameters(os.environ["MIGRATOR_BROKER_URL"]))
        try:
            declared = connection.channel().queue_declare(down.queue, durable=True, passive=True)
            return int(declared.method.message_count)
        except pika.exceptions.ChannelClosedByBroker:
            return 0
        finally:
            if connection.is_open:
                connection.close()

    # Back to work: it leads and publishes the enqueue and guard runs.
    wait_until(queued, timeout=30, what="the scheduler's first messages in its queue")
    assert down.running()
