"""Servers of the chaos test: a private stack, never the shared one.

The chaos run restarts RabbitMQ and PostgreSQL and kills etcd members, so it gets its own:
PostgreSQL and RabbitMQ from ``deploy/local/stack`` with its own state folder and ports
(``STACK_*`` variables; its single etcd member is left unused), and a private 3-member etcd
cluster (``tests.servers.EtcdCluster``, whose leader can be found, killed and restarted).
Both are stopped and removed after the module.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import STACK_SCRIPT, parse_stack_env
from tests.servers import EtcdCluster, free_ports


@dataclass(frozen=True)
class PrivateStack:
    """A ``deploy/local/stack`` of this test's own.

    :param stack_env: the ``STACK_*`` variables that select it (state folder and ports).
    :param env: its ``MIGRATOR_*`` variables (``stack env``), etcd pointed at ``etcd``.
    :param etcd: the private 3-member etcd cluster.
    """

    stack_env: dict[str, str]
    env: dict[str, str]
    etcd: EtcdCluster

    def run(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        """Run ``deploy/local/stack ARGS`` against this stack; raise when it fails."""
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
        return done

    def restart(self, service: str) -> None:
        """``stack restart-service SERVICE`` (postgres or rabbitmq)."""
        self.run("restart-service", service)


@pytest.fixture(scope="module")
def private_stack(stack: dict[str, str]) -> Iterator[PrivateStack]:
    """PostgreSQL and RabbitMQ on ports of their own, and a 3-member etcd cluster.

    Depends on ``stack`` only so the system packages are installed first.
    """
    root = Path(tempfile.mkdtemp(prefix="chaos-"))
    ports = free_ports(5)
    stack_env = {
        "STACK_STATE_DIR": str(root / "stack"),
        "STACK_PG_PORT": str(ports[0]),
        "STACK_RABBITMQ_PORT": str(ports[1]),
        "STACK_RABBITMQ_DIST_PORT": str(ports[2]),
        "STACK_ETCD_CLIENT_PORT": str(ports[3]),
        "STACK_ETCD_PEER_PORT": str(ports[4]),
    }
    etcd = EtcdCluster(members=3, data_root=root / "etcd")
    probe = PrivateStack(stack_env, {}, etcd)
    try:
        probe.run("up", timeout=600)
        env = parse_stack_env(probe.run("env").stdout)
        etcd.start()
        env["MIGRATOR_ETCD_ENDPOINTS"] = ",".join(etcd.endpoints)
        yield PrivateStack(stack_env, env, etcd)
    finally:
        etcd.stop_all()
        try:
            probe.run("down", timeout=180)
        finally:
            shutil.rmtree(root, ignore_errors=True)
