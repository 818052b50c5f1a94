"""Fixtures of the registry tests: a simulator on a free port, a notification receiver,
servers that answer garbage, a port nobody listens on. All real HTTP over loopback."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from devtools.launcher import free_port
from devtools.simulator import SimulatorConfig, SimulatorServer

# Imports in these tests take a few tens of milliseconds unless a test says otherwise.
FAST = {"pre_import_seconds": (0.05, 0.05), "import_seconds": (0.05, 0.05)}


@pytest.fixture
def make_simulator() -> Iterator[Callable[..., SimulatorServer]]:
    """Start simulators with the given knobs (FAST durations unless overridden)."""
    started: list[SimulatorServer] = []

    def make(**knobs: Any) -> SimulatorServer:
        server = SimulatorServer(SimulatorConfig(**{**FAST, **knobs})).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def simulator(make_simulator: Callable[..., SimulatorServer]) -> SimulatorServer:
    return make_simulator()


class NotificationReceiver:
    """An HTTP server that records every request and answers scripted status codes.

    :param answers: status codes for the first requests, in order; then ``default``.
    :param default: the status code once ``answers`` are used up.
    """

    def __init__(self, answers: list[int] | None = None, default: int = 200) -> None:
        self.answers = list(answers or [])
        self.default = default
        self.received: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                with receiver._changed:
                    code = receiver.answers.pop(0) if receiver.answers else receiver.default
                    receiver.received.append(
                        {
                            "path": self.path,
                            "authorization": self.headers.get("Authorization"),
                            "body": json.loads(raw) if raw else None,
                            "answered": code,
                        }
                    )
                    receiver._changed.notify_all()
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def wait_for(self, count: int, *, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Wait until ``count`` requests arrived; return them all."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self.received) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{len(self.received)} of {count} requests arrived")
                self._changed.wait(left)
            return list(self.received)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def make_receiver() -> Iterator[Callable[..., NotificationReceiver]]:
    made: list[NotificationReceiver] = []

    def make(answers: list[int] | None = None, default: int = 200) -> NotificationReceiver:
        receiver = NotificationReceiver(answers, default)
        made.append(receiver)
        return receiver

    yield make
    for receiver in made:
        receiver.close()


@pytest.fixture
def garbage_url() -> Iterator[str]:
    """A TCP server that answers every connection with bytes that are not HTTP."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(1)
                try:
                    conn.recv(65536)
                    conn.sendall(b"\x00\x01 this is not HTTP at all\r\n\r\n")
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join(timeout=2)
    listener.close()


@pytest.fixture
def closed_port_url() -> str:
    """A loopback URL on a port that was free a moment ago (connections are refused)."""
    return f"http://127.0.0.1:{free_port()}"
