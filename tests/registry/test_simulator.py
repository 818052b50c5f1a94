"""The simulator's own promises: notifications, the report, runtime knobs, the command."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from devtools.launcher import free_port
from devtools.simulator import (
    NotifyClient,
    NotifyError,
    SimulatorConfig,
    SimulatorProcess,
    SimulatorServer,
)
from migration.registry import (
    CancelOutcome,
    CancelResult,
    ErrorKind,
    FaultClass,
    ImportOutcome,
    ImportResult,
    RegistryClient,
    RegistryImportStatus,
    StatusOutcome,
    StatusResult,
)
from tests.registry.conftest import NotificationReceiver
from tests.registry.test_client import wait_for_status

COMMAND = str(Path(sys.executable).with_name("registry-migrator"))

MakeSimulator = Callable[..., SimulatorServer]
MakeReceiver = Callable[..., NotificationReceiver]


def wait_for_report(
    simulator: SimulatorServer | SimulatorProcess,
    check: Callable[[dict], bool],
    timeout: float = 5.0,
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
    # 2 s imports: the four starts must all be running when counted, on a loaded machine too
    # (0.3 s failed under load 15).
    simulator = make_simulator(pre_import_seconds=(2, 2), pre_import_failure_rate=0.0)
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


# -- the fault switch, the compliance check, outages: against the simulator's own process ------

#: The knobs every test of the running process starts from (and is put back to).
PROCESS_KNOBS = SimulatorConfig(pre_import_seconds=(0.05, 0.05), import_seconds=(0.05, 0.05))


@pytest.fixture(scope="module")
def simulator_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimulatorProcess]:
    """One ``registry-migrator simulator`` process for the fault tests of this module."""
    log_path = tmp_path_factory.mktemp("simulator") / "simulator.log"
    with SimulatorProcess(PROCESS_KNOBS, log_path=str(log_path)) as process:
        process.log_path = log_path  # type: ignore[attr-defined]
        yield process


@pytest.fixture
def process(simulator_process: SimulatorProcess) -> Iterator[SimulatorProcess]:
    """The module's simulator process, forgotten and with its starting knobs (no fault)."""
    simulator_process.reset()
    simulator_process.configure(**PROCESS_KNOBS.as_dict())
    yield simulator_process
    simulator_process.configure(**PROCESS_KNOBS.as_dict())


def probe(url: str, *, token: str | None = None, timeout: float = 5.0) -> httpx.Response:
    """``GET /gitlab/v1/``, the registry's compliance check (the client has no call for it)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(f"{url}/gitlab/v1/", headers=headers, timeout=timeout)


def test_compliance_check_answers_200_401_and_404(process: SimulatorProcess) -> None:
    answer = probe(process.url)
    assert answer.status_code == 200
    assert answer.json() == {}
    assert answer.headers["Gitlab-Container-Registry-Version"] == "simulator"

    with RegistryClient(process.url) as client:
        assert client.probe().ok

    process.configure(token="t0ken")
    assert probe(process.url).status_code == 401
    for token in (None, "wrong"):
        with RegistryClient(process.url, token=token) as client:
            refused = client.probe()
            assert (refused.ok, refused.http_status, refused.error_kind) == (
                False,
                401,
                ErrorKind.AUTH,
            )
    with RegistryClient(process.url, token="t0ken") as client:
        assert client.probe().ok

    process.configure(token=None, metadata_database=False)
    with RegistryClient(process.url) as client:
        disabled = client.probe()
    assert (disabled.ok, disabled.http_status) == (False, 404)
    assert "metadata database disabled" in disabled.detail
    assert process.report()["answers"] == {}  # a probe is no import call


ERROR = (ImportOutcome.ERROR, StatusOutcome.ERROR, CancelOutcome.ERROR)
UNAUTHORIZED = (ImportOutcome.UNAUTHORIZED, StatusOutcome.UNAUTHORIZED, CancelOutcome.UNAUTHORIZED)


def assert_registry_fault(
    results: list[ImportResult | StatusResult | CancelResult], kind: ErrorKind
) -> None:
    """Each result is the registry's failure (never the repository's), of ``kind``."""
    for result in results:
        assert (result.fault_class, result.error_kind) == (FaultClass.REGISTRY, kind), result


@pytest.mark.parametrize(
    ("code", "outcomes", "kind"),
    [
        (503, ERROR, ErrorKind.SERVER),
        (500, ERROR, ErrorKind.SERVER),
        (401, UNAUTHORIZED, ErrorKind.AUTH),
        (403, UNAUTHORIZED, ErrorKind.AUTH),
    ],
)
def test_a_status_fault_refuses_every_call(
    process: SimulatorProcess,
    code: int,
    outcomes: tuple[ImportOutcome, StatusOutcome, CancelOutcome],
    kind: ErrorKind,
) -> None:
    with RegistryClient(process.url) as client:
        assert client.start_pre_import("g/running").started
        process.configure(fault=f"status:{code}")
        start = client.start_pre_import("g/app")
        status = client.status("g/running")
        cancel = client.cancel("g/running")
        assert [(r.outcome, r.http_status) for r in (start, status, cancel)] == [
            (outcome, code) for outcome in outcomes
        ]
        assert "simulated fault" in start.detail
        assert_registry_fault([start, status, cancel], kind)
        probed = client.probe()
        assert (probed.ok, probed.http_status, probed.error_kind) == (False, code, kind)
        report = process.report()
        # Refused before the registry: nothing started, nothing canceled.
        assert report["starts"] == {"g/running": {"pre": 1, "final": 0}}
        assert report["answers"] == {"start_202": 1}
        assert report["faulted_answers"] == {
            f"{kind} status:{code}": 1 for kind in ("start", "status", "cancel", "probe")
        }
        assert report["fault"]["active"] is True and report["fault"]["ended_at"] is None

        process.configure(fault=None)
        assert client.start_pre_import("g/app").started
    report = process.report()
    assert report["fault"]["active"] is False
    assert report["fault"]["ended_at"] is not None


def test_a_fault_can_hit_only_some_calls(process: SimulatorProcess) -> None:
    process.configure(fault="status:503", fault_calls="start,probe")
    with RegistryClient(process.url) as client:
        assert client.start_pre_import("g/app").http_status == 503
        assert probe(process.url).status_code == 503
        # status and cancel reach the registry: it has never heard of g/app.
        assert client.status("g/app").outcome is StatusOutcome.NOT_FOUND
        assert client.cancel("g/app").outcome is CancelOutcome.NOTHING_RUNNING
    assert process.report()["faulted_answers"] == {"start status:503": 1, "probe status:503": 1}


def test_a_fault_ends_by_itself_after_its_seconds(process: SimulatorProcess) -> None:
    process.configure(fault="status:502", fault_seconds=1.0)
    with RegistryClient(process.url) as client:
        assert client.start_pre_import("g/app").http_status == 502
        set_at = process.report()["fault"]["set_at"]
        answers = []
        deadline = time.monotonic() + 10
        while not (answers and answers[-1] == 202):
            assert time.monotonic() < deadline, answers
            answers.append(client.start_pre_import("g/app").http_status)
            time.sleep(0.05)
    finished = time.time()
    assert set(answers[:-1]) <= {502}
    fault = process.report()["fault"]
    assert fault["active"] is False
    assert fault["ended_at"] == pytest.approx(set_at + 1.0)
    assert set_at + 1.0 <= finished


def test_a_slow_fault_acts_at_once_and_answers_after_the_client_gave_up(
    process: SimulatorProcess,
) -> None:
    process.configure(fault="slow:1.5", fault_calls="start", pre_import_seconds=[5, 5])
    with (
        RegistryClient(process.url, timeout=0.3) as impatient,
        RegistryClient(process.url) as patient,
    ):
        began = time.monotonic()
        start = impatient.start_pre_import("g/app")
        assert (start.outcome, start.http_status) == (ImportOutcome.ERROR, None)
        assert_registry_fault([start], ErrorKind.TIMEOUT)
        assert start.error_kind is not None and start.error_kind.outcome_unknown
        assert time.monotonic() - began < 1.4
        # The registry started it anyway: only a status read tells.
        assert patient.status("g/app").status is RegistryImportStatus.PRE_IMPORT_IN_PROGRESS
        # A caller patient enough gets the answer, late.
        began = time.monotonic()
        late = patient.start_pre_import("g/other")
        assert late.started
        assert time.monotonic() - began >= 1.4
        process.configure(fault="slow:1.5", fault_calls="status")
        began = time.monotonic()
        assert_registry_fault([impatient.status("g/app")], ErrorKind.TIMEOUT)
        assert patient.status("g/app").status is RegistryImportStatus.PRE_IMPORT_IN_PROGRESS
        assert time.monotonic() - began >= 1.4
    assert process.report()["starts"] == {
        "g/app": {"pre": 1, "final": 0},
        "g/other": {"pre": 1, "final": 0},
    }


def test_a_garbage_fault_answers_200_with_html(process: SimulatorProcess) -> None:
    process.configure(fault="garbage")
    answer = httpx.put(f"{process.url}/gitlab/v1/import/g/app/", params={"import_type": "pre"})
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/html")
    with pytest.raises(ValueError):
        answer.json()
    assert probe(process.url).headers["content-type"].startswith("text/html")
    with RegistryClient(process.url) as client:
        results: list[ImportResult | StatusResult | CancelResult] = [
            client.start_pre_import("g/app"),
            client.status("g/app"),
            client.cancel("g/app"),
        ]
        # A 200 that is not the API's is no "already imported": the registry's fault.
        assert [(r.outcome, r.http_status) for r in results] == [(o, 200) for o in ERROR]
        assert_registry_fault(results, ErrorKind.BAD_ANSWER)
        assert client.probe().error_kind is ErrorKind.BAD_ANSWER
    report = process.report()
    assert report["starts"] == {} and report["answers"] == {}


def test_a_reset_fault_closes_the_connection_mid_answer(process: SimulatorProcess) -> None:
    process.configure(fault="reset")
    with RegistryClient(process.url) as client:
        results: list[ImportResult | StatusResult | CancelResult] = [
            client.start_pre_import("g/app"),
            client.status("g/app"),
            client.cancel("g/app"),
        ]
        for result in results:
            assert (result.outcome, result.http_status) == ("error", None), result
            assert "ProtocolError" in result.detail, result  # urllib3's: the answer broke off
        assert_registry_fault(results, ErrorKind.RESET)
        assert client.probe().error_kind is ErrorKind.RESET
        process.configure(fault=None)
        assert client.start_pre_import("g/app").started  # the server itself is fine
    report = process.report()
    assert report["starts"] == {"g/app": {"pre": 1, "final": 0}}
    assert report["faulted_answers"] == {
        f"{kind} reset": 1 for kind in ("start", "status", "cancel", "probe")
    }
    # The closed connections are no errors of the simulator's: no traceback logged.
    log_path: Path = process.log_path  # type: ignore[attr-defined]
    assert "Traceback" not in log_path.read_text()


def test_bad_faults_are_refused(process: SimulatorProcess) -> None:
    for bad, says in (
        ("status:404", "fault must be status:CODE"),
        ("slow:-1", "fault must be"),
        ("slow:soon", "fault must be"),
        ("explode", "fault must be"),
    ):
        with pytest.raises(ValueError, match=says):
            process.configure(fault=bad)
    with pytest.raises(ValueError, match="fault_calls must be 'all' or"):
        process.configure(fault_calls="start,push")
    with pytest.raises(ValueError, match="fault_seconds must not be negative"):
        process.configure(fault_seconds=-2)
    assert process.report()["fault"]["fault"] is None
    done = subprocess.run(
        [COMMAND, "simulator", "--fault", "status:200"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "registry-migrator simulator: fault must be status:CODE (401, 403 or 5xx),"
        " slow:SECONDS, garbage or reset, got 'status:200'"
    ]


def test_overlapping_imports_are_counted_with_the_guard_off(process: SimulatorProcess) -> None:
    process.configure(pre_import_seconds=[2, 2])
    with RegistryClient(process.url) as client:
        assert client.start_pre_import("g/app").started
        refused = client.start_pre_import("g/app")
        assert (refused.outcome, refused.http_status) == (ImportOutcome.ALREADY_BEING_IMPORTED, 425)
        assert process.report()["overlapping_imports"] == 0
        process.configure(guard_double_start=False)
        assert client.start_pre_import("g/app").started
        assert client.start_pre_import("g/app").started
    report = process.report()
    assert report["overlapping_imports"] == 2
    assert report["overlapping_repositories"] == ["g/app"]
    assert report["running_imports"] == 3


def test_a_stopped_registry_refuses_connections_and_comes_back_with_its_state(
    tmp_path: Path, make_receiver: MakeReceiver
) -> None:
    receiver = make_receiver()
    knobs = SimulatorConfig(
        pre_import_seconds=(0.05, 0.05), import_seconds=(1.5, 1.5), notify_url=receiver.url
    )
    state_file = tmp_path / "registry.state"
    registry = SimulatorProcess(
        knobs, log_path=str(tmp_path / "simulator.log"), state_file=str(state_file)
    )
    with registry:
        with RegistryClient(registry.url, timeout=1) as client:
            assert client.start_pre_import("g/done").started
            receiver.wait_for(1)
            assert client.start_import("g/running").started
            registry.configure(token="t0ken")  # a knob changed at runtime survives the outage
            assert registry.stop() == 0
            assert state_file.exists()

            down: list[ImportResult | StatusResult | CancelResult] = [
                client.start_pre_import("g/other"),
                client.status("g/done"),
                client.cancel("g/done"),
            ]
            assert_registry_fault(down, ErrorKind.CONNECT)
            assert client.probe().error_kind is ErrorKind.CONNECT

        registry.start()  # same port, same state
        with RegistryClient(registry.url, token="t0ken") as client:
            assert client.status("g/done").status is RegistryImportStatus.PRE_IMPORT_COMPLETE
            # The import that ran when the registry stopped goes on and is notified.
            assert client.status("g/running").status is RegistryImportStatus.IMPORT_IN_PROGRESS
            notes = receiver.wait_for(2, timeout=10)
        assert notes[1]["body"]["path"] == "g/running"
        assert notes[1]["body"]["status"] == "import_complete"
        report = wait_for_report(registry, lambda r: r["notifications"]["sent"] == 2)
    assert report["starts"] == {
        "g/done": {"pre": 1, "final": 0},
        "g/running": {"pre": 0, "final": 1},
    }
    assert report["outcomes"] == {"pre_import_complete": 1, "import_complete": 1}


def test_a_notification_undelivered_when_the_registry_stops_is_sent_after_it_restarts(
    tmp_path: Path, make_receiver: MakeReceiver
) -> None:
    receiver = make_receiver(default=503)
    knobs = SimulatorConfig(
        pre_import_seconds=(0.05, 0.05), notify_url=receiver.url, notify_backoff=0.05
    )
    registry = SimulatorProcess(knobs, state_file=str(tmp_path / "registry.state"))
    with registry:
        with RegistryClient(registry.url) as client:
            assert client.start_pre_import("g/app").started
        receiver.wait_for(2)  # refused, being retried
        registry.stop()
        receiver.default = 200
        # Counted before the start: the restarted process may deliver before start() returns.
        before = len(receiver.received)
        registry.start()
        receiver.wait_for(before + 1, timeout=10)
        report = wait_for_report(registry, lambda r: r["notifications"]["sent"] == 1)
    assert receiver.received[-1]["answered"] == 200
    assert receiver.received[-1]["body"]["status"] == "pre_import_complete"
    assert report["notifications"]["pending"] == 0


def test_a_bad_state_file_stops_the_command_with_one_line(tmp_path: Path) -> None:
    state_file = tmp_path / "registry.state"
    state_file.write_text("{not json")
    done = subprocess.run(
        [COMMAND, "simulator", "--port", "0", "--state-file", str(state_file)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"registry-migrator simulator: cannot read the state file {state_file}"
    ), lines


# -- the notifier's HTTP client --------------------------------------------------------------


async def _serve_answers(answers: list[bytes]) -> tuple[asyncio.Server, list[bytes], list[int]]:
    """A raw TCP server: the n-th request (over any connection) gets ``answers[n]``; records
    each request's head and which connection (by accept order) it came on."""
    heads: list[bytes] = []
    connections: list[int] = []
    accepted = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        mine = accepted
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                heads.append(head)
                connections.append(mine)
                writer.write(answers[len(heads) - 1])
                await writer.drain()
                answer = answers[len(heads) - 1]
                if b"Connection: close" in answer or answer.startswith(b"HTTP/1.0"):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, heads, connections


def test_notify_client_reads_each_kind_of_answer_and_reuses_connections() -> None:
    answers = [
        b'HTTP/1.1 202 Accepted\r\nContent-Length: 15\r\n\r\n{"accepted":1}\n',
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nab\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 503 Busy\r\nContent-Length: 2\r\nConnection: close\r\n\r\nno",
        b"HTTP/1.0 401 Unauthorized\r\n\r\nbody to the close",
        b"SMTP ready\r\n\r\n",
    ]

    async def scenario() -> tuple[list[object], list[bytes], list[int]]:
        server, heads, connections = await _serve_answers(answers)
        port = server.sockets[0].getsockname()[1]
        client = NotifyClient(f"http://127.0.0.1:{port}/base", keep=2)
        got: list[object] = []
        for _ in answers:
            try:
                got.append(await client.put_json("/x", {"é": 1}, {"Authorization": "s"}, timeout=5))
            except NotifyError as error:
                got.append(error.kind)
        await client.aclose()
        server.close()
        return got, heads, connections

    got, heads, connections = asyncio.run(scenario())
    assert got == [202, 200, 503, 401, "RemoteProtocolError"]
    # Kept alive through the 202 and the chunked 200; a new connection after each close.
    assert connections == [1, 1, 1, 2, 3]
    assert heads[0].startswith(b"PUT /x HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"Authorization: s\r\n" in heads[0] and b"Content-Type: application/json" in heads[0]


def test_notify_client_names_a_refused_connection_and_a_timeout() -> None:
    async def scenario() -> list[str]:
        silent = await asyncio.start_server(lambda r, w: asyncio.sleep(10), "127.0.0.1", 0)
        port = silent.sockets[0].getsockname()[1]
        kinds = []
        for url in (f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{port}"):
            try:
                await NotifyClient(url, keep=1).put_json("/x", {}, {}, timeout=0.3)
            except NotifyError as error:
                kinds.append(error.kind)
        silent.close()
        return kinds

    assert asyncio.run(scenario()) == ["ConnectError", "ReadTimeout"]
