"""The launcher holds the ports it chose until its programs serve on them (the partition
harness's proxies bind kernel-chosen ports while a run is being set up: a port only probed
free was once taken by one, and the API could not start)."""

from __future__ import annotations

import errno
import socket
from pathlib import Path

import httpx
import pytest

from devtools.launcher import LocalMigration
from migration.store import Store
from tests.fixtures import database_url
from tests.partition.links import FaultProxy

__all__ = ["database_url"]


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _bind_fails(port: int) -> bool:
    """Whether binding ``port`` now fails with EADDRINUSE (SO_REUSEADDR on, as a proxy)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as error:
            return error.errno == errno.EADDRINUSE
        return False


def test_the_launcher_holds_its_ports_from_choice_to_serving(
    stack: dict[str, str], database_url: str, store: Store, tmp_path: Path
) -> None:
    # ``store``: the module's database at the schema the API requires.
    run = LocalMigration(
        env={**stack, "MIGRATOR_DATABASE_URL": database_url},
        log_dir=tmp_path, workers=0, scheduler=False,
    )  # fmt: skip
    ports = {_port(run.simulator_url), _port(run.api_url)}
    proxies: list[FaultProxy] = []
    try:
        # Before start: held. Many proxies binding port 0 meanwhile never get one of them.
        assert all(_bind_fails(port) for port in ports)
        proxies = [FaultProxy(name=f"p{i}", target=("127.0.0.1", 9)) for i in range(200)]
        assert ports.isdisjoint(proxy.port for proxy in proxies)
        run.start(timeout=60)
        assert httpx.get(f"{run.api_url}/healthz", timeout=10).status_code == 200
        # Connections the server closed first (TIME_WAIT on its port) must not keep a
        # restart from binding it again (the chaos run's registry_down fault met that).
        for _ in range(5):
            answer = httpx.get(
                f"{run.simulator_url}/simulator/report", headers={"Connection": "close"},
                timeout=10,
            )  # fmt: skip
            assert answer.status_code == 200
        # A stopped registry refuses connections (an outage), it does not hold them: the
        # launcher keeps no copy of the socket it handed down.
        run.stop_simulator()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{run.simulator_url}/simulator/report", timeout=5)
        run.start_simulator()  # on the same port again
        assert httpx.get(f"{run.simulator_url}/simulator/report", timeout=10).status_code == 200
    finally:
        for proxy in proxies:
            proxy.close()
        codes = run.stop(timeout=20)
    assert codes["api"] == 0 and codes["simulator"] == 0, codes
    # Stopped: the ports are free again (nothing of the run holds them).
    assert not any(_bind_fails(port) for port in ports)
