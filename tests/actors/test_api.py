"""The notification API as a real process: every answer it gives, and what 202 means."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest

from devtools.launcher import LocalMigration
from migration.registry import RegistryClient
from migration.states import Event, State
from migration.store import Store
from tests.actors.conftest import wait_until

BODY = {"name": "app", "path": "api-group/app", "status": "pre_import_complete", "detail": ""}


@pytest.fixture
def api_run(
    clean_store: Store, make_migration: Callable[..., LocalMigration]
) -> Iterator[LocalMigration]:
    """The API (and a simulator) with no worker: what it queues stays in RabbitMQ."""
    run = make_migration(workers=0, scheduler=False, secret="api-test-secret")
    run.start()
    yield run


def _put(run: LocalMigration, path: str, body: object, secret: str | None) -> httpx.Response:
    headers = {"Authorization": secret} if secret is not None else {}
    return httpx.put(
        f"{run.api_url}/notifications/registry/repositories/{path}/status",
        json=body,
        headers=headers,
        timeout=10,
    )


def test_notification_answers(api_run: LocalMigration, clean_store: Store) -> None:
    run = api_run
    secret = "api-test-secret"
    waiting = clean_store.add_repository("api-group/app")
    idle = clean_store.add_repository("api-group/idle")
    claimed = clean_store.claim(
        waiting,
        expected_state=State.DEFAULT,
        event=Event.START_PRE_IMPORT,
        token=1,
        actor="test",
        message_id=None,
    )
    assert claimed.ok

    assert _put(run, "api-group/app", BODY, None).status_code == 401
    assert _put(run, "api-group/app", BODY, "wrong").status_code == 401
    assert _put(run, "api-group/app", BODY, secret + "x").status_code == 401
    assert _put(run, "api-group/app", {**BODY, "status": "bogus"}, secret).status_code == 422
    assert _put(run, "api-group/app", {"path": "api-group/app"}, secret).status_code == 422
    mismatch = _put(run, "api-group/app", {**BODY, "path": "api-group/other"}, secret)
    assert mismatch.status_code == 422
    in_progress = {**BODY, "status": "pre_import_in_progress"}
    assert _put(run, "api-group/app", in_progress, secret).status_code == 422
    unknown = {**BODY, "path": "api-group/nope"}
    assert _put(run, "api-group/nope", unknown, secret).status_code == 404
    not_awaiting = {**BODY, "path": "api-group/idle", "status": "import_complete"}
    assert _put(run, "api-group/idle", not_awaiting, secret).status_code == 409
    wrong_phase = {**BODY, "status": "import_complete"}
    assert _put(run, "api-group/app", wrong_phase, secret).status_code == 409
    # Nothing refused was queued.
    assert run.queue_depth() == 0
    assert clean_store.get(idle).migration_state is State.DEFAULT  # type: ignore[union-attr]

    accepted = _put(run, "api-group/app", BODY, secret)
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["container_repository_id"] == waiting
    # 202 means RabbitMQ has it (publisher confirms): it is in the queue right now.
    assert run.queue_depth() == 1
    # Applying it is the workers' job, not the API's.
    assert clean_store.get(waiting).migration_state is State.PRE_IMPORTING  # type: ignore[union-attr]

    assert httpx.get(f"{run.api_url}/healthz", timeout=5).status_code == 200
    ready = httpx.get(f"{run.api_url}/readyz", timeout=10)
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"postgresql": "ok", "etcd": "ok", "rabbitmq": "ok"}
    metrics = httpx.get(f"{run.api_url}/metrics", timeout=10).text
    assert 'registry_migrator_notifications_total{outcome="accepted"} 1.0' in metrics
    assert 'registry_migrator_notifications_total{outcome="unauthorized"} 3.0' in metrics
    assert 'registry_migrator_repositories{state="pre_importing"} 1.0' in metrics
    assert "registry_migrator_repositories_eligible 1.0" in metrics  # idle; app is in flight
    assert "registry_migrator_migration_enabled 1.0" in metrics
    queue = run.env["MIGRATOR_QUEUE_NAME"]
    # The accepted notification waits in the queue: the scrape reads RabbitMQ's count.
    assert f'registry_migrator_queue_messages{{queue="{queue}"}} 1.0' in metrics
    assert f'registry_migrator_dead_letters{{queue="{queue}.XQ"}} 0.0' in metrics
    assert "registry_migrator_metrics_scrape_errors_total{" not in metrics  # no read failed


def test_queued_notification_is_applied_by_a_worker(
    clean_store: Store, make_migration: Callable[..., LocalMigration]
) -> None:
    """The 202'd notification is applied: pre_import_done, then the final import starts.

    The pre-import really runs at the simulator, which sends the notification through the
    API itself: the worker confirms a notification's status with the registry before it
    acts, so a notification the registry never sent is not applied.
    """
    repository_id = clean_store.add_repository("api-group/applied")
    assert clean_store.claim(
        repository_id,
        expected_state=State.DEFAULT,
        event=Event.START_PRE_IMPORT,
        token=1,
        actor="test",
        message_id=None,
    ).ok
    clean_store.update_settings(enabled=False)  # no enqueuer run may start anything else
    run = make_migration(workers=1, threads=2, scheduler=False, secret="s")
    run.start()
    with RegistryClient(run.simulator_url) as registry:
        assert registry.start_pre_import("api-group/applied").started

    wait_until(
        lambda: (
            clean_store.get(repository_id).migration_state  # type: ignore[union-attr]
            in (State.IMPORTING, State.IMPORT_DONE)
        ),
        timeout=30,
        what="the notification applied",
    )
    report = run.report()
    assert report["starts"]["api-group/applied"]["final"] == 1
    assert report["notifications"]["sent"] >= 1
    accepted = run.log_events("api", "notification_accepted")
    assert any(e.get("container_repository_path") == "api-group/applied" for e in accepted)


def test_a_repeated_notification_is_a_no_op_not_a_conflict(
    api_run: LocalMigration, clean_store: Store
) -> None:
    """The registry retries non-2xx deliveries: a notification whose step is done answers
    200 (nothing queued); one that contradicts our state still gets 409."""
    run, secret = api_run, "api-test-secret"
    done = clean_store.add_repository("api-group/done")
    for event, state in (
        (Event.START_PRE_IMPORT, State.DEFAULT),
        (Event.FINISH_PRE_IMPORT, State.PRE_IMPORTING),
        (Event.START_IMPORT, State.PRE_IMPORT_DONE),
        (Event.FINISH_IMPORT, State.IMPORTING),
    ):
        write = clean_store.claim if event is Event.START_PRE_IMPORT else clean_store.step
        assert write(
            done, expected_state=state, event=event, token=1, actor="test", message_id=None
        ).ok
    body = {"name": "done", "path": "api-group/done", "status": "import_complete", "detail": ""}
    repeated = _put(run, "api-group/done", body, secret)
    assert repeated.status_code == 200, repeated.text
    assert repeated.json()["already_applied"] is True
    contradicting = _put(run, "api-group/done", {**body, "status": "import_failed"}, secret)
    assert contradicting.status_code == 409
    # A pre-import failure already applied (aborted in pre_importing): 200 as well.
    aborted = clean_store.add_repository("api-group/aborted")
    assert clean_store.claim(
        aborted, expected_state=State.DEFAULT, event=Event.START_PRE_IMPORT, token=1,
        actor="test", message_id=None,
    ).ok  # fmt: skip
    assert clean_store.step(
        aborted, expected_state=State.PRE_IMPORTING, event=Event.ABORT_IMPORT, token=1,
        actor="test", message_id=None,
    ).ok  # fmt: skip
    failed = {"name": "aborted", "path": "api-group/aborted", "status": "pre_import_failed"}
    assert _put(run, "api-group/aborted", failed, secret).status_code == 200
    assert (
        _put(run, "api-group/aborted", {**failed, "status": "import_failed"}, secret).status_code
        == 409
    )
    assert run.queue_depth() == 0
    metrics = httpx.get(f"{run.api_url}/metrics", timeout=10).text
    assert 'registry_migrator_notifications_total{outcome="already_applied"} 2.0' in metrics


def test_a_stale_notification_is_ignored_not_dead_lettered(
    clean_store: Store, make_migration: Callable[..., LocalMigration]
) -> None:
    """A notification the registry no longer confirms (the retry's import still runs) is
    ignored. It used to crash the handler (registry_status given twice) and be
    dead-lettered. (A first attempt's notification is not checked: no earlier one exists.)"""
    repository_id = clean_store.add_repository("api-group/stale")
    for token, (expected, event) in enumerate(
        [(State.DEFAULT, Event.START_PRE_IMPORT), (State.PRE_IMPORTING, Event.ABORT_IMPORT),
         (State.IMPORT_ABORTED, Event.RETRY_PRE_IMPORT)], start=1,
    ):  # fmt: skip
        write = clean_store.claim if event is not Event.ABORT_IMPORT else clean_store.step
        assert write(repository_id, expected_state=expected, event=event, token=token,
                     actor="test", message_id=None).ok  # fmt: skip
    clean_store.update_settings(enabled=False)
    run = make_migration(
        workers=1, threads=2, scheduler=False, secret="s",
        simulator_args=["--pre-import-seconds", "60", "60"],
    )  # fmt: skip
    run.start()
    with RegistryClient(run.simulator_url) as registry:
        assert registry.start_pre_import("api-group/stale").started
    body = {"name": "stale", "path": "api-group/stale", "status": "pre_import_failed"}
    assert _put(run, "api-group/stale", body, "s").status_code == 202
    wait_until(
        lambda: run.log_events("worker-0", "registry_notification_handled"),
        timeout=30,
        what="the notification handled",
    )
    [handled] = run.log_events("worker-0", "registry_notification_handled")
    assert handled["step_outcome"] == "ignored"
    assert handled["notified_status"] == "pre_import_failed"
    assert handled["registry_status"] == "pre_import_in_progress"
    assert clean_store.get(repository_id).migration_state is State.PRE_IMPORTING  # type: ignore[union-attr]
    assert run.queue_depth() == 0
