"""Fixtures of the lease tests: a client on the stack's etcd, a unique prefix, processes."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from leases import EtcdClient

PROCESS = Path(__file__).with_name("lease_process.py")


def parse_endpoints(text: str) -> list[tuple[str, int]]:
    return [(host, int(port)) for host, port in (item.rsplit(":", 1) for item in text.split(","))]


@pytest.fixture(scope="session")
def etcd_endpoints(stack: dict[str, str]) -> list[tuple[str, int]]:
    return parse_endpoints(stack["MIGRATOR_ETCD_ENDPOINTS"])


@pytest.fixture
def client(etcd_endpoints: list[tuple[str, int]]) -> Iterator[EtcdClient]:
    with EtcdClient(etcd_endpoints, timeout=3) as etcd:
        yield etcd


@pytest.fixture
def prefix() -> str:
    return f"/test-{uuid.uuid4().hex[:10]}"


class LeaseProcess:
    """A ``lease_process.py`` child whose JSON lines are read in the background."""

    def __init__(self, args: list[str], endpoints: list[tuple[str, int]], ttl: float) -> None:
        env = {
            **os.environ,
            "LEASE_TEST_ENDPOINTS": ",".join(f"{h}:{p}" for h, p in endpoints),
            "LEASE_TEST_TTL": str(ttl),
            "PYTHONPATH": str(PROCESS.parents[2]),
        }
        self.proc = subprocess.Popen(
            [sys.executable, str(PROCESS), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.lines.put(json.loads(line))
            except ValueError:
                continue

    def expect(self, event: str, timeout: float = 10) -> dict[str, Any]:
        """The next line with ``event``, or fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {event!r} line within {timeout} s; seen {self.seen[-5:]}")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            self.seen.append(line)
            if line.get("event") == event:
                return line

    def drain(self) -> list[dict[str, Any]]:
        out = []
        while True:
            try:
                out.append(self.lines.get_nowait())
            except queue.Empty:
                self.seen.extend(out)
                return out

    def send(self, line: str = "go") -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def spawn(etcd_endpoints: list[tuple[str, int]]) -> Iterator[Any]:
    children: list[LeaseProcess] = []

    def start(
        *args: str, ttl: float = 2, endpoints: list[tuple[str, int]] | None = None
    ) -> LeaseProcess:
        child = LeaseProcess(list(args), endpoints or etcd_endpoints, ttl)
        children.append(child)
        return child

    yield start
    for child in children:
        child.stop()
