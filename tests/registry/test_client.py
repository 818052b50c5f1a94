"""The registry client against the simulator (and a few hostile servers), over real HTTP."""

from __future__ import annotations

import dataclasses
import http.server
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar

import pytest

from devtools.simulator import SimulatorServer
from migration.registry import (
    CancelOutcome,
    CancelResult,
    ErrorKind,
    ImportOutcome,
    ImportResult,
    RegistryClient,
    RegistryImportStatus,
    StatusOutcome,
    StatusResult,
    import_url_path,
)

MakeSimulator = Callable[..., SimulatorServer]


def wait_for_status(
    client: RegistryClient, path: str, status: RegistryImportStatus, timeout: float = 5.0
) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = client.status(path)
        if last.status is status:
            return
        time.sleep(0.02)
    raise AssertionError(f"{path}: expected {status}, last {last}")


def test_pre_import_then_import_complete(simulator: SimulatorServer) -> None:
    with RegistryClient(simulator.url) as client:
        started = client.start_pre_import("group/sub/app")
        assert started.outcome is ImportOutcome.STARTED and started.started
        assert (started.http_status, started.attempts) == (202, 1)
        running = client.status("group/sub/app")
        assert running.outcome is StatusOutcome.FOUND
        assert running.status is RegistryImportStatus.PRE_IMPORT_IN_PROGRESS
        assert (running.name, running.path) == ("app", "group/sub/app")
        wait_for_status(client, "group/sub/app", RegistryImportStatus.PRE_IMPORT_COMPLETE)

        assert client.start_import("group/sub/app").outcome is ImportOutcome.STARTED
        assert client.status("group/sub/app").status is RegistryImportStatus.IMPORT_IN_PROGRESS
        wait_for_status(client, "group/sub/app", RegistryImportStatus.IMPORT_COMPLETE)
        # Once imported, the registry says so.
        again = client.start_pre_import("group/sub/app")
        assert (again.outcome, again.http_status) == (ImportOutcome.ALREADY_IMPORTED, 200)
    assert simulator.report()["starts"] == {"group/sub/app": {"pre": 1, "final": 1}}


def test_native_and_missing_repositories(simulator: SimulatorServer) -> None:
    with RegistryClient(simulator.url) as client:
        native = client.start_pre_import("g/native-app")
        assert (native.outcome, native.http_status) == (ImportOutcome.ALREADY_IMPORTED, 200)
        assert client.start_import("g/native-app").outcome is ImportOutcome.ALREADY_IMPORTED
        assert client.status("g/native-app").status is RegistryImportStatus.NATIVE

        missing = client.start_pre_import("g/missing-app")
        assert (missing.outcome, missing.http_status) == (ImportOutcome.NOT_FOUND, 404)
        assert client.status("g/missing-app").outcome is StatusOutcome.NOT_FOUND
        assert client.cancel("g/missing-app").outcome is CancelOutcome.NOT_FOUND
        # Never imported: the registry has no row for it yet.
        assert client.status("g/untouched").outcome is StatusOutcome.NOT_FOUND


def test_starts_while_a_phase_runs_are_refused(make_simulator: MakeSimulator) -> None:
    simulator = make_simulator(pre_import_seconds=(0.4, 0.4), import_seconds=(0.4, 0.4))
    with RegistryClient(simulator.url) as client:
        assert client.start_pre_import("g/app").started
        for second in (client.start_pre_import("g/app"), client.start_import("g/app")):
            assert (second.outcome, second.http_status) == (
                ImportOutcome.ALREADY_BEING_IMPORTED,
                425,
            )
        wait_for_status(client, "g/app", RegistryImportStatus.PRE_IMPORT_COMPLETE)
        assert client.start_import("g/app").started
        for second in (client.start_import("g/app"), client.start_pre_import("g/app")):
            assert (second.outcome, second.http_status) == (
                ImportOutcome.ALREADY_BEING_IMPORTED,
                409,
            )
    report = simulator.report()
    assert len(report["double_start_attempts"]) == 4
    assert report["double_started_repositories"] == ["g/app"]
    assert report["overlapping_starts"] == []
    assert report["max_concurrent_imports"] == 1


def test_failed_pre_import_then_final_import_is_424(simulator: SimulatorServer) -> None:
    with RegistryClient(simulator.url) as client:
        assert client.start_pre_import("g/fail-always-app").started
        wait_for_status(client, "g/fail-always-app", RegistryImportStatus.PRE_IMPORT_FAILED)
        final = client.start_import("g/fail-always-app")
        assert (final.outcome, final.http_status) == (ImportOutcome.PRE_IMPORT_FAILED, 424)


def test_fail_once_fails_only_the_first_pre_import(simulator: SimulatorServer) -> None:
    with RegistryClient(simulator.url) as client:
        assert client.start_pre_import("g/fail-once").started
        wait_for_status(client, "g/fail-once", RegistryImportStatus.PRE_IMPORT_FAILED)
        assert client.start_pre_import("g/fail-once").started
        wait_for_status(client, "g/fail-once", RegistryImportStatus.PRE_IMPORT_COMPLETE)
        assert client.start_import("g/fail-import-once").started
        wait_for_status(client, "g/fail-import-once", RegistryImportStatus.IMPORT_FAILED)
    outcomes = simulator.report()["outcomes"]
    assert outcomes == {"pre_import_failed": 1, "pre_import_complete": 1, "import_failed": 1}


def test_too_many_imports_is_retried_then_reported(make_simulator: MakeSimulator) -> None:
    simulator = make_simulator(max_concurrent_imports=1, pre_import_seconds=(3, 3))
    with RegistryClient(simulator.url, too_many_retries=2, backoff=0.05) as client:
        assert client.start_pre_import("g/first").started
        began = time.monotonic()
        refused = client.start_pre_import("g/second")
        elapsed = time.monotonic() - began
    assert (refused.outcome, refused.http_status) == (ImportOutcome.TOO_MANY_IMPORTS, 429)
    assert refused.attempts == 3
    # Backoff waited between attempts: at least half of 0.05 + 0.1, jitter included.
    assert 0.07 <= elapsed < 2.0
    assert simulator.report()["answers"]["start_429"] == 3


def test_too_many_imports_retry_succeeds_once_capacity_frees(make_simulator: MakeSimulator) -> None:
    simulator = make_simulator(max_concurrent_imports=1, pre_import_seconds=(0.3, 0.3))
    with RegistryClient(simulator.url, too_many_retries=6, backoff=0.1) as client:
        assert client.start_pre_import("g/first").started
        second = client.start_pre_import("g/second")
    assert second.started and second.attempts > 1
    assert simulator.report()["max_concurrent_imports"] == 1


def test_token_is_required_when_configured(make_simulator: MakeSimulator) -> None:
    simulator = make_simulator(token="t0ken")
    for token in (None, "wrong"):
        with RegistryClient(simulator.url, token=token) as client:
            refused = client.start_pre_import("g/app")
            assert (refused.outcome, refused.http_status) == (ImportOutcome.UNAUTHORIZED, 401)
            assert client.status("g/app").outcome is StatusOutcome.UNAUTHORIZED
            assert client.cancel("g/app").outcome is CancelOutcome.UNAUTHORIZED
    with RegistryClient(simulator.url, token="t0ken") as client:
        assert client.start_pre_import("g/app").started
        assert client.status("g/app").outcome is StatusOutcome.FOUND


def test_server_errors_are_error_results(make_simulator: MakeSimulator) -> None:
    simulator = make_simulator()
    with RegistryClient(simulator.url) as client:
        broken = client.start_pre_import("g/server-error")
        assert (broken.outcome, broken.http_status) == (ImportOutcome.ERROR, 500)
        assert broken.detail == "simulated internal error"
        assert client.status("g/server-error").outcome is StatusOutcome.ERROR
        assert client.cancel("g/server-error").outcome is CancelOutcome.ERROR
        simulator.configure(start_error_rate=1.0)
        unavailable = client.start_import("g/app")
        assert (unavailable.outcome, unavailable.http_status) == (ImportOutcome.ERROR, 503)


def test_answers_that_are_not_the_api_are_error_results(
    simulator: SimulatorServer, garbage_url: str
) -> None:
    with RegistryClient(simulator.url) as client:
        start = client.start_pre_import("g/garbage")
        assert (start.outcome, start.http_status) == (ImportOutcome.ERROR, 502)
        status = client.status("g/garbage")
        assert (status.outcome, status.http_status) == (StatusOutcome.ERROR, 200)
        assert "unexpected status body" in status.detail
        assert client.cancel("g/garbage").outcome is CancelOutcome.ERROR
    with RegistryClient(garbage_url, timeout=2) as client:
        for result in (
            client.start_pre_import("g/app"),
            client.status("g/app"),
            client.cancel("g/app"),
        ):
            assert result.outcome == "error"
            assert result.http_status is None
            assert result.detail  # says what went wrong


def test_a_slow_registry_times_out_into_an_error(make_simulator: MakeSimulator) -> None:
    simulator = make_simulator(start_latency_seconds=1.5)
    with RegistryClient(simulator.url, timeout=0.3) as client:
        began = time.monotonic()
        result = client.start_pre_import("g/slow")
        elapsed = time.monotonic() - began
        assert (result.outcome, result.http_status) == (ImportOutcome.ERROR, None)
        assert "Timeout" in result.detail
        assert elapsed < 1.2
        # The registry went on and started it anyway: a caller must not assume otherwise.
        wait_for_status(client, "g/slow", RegistryImportStatus.PRE_IMPORT_COMPLETE)


def test_connection_refused_is_an_error_within_the_timeout(closed_port_url: str) -> None:
    with RegistryClient(closed_port_url, timeout=1.0) as client:
        began = time.monotonic()
        results: list[ImportResult | StatusResult | CancelResult] = [
            client.start_pre_import("g/app"),
            client.status("g/app"),
            client.cancel("g/app"),
        ]
        elapsed = time.monotonic() - began
    assert [r.outcome for r in results] == ["error", "error", "error"]
    assert all(r.error_kind is ErrorKind.CONNECT for r in results)
    assert all("Connection refused" in r.detail for r in results), results
    assert elapsed < 3.0


def test_cancel_a_running_import(make_simulator: MakeSimulator) -> None:
    simulator = make_simulator(pre_import_seconds=(5, 5))
    with RegistryClient(simulator.url) as client:
        nothing = client.cancel("g/app")
        assert (nothing.outcome, nothing.http_status) == (CancelOutcome.NOTHING_RUNNING, 400)
        assert client.start_pre_import("g/app").started
        accepted = client.cancel("g/app")
        assert (accepted.outcome, accepted.http_status) == (CancelOutcome.ACCEPTED, 202)
        assert accepted.status is RegistryImportStatus.PRE_IMPORT_IN_PROGRESS
        wait_for_status(client, "g/app", RegistryImportStatus.PRE_IMPORT_CANCELED, timeout=2)
        assert client.cancel("g/app").outcome is CancelOutcome.NOTHING_RUNNING
    assert simulator.report()["outcomes"] == {"pre_import_canceled": 1}


def test_paths_are_quoted_per_segment(simulator: SimulatorServer) -> None:
    assert import_url_path("/a b/c%d/e?f/") == "/gitlab/v1/import/a%20b/c%25d/e%3Ff/"
    with RegistryClient(simulator.url) as client:
        assert client.start_pre_import("odd group/app?v=1#x").started
        status = client.status("odd group/app?v=1#x")
        assert (status.path, status.name) == ("odd group/app?v=1#x", "app?v=1#x")
        for bad in ("", "a//b", "a/../b"):
            result = client.start_pre_import(bad)
            assert (result.outcome, result.attempts) == (ImportOutcome.ERROR, 0)
            assert client.status(bad).outcome is StatusOutcome.ERROR
    assert list(simulator.report()["starts"]) == ["odd group/app?v=1#x"]


def test_results_are_frozen(simulator: SimulatorServer) -> None:
    with RegistryClient(simulator.url) as client:
        result = client.start_pre_import("g/app")
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.outcome = ImportOutcome.ERROR  # type: ignore[misc]


def test_one_client_shared_by_threads_and_the_capacity_bound(make_simulator: MakeSimulator) -> None:
    simulator = make_simulator(max_concurrent_imports=3, pre_import_seconds=(2, 2))
    paths = [f"g/app-{n}" for n in range(10)]
    with (
        RegistryClient(simulator.url, too_many_retries=0) as client,
        ThreadPoolExecutor(max_workers=10) as pool,
    ):
        results = list(pool.map(client.start_pre_import, paths))
    outcomes = Counter(r.outcome for r in results)
    assert outcomes == {ImportOutcome.STARTED: 3, ImportOutcome.TOO_MANY_IMPORTS: 7}
    report = simulator.report()
    assert report["max_concurrent_imports"] == 3
    assert report["answers"] == {"start_202": 3, "start_429": 7}


class _RecordingProxy(http.server.BaseHTTPRequestHandler):
    """A forward proxy that answers every request itself (202, ``{}``) and keeps its target."""

    protocol_version = "HTTP/1.1"
    targets: ClassVar[list[str]] = []

    def do_PUT(self) -> None:
        self.targets.append(self.path)  # absolute-form: the URL as the client asked a proxy
        body = b"{}"
        self.send_response(202)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_the_environment_proxy_is_used_unless_no_proxy_covers_the_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _RecordingProxy.targets.clear()
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RecordingProxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        for name in ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.server_address[1]}")
        # A host no resolver knows: only the proxy can answer for it.
        with RegistryClient("http://registry.invalid:5005", timeout=2.0) as client:
            assert client.start_pre_import("g/app").started
        assert _RecordingProxy.targets == [
            "http://registry.invalid:5005/gitlab/v1/import/g/app/?import_type=pre"
        ]
        monkeypatch.setenv("NO_PROXY", "registry.invalid")
        with RegistryClient("http://registry.invalid:5005", timeout=2.0) as client:
            direct = client.start_pre_import("g/app")
        assert direct.error_kind is ErrorKind.CONNECT, direct  # no such host, asked directly
        assert len(_RecordingProxy.targets) == 1
    finally:
        proxy.shutdown()
        proxy.server_close()
