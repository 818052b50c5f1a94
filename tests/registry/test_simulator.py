"""The simulator's own promises: notifications, the report, runtime knobs, the command."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from migration.registry import ImportOutcome, RegistryClient, RegistryImportStatus
from service.simulator import SimulatorConfig, SimulatorProcess, SimulatorServer
from tests.registry.conftest import NotificationReceiver
from tests.registry.test_client import wait_for_status

COMMAND = str(Path(sys.executable).with_name("registry-migrator"))

MakeSimulator = Callable[..., SimulatorServer]
MakeReceiver = Callable[..., NotificationReceiver]


def wait_for_report(
    simulator: SimulatorServer, check: Callable[[dict], bool], timeout: float = 5.0
) -> dict:
    deadline = time.monotonic() + timeout
    report = simulator.report()
    while not check(report):
        if time.monotonic() > deadline:
            raise AssertionError(f"report never matched: {report}")
        time.sleep(0.02)
        report = simulator.report()
    return report


def test_notifications_carry_the_secret_and_the_status(
    make_simulator: MakeSimulator, make_receiver: MakeReceiver
) -> None:
    receiver = make_receiver()
    simulator = make_simulator(notify_url=receiver.url, secret="s3cret")
    with RegistryClient(simulator.url) as client:
        assert client.start_pre_import("top/sub/app").started
        first = receiver.wait_for(1)[0]
        assert client.start_import("top/sub/app").started
        second = receiver.wait_for(2)[1]
    for note, status in ((first, "pre_import_complete"), (second, "import_complete")):
        assert note["path"] == "/notifications/registry/repositories/top/sub/app/status"
        assert note["authorization"] == "s3cret"
        assert note["body"] == {
            "name": "app",
            "path": "top/sub/app",
            "status": status,
            "detail": "",
        }
    report = wait_for_report(simulator, lambda r: r["notifications"]["sent"] == 2)
    assert report["notifications"]["pending"] == 0
    assert report["notifications"]["attempts"] == 2


def test_notifications_are_retried_until_accepted(
    make_simulator: MakeSimulator, make_receiver: MakeReceiver
) -> None:
    receiver = make_receiver(answers=[503, 503, 429])
    simulator = make_simulator(notify_url=receiver.url, secret="s", notify_backoff=0.02)
    with RegistryClient(simulator.url) as client:
        assert client.start_pre_import("g/fail-always").started
    received = receiver.wait_for(4)
    assert [r["answered"] for r in received] == [503, 503, 429, 200]
    assert {r["body"]["status"] for r in received} == {"pre_import_failed"}
    report = wait_for_report(simulator, lambda r: r["notifications"]["sent"] == 1)
    assert report["notifications"]["attempts"] == 4
    assert report["deliveries"][0]["outcome"] == "sent"


def test_refused_notifications_are_not_retried_forever(
    make_simulator: MakeSimulator, make_receiver: MakeReceiver
) -> None:
    receiver = make_receiver(default=401)
    simulator = make_simulator(
        notify_url=receiver.url, secret="wrong", notify_backoff=0.01, notify_refused_attempts=2
    )
    with RegistryClient(simulator.url) as client:
        assert client.start_pre_import("g/app").started
    report = wait_for_report(simulator, lambda r: r["notifications"]["refused"] == 1)
    assert report["notifications"]["sent"] == 0
    time.sleep(0.2)  # no further attempt comes
    assert len(receiver.received) == 2


def test_an_unreachable_receiver_is_given_up_after_max_attempts(
    make_simulator: MakeSimulator, closed_port_url: str
) -> None:
    simulator = make_simulator(
        notify_url=closed_port_url, notify_backoff=0.01, notify_max_attempts=3
    )
    with RegistryClient(simulator.url) as client:
        assert client.start_pre_import("g/app").started
    report = wait_for_report(simulator, lambda r: r["notifications"]["failed"] == 1)
    assert report["notifications"]["attempts"] == 3
    assert "ConnectError" in report["deliveries"][0]["last_answer"]


def test_cancel_sends_a_canceled_notification(
    make_simulator: MakeSimulator, make_receiver: MakeReceiver
) -> None:
    receiver = make_receiver()
    simulator = make_simulator(notify_url=receiver.url, import_seconds=(5, 5))
    with RegistryClient(simulator.url) as client:
        assert client.start_import("g/app").started
        assert client.cancel("g/app").outcome == "accepted"
        note = receiver.wait_for(1, timeout=2)[0]
    assert note["body"]["status"] == "import_canceled"
    assert note["authorization"] is None  # no secret configured


def test_report_flags_an_accepted_double_start(make_simulator: MakeSimulator) -> None:
    simulator = make_simulator(pre_import_seconds=(0.5, 0.5))
    with RegistryClient(simulator.url) as client:
        assert client.start_pre_import("g/app").started
        assert client.start_pre_import("g/app").outcome is ImportOutcome.ALREADY_BEING_IMPORTED
        report = simulator.report()
        assert report["double_started_repositories"] == ["g/app"]
        assert report["overlapping_repositories"] == []

        # A registry without the guard accepts the second start; the report must flag it.
        simulator.configure(guard_double_start=False)
        assert client.start_pre_import("g/app").started
        assert client.start_pre_import("g/other").started
    report = simulator.report()
    assert report["overlapping_repositories"] == ["g/app"]
    assert [(o["phase"], o["running_phase"]) for o in report["overlapping_starts"]] == [
        ("pre", "pre")
    ]
    assert report["starts"]["g/app"] == {"pre": 2, "final": 0}
    assert report["max_concurrent_imports"] == 3
    assert [e["overlap"] for e in report["events"] if e["path"] == "g/app"] == [False, False, True]


def test_report_counts_concurrency_and_outcomes(make_simulator: MakeSimulator) -> None:
    simulator = make_simulator(pre_import_seconds=(0.3, 0.3), pre_import_failure_rate=0.0)
    paths = [f"g/app-{n}" for n in range(4)]
    with RegistryClient(simulator.url) as client:
        for path in paths:
            assert client.start_pre_import(path).started
        assert simulator.report()["running_imports"] == 4
        for path in paths:
            wait_for_status(client, path, RegistryImportStatus.PRE_IMPORT_COMPLETE)
        simulator.configure(import_failure_rate=1.0)
        assert client.start_import(paths[0]).started
        wait_for_status(client, paths[0], RegistryImportStatus.IMPORT_FAILED)
    report = simulator.report(events=False)
    assert report["max_concurrent_imports"] == 4
    assert report["running_imports"] == 0
    assert report["outcomes"] == {"pre_import_complete": 4, "import_failed": 1}
    assert report["notifications"]["skipped_no_url"] == 5
    assert "events" not in report


def test_durations_scale_with_tags(make_simulator: MakeSimulator) -> None:
    simulator = make_simulator(pre_import_seconds=(0.2, 0.2), default_tags=10)
    url = f"{simulator.url}/gitlab/v1/import/g/{{}}/"
    assert (
        httpx.put(url.format("small"), params={"import_type": "pre", "tags": 1}).status_code == 202
    )
    assert (
        httpx.put(url.format("big"), params={"import_type": "pre", "tags": 100}).status_code == 202
    )
    with RegistryClient(simulator.url) as client:
        wait_for_status(client, "g/small", RegistryImportStatus.PRE_IMPORT_COMPLETE, timeout=1)
        assert client.status("g/big").status is RegistryImportStatus.PRE_IMPORT_IN_PROGRESS


def test_slow_start_paths_answer_late_and_slow_decide_drops_a_gone_caller(
    make_simulator: MakeSimulator,
) -> None:
    simulator = make_simulator(slow_start_seconds=1.0, pre_import_seconds=(5.0, 5.0))
    with RegistryClient(simulator.url, timeout=0.3) as caller, RegistryClient(simulator.url) as c:
        # slow-start: the import begins at once; the answer comes a second later.
        assert caller.start_pre_import("g/slow-start-app").outcome is ImportOutcome.ERROR
        assert c.status("g/slow-start-app").status is RegistryImportStatus.PRE_IMPORT_IN_PROGRESS
        # slow-decide: the caller times out during the wait; nothing is started.
        assert caller.start_pre_import("g/slow-decide-app").outcome is ImportOutcome.ERROR
        # Once the registry has decided (its 499 is recorded), nothing was started: a 404
        # read before the decision would prove nothing.
        wait_for_report(simulator, lambda r: r["answers"].get("start_499") == 1)
        assert c.status("g/slow-decide-app").http_status == 404
        # a patient caller of a slow-decide path gets its start.
        began = time.monotonic()
        assert c.start_pre_import("g/slow-decide-other").started
        assert time.monotonic() - began >= 0.9
        # other paths are not slowed: well under the 1 s wait (0.9 s leaves a loaded
        # machine room for one request and still tells the wait apart).
        began = time.monotonic()
        assert c.start_pre_import("g/plain").started
        assert time.monotonic() - began < 0.9
    report = simulator.report()
    assert report["answers"]["start_499"] == 1
    assert report["starts"]["g/slow-start-app"] == {"pre": 1, "final": 0}
    assert "g/slow-decide-app" not in report["starts"]


def test_config_changes_are_checked_and_reset_clears(simulator: SimulatorServer) -> None:
    with pytest.raises(ValueError, match="unknown simulator setting 'colour'"):
        simulator.configure(colour="blue")
    with pytest.raises(ValueError, match="pre_import_failure_rate"):
        simulator.configure(pre_import_failure_rate=3)
    with pytest.raises(ValueError, match=r"import_seconds must be \[min, max\]"):
        simulator.configure(import_seconds=[2])
    assert simulator.configure(import_seconds=[1, 2])["import_seconds"] == [1.0, 2.0]
    bad_json = httpx.post(f"{simulator.url}/simulator/config", content=b"{nope")
    assert bad_json.status_code == 400
    with RegistryClient(simulator.url) as client:
        assert client.start_import("g/app").started
        simulator.reset()
        assert client.status("g/app").outcome == "not_found"
    report = simulator.report()
    assert report["starts"] == {} and report["running_imports"] == 0 and report["events"] == []


def test_bad_requests_are_refused(simulator: SimulatorServer) -> None:
    base = f"{simulator.url}/gitlab/v1/import"
    assert httpx.put(f"{base}/g/app/", params={"import_type": "half"}).status_code == 400
    assert (
        httpx.put(f"{base}/g/app/", params={"import_type": "pre", "tags": "x"}).status_code == 400
    )
    assert httpx.put(f"{base}/a//b/", params={"import_type": "pre"}).status_code == 400
    assert simulator.report()["starts"] == {}


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="max_concurrent_imports"):
        SimulatorConfig(max_concurrent_imports=-1)
    with pytest.raises(ValueError, match="notify_url"):
        SimulatorConfig(notify_url="ftp://x")
    with pytest.raises(ValueError, match="pre_import_seconds"):
        SimulatorConfig(pre_import_seconds=(2, 1))


def test_process_serves_with_its_config_and_stops_on_sigterm(tmp_path: Path) -> None:
    config = SimulatorConfig(pre_import_seconds=(0.01, 0.01), max_concurrent_imports=7)
    simulator = SimulatorProcess(config, log_path=str(tmp_path / "simulator.log"))
    with simulator:
        assert simulator.pid is not None
        assert httpx.get(f"{simulator.url}/simulator/config").json()["max_concurrent_imports"] == 7
        with RegistryClient(simulator.url) as client:
            assert client.start_pre_import("g/app").started
            wait_for_status(client, "g/app", RegistryImportStatus.PRE_IMPORT_COMPLETE)
        assert simulator.report()["starts"] == {"g/app": {"pre": 1, "final": 0}}
        # SIGTERM ends it gracefully, with status 0.
        assert simulator.stop() == 0
    with RegistryClient(simulator.url, timeout=1) as client:
        assert client.status("g/app").outcome == "error"


def test_command_rejects_bad_options() -> None:
    done = subprocess.run(
        [COMMAND, "simulator", "--start-error-rate", "7"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "registry-migrator simulator: start_error_rate must be between 0 and 1"
    ]
