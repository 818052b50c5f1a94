"""The migration steps against a real PostgreSQL and the simulator over real HTTP.

Each test drives :class:`migration.migrator.Migrator` the way an actor does under a lease
(a fencing token per step) and checks the row, the events log and the registry's record.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from devtools.simulator import SimulatorConfig, SimulatorServer
from migration.migrator import (
    AbortCause,
    Migrator,
    RegistryUnavailable,
    StepOutcome,
    Writer,
    status_matches_state,
)
from migration.registry import RegistryClient, RegistryImportStatus
from migration.states import SkipReason, State
from migration.store import Store
from tests.fixtures import wait_until
from tests.registry.test_client import wait_for_status

SLOW_IMPORTS = SimulatorConfig(pre_import_seconds=(30, 30), import_seconds=(30, 30))


@pytest.fixture
def simulator() -> Iterator[SimulatorServer]:
    with SimulatorServer(SLOW_IMPORTS) as server:
        yield server


@pytest.fixture
def migrator(clean_store: Store, simulator: SimulatorServer) -> Iterator[Migrator]:
    with RegistryClient(simulator.url, timeout=2, too_many_retries=1, backoff=0.01) as registry:
        yield Migrator(clean_store, registry)


class Tokens:
    """Fencing tokens that only grow, as etcd's create revisions do."""

    def __init__(self) -> None:
        self.last = 100

    def writer(self) -> Writer:
        self.last += 1
        return Writer(token=self.last, actor="test", message_id=f"m{self.last}")


@pytest.fixture
def tokens() -> Tokens:
    return Tokens()


def add(store: Store, path: str, *, tags: int = 3) -> int:
    return store.add_repository(
        path, tags_count=tags, created_at=datetime.now(UTC) - timedelta(days=1)
    )


def current(store: Store, repository_id: int):  # type: ignore[no-untyped-def]
    repository = store.get(repository_id)
    assert repository is not None
    return repository


def unreachable_registry() -> RegistryClient:
    """A client of a registry that does not answer (a closed port), failing fast."""
    return RegistryClient("http://127.0.0.1:1", timeout=0.5, too_many_retries=0)


def claim_without_registry(store: Store, repo_id: int, tokens: Tokens) -> None:
    """Claim as a worker does, then stop before the registry call (as if killed there)."""
    claimed = store.claim(
        repo_id, expected_state=State.DEFAULT, event="start_pre_import",
        token=tokens.writer().token, actor="test", message_id=None,
    )  # fmt: skip
    assert claimed.ok


def test_start_claims_and_starts_the_pre_import(
    migrator: Migrator, tokens: Tokens, simulator: SimulatorServer
) -> None:
    store = migrator.store
    repo_id = add(store, "group/app/image")
    report = migrator.start(current(store, repo_id), store.settings(), tokens.writer())
    assert report.outcome is StepOutcome.STARTED
    assert report.repository.migration_state is State.PRE_IMPORTING
    assert report.repository.fencing_token == tokens.last
    assert simulator.report()["starts"]["group/app/image"]["pre"] == 1


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("group/native-app/image", SkipReason.NATIVE_IMPORT),
        ("group/missing-app/image", SkipReason.NOT_FOUND),
    ],
)
def test_start_finishes_native_and_missing_as_done_with_the_reason(
    migrator: Migrator, tokens: Tokens, path: str, reason: SkipReason
) -> None:
    """As the reference's finish_import_as: no more work, so done, the reason recorded."""
    store = migrator.store
    repo_id = add(store, path)
    report = migrator.start(current(store, repo_id), store.settings(), tokens.writer())
    assert report.outcome is StepOutcome.FINISHED
    assert report.fields["finish_reason"] == reason.value
    row = current(store, repo_id)
    assert row.migration_state is State.IMPORT_DONE
    assert row.migration_skipped_reason is reason
    assert row.migration_import_done_at is not None
    assert store.in_flight() == 0


def test_start_skips_too_many_tags_without_calling_the_registry(
    migrator: Migrator, tokens: Tokens, simulator: SimulatorServer
) -> None:
    store = migrator.store
    store.update_settings(max_tags_count=10)
    repo_id = add(store, "group/big/image", tags=11)
    report = migrator.start(current(store, repo_id), store.settings(), tokens.writer())
    assert report.outcome is StepOutcome.SKIPPED
    assert report.fields["tags_count_too_high"] is True
    assert current(store, repo_id).migration_skipped_reason is SkipReason.TOO_MANY_TAGS
    assert "group/big/image" not in simulator.report()["starts"]


def test_too_many_imports_undoes_the_claim_without_a_retry(
    migrator: Migrator, tokens: Tokens, simulator: SimulatorServer
) -> None:
    store = migrator.store
    simulator.configure(max_concurrent_imports=1)
    first, second = add(store, "group/one/image"), add(store, "group/two/image")
    assert (
        migrator.start(current(store, first), store.settings(), tokens.writer()).outcome
        is StepOutcome.STARTED
    )
    report = migrator.start(current(store, second), store.settings(), tokens.writer())
    assert report.outcome is StepOutcome.UNDONE
    row = current(store, second)
    assert row.migration_state is State.DEFAULT
    assert row.migration_retries_count == 0
    assert store.in_flight() == 1


def _events(database_url: str, repo_id: int) -> list[tuple[str, bool, dict]]:  # type: ignore[type-arg]
    with psycopg.connect(database_url) as conn:
        return [
            (event, accepted, detail)
            for event, accepted, detail in conn.execute(
                "SELECT event, accepted, detail FROM migration_events WHERE repository_id = %s"
                " ORDER BY id",
                (repo_id,),
            )
        ]


def _starts(simulator: SimulatorServer, path: str) -> int:
    return sum(
        1
        for e in simulator.report(events=True)["events"]
        if e.get("action") == "start" and e.get("path") == path
    )


def test_a_registry_5xx_undoes_the_claim_charges_nothing_and_backs_off(
    migrator: Migrator, tokens: Tokens, simulator: SimulatorServer, database_url: str
) -> None:
    """Invariant 7: a 503 is the registry's failure, never the repository's."""
    store = migrator.store
    repo_id = add(store, "group/flaky/image")
    simulator.configure(start_error_rate=1.0)
    report = migrator.start(current(store, repo_id), store.settings(), tokens.writer())
    assert report.outcome is StepOutcome.REGISTRY_FAULT
    assert report.fields["registry_unavailable"] is True
    row = current(store, repo_id)
    assert (row.migration_state, row.migration_retries_count) == (State.DEFAULT, 0)
    assert row.registry_failures == 1 and row.registry_not_before is not None
    # 5 s doubled per fault, times 0.5-1: the first backoff is 2.5-5 s from now.
    wait = (row.registry_not_before - datetime.now(UTC)).total_seconds()
    assert 1.5 < wait <= 5.5
    assert "503" in (row.registry_last_error or "") or "server" in (row.registry_last_error or "")
    [claim, undo] = _events(database_url, repo_id)
    assert (claim[0], undo[0]) == ("start_pre_import", "undo_claim")
    assert undo[2]["fault_class"] == "registry" and undo[2]["error_kind"] == "server"
    # Backing off: not a candidate until registry_not_before.
    assert repo_id not in [c.id for c in store.candidates(store.settings(), limit=10)]
    # A second fault in a row doubles the backoff (before the jitter: 10 s).
    again = migrator.start(current(store, repo_id), store.settings(), tokens.writer())
    assert again.outcome is StepOutcome.REGISTRY_FAULT
    assert current(store, repo_id).registry_failures == 2
    assert current(store, repo_id).migration_retries_count == 0
    # The registry answers again: the start goes through and the backoff is forgotten.
    simulator.configure(start_error_rate=0.0)
    started = migrator.start(current(store, repo_id), store.settings(), tokens.writer())
    assert started.outcome is StepOutcome.STARTED
    row = current(store, repo_id)
    assert (row.registry_failures, row.registry_not_before, row.registry_last_error) == (
        0, None, None,
    )  # fmt: skip


def test_a_refused_token_charges_nothing(
    migrator: Migrator, tokens: Tokens, simulator: SimulatorServer
) -> None:
    store = migrator.store
    repo_id = add(store, "group/locked/image")
    simulator.configure(token="not-ours")
    report = migrator.start(current(store, repo_id), store.settings(), tokens.writer())
    assert report.outcome is StepOutcome.REGISTRY_FAULT
    assert report.fields["registry_http_status"] == 401
    row = current(store, repo_id)
    assert (row.migration_state, row.migration_retries_count) == (State.DEFAULT, 0)


def test_a_start_answered_after_the_timeout_is_reconciled_not_failed(
    clean_store: Store, tokens: Tokens, simulator: SimulatorServer
) -> None:
    """The registry started it, the answer came too late: the repository is pre_importing."""
    simulator.configure(start_latency_seconds=1.5)
    with RegistryClient(simulator.url, timeout=0.5, too_many_retries=0) as registry:
        migrator = Migrator(clean_store, registry)
        repo_id = add(clean_store, "group/slow/image")
        report = migrator.start(
            current(clean_store, repo_id), clean_store.settings(), tokens.writer()
        )
        if report.outcome is StepOutcome.REGISTRY_FAULT:
            # The status read raced the registry's own start (it answers after 1.5 s):
            # undone, nothing charged; the next start finds it running (425) and aligns.
            assert current(clean_store, repo_id).migration_retries_count == 0
            # Wait for the registry's delayed start to have happened (its event is
            # recorded once decided), not for a guessed time.
            wait_until(
                lambda: _starts(simulator, "group/slow/image") >= 1,
                timeout=10, what="the registry's delayed start",
            )  # fmt: skip
            report = migrator.start(
                current(clean_store, repo_id), clean_store.settings(), tokens.writer()
            )
            assert report.outcome in (StepOutcome.STARTED, StepOutcome.ALIGNED)
        else:
            assert report.outcome is StepOutcome.STARTED
    row = current(clean_store, repo_id)
    assert (row.migration_state, row.migration_retries_count) == (State.PRE_IMPORTING, 0)


def test_a_retry_takes_over_an_import_the_registry_still_runs(
    migrator: Migrator, tokens: Tokens, simulator: SimulatorServer, database_url: str
) -> None:
    """An aborted repository whose import the registry still runs: aligned, nothing sent,
    nothing charged (it used to get 409, be aborted again and end too_many_retries)."""
    store = migrator.store
    repo_id = add(store, "group/busy/image")
    path = "group/busy/image"
    started = migrator.start(current(store, repo_id), store.settings(), tokens.writer())
    assert started.outcome is StepOutcome.STARTED
    aborted = migrator.abort(  # as the guard does, while the registry goes on
        current(store, repo_id), tokens.writer(), "test", AbortCause.OPERATOR
    )
    assert aborted.repository.migration_state is State.IMPORT_ABORTED
    starts_before = _starts(simulator, path)
    retried = migrator.retry(current(store, repo_id), tokens.writer())
    assert retried.outcome is StepOutcome.ALIGNED
    row = current(store, repo_id)
    assert (row.migration_state, row.migration_retries_count) == (State.PRE_IMPORTING, 1)
    assert _starts(simulator, path) == starts_before
    assert _events(database_url, repo_id)[-1][0] == "align_pre_importing"


def test_a_retry_that_cannot_read_the_registry_claims_nothing(
    clean_store: Store, tokens: Tokens
) -> None:
    repo_id = add(clean_store, "group/dark/image")
    claim_without_registry(clean_store, repo_id, tokens)
    with unreachable_registry() as registry:
        migrator = Migrator(clean_store, registry)
        migrator.abort(current(clean_store, repo_id), tokens.writer(), "test", AbortCause.OPERATOR)
        report = migrator.retry(current(clean_store, repo_id), tokens.writer())
    assert report.outcome is StepOutcome.REGISTRY_FAULT
    row = current(clean_store, repo_id)
    assert (row.migration_state, row.migration_retries_count) == (State.IMPORT_ABORTED, 1)
    assert row.registry_not_before is not None


def test_full_path_through_notifications(
    migrator: Migrator, tokens: Tokens, simulator: SimulatorServer
) -> None:
    store = migrator.store
    simulator.configure(pre_import_seconds=[0.05, 0.05], import_seconds=[0.05, 0.05])
    repo_id = add(store, "group/happy/image")
    migrator.start(current(store, repo_id), store.settings(), tokens.writer())
    # The simulated pre-import has ended (its notification goes nowhere): the registry says so.
    wait_for_status(
        migrator.registry, "group/happy/image", RegistryImportStatus.PRE_IMPORT_COMPLETE
    )
    report = migrator.on_registry_status(
        current(store, repo_id), RegistryImportStatus.PRE_IMPORT_COMPLETE, tokens.writer()
    )
    assert report.outcome is StepOutcome.STARTED
    assert report.repository.migration_state is State.IMPORTING
    wait_for_status(migrator.registry, "group/happy/image", RegistryImportStatus.IMPORT_COMPLETE)
    report = migrator.on_registry_status(
        current(store, repo_id), RegistryImportStatus.IMPORT_COMPLETE, tokens.writer()
    )
    assert report.outcome is StepOutcome.FINISHED
    assert current(store, repo_id).migration_state is State.IMPORT_DONE
    events = [e for e in store.events(repo_id) if e.accepted]
    assert [e.to_state for e in events] == [
        "pre_importing",
        "pre_import_done",
        "importing",
        "import_done",
    ]


def test_a_notification_that_does_not_fit_the_state_changes_nothing(
    migrator: Migrator, tokens: Tokens
) -> None:
    store = migrator.store
    repo_id = add(store, "group/idle/image")
    report = migrator.on_registry_status(
        current(store, repo_id), RegistryImportStatus.IMPORT_COMPLETE, tokens.writer()
    )
    assert report.outcome is StepOutcome.IGNORED
    assert current(store, repo_id).migration_state is State.DEFAULT
    assert store.events(repo_id) == []
    assert status_matches_state(RegistryImportStatus.PRE_IMPORT_COMPLETE, State.PRE_IMPORT_DONE)
    assert not status_matches_state(RegistryImportStatus.IMPORT_FAILED, State.PRE_IMPORTING)


def test_a_stale_holder_is_refused_after_a_newer_one_wrote(
    migrator: Migrator, tokens: Tokens
) -> None:
    store = migrator.store
    repo_id = add(store, "group/contended/image")
    old = tokens.writer()
    new = tokens.writer()
    assert (
        migrator.start(current(store, repo_id), store.settings(), new).outcome
        is StepOutcome.STARTED
    )
    # The old holder (its lease expired during a pause) wakes up and reports a failure.
    report = migrator.on_registry_status(
        current(store, repo_id), RegistryImportStatus.PRE_IMPORT_FAILED, old, verify=False
    )
    assert report.outcome is StepOutcome.REFUSED
    assert current(store, repo_id).migration_state is State.PRE_IMPORTING
    refused = [e for e in store.events(repo_id) if not e.accepted]
    assert refused and refused[-1].detail["reason"] == "stale_token"


def test_a_stale_notification_does_not_abort_the_running_attempt(
    migrator: Migrator, tokens: Tokens, simulator: SimulatorServer
) -> None:
    """A late or repeated ``pre_import_failed`` of the first attempt arrives while the retry
    runs: applying it would abort that attempt and start a second import."""
    store = migrator.store
    path = "group/retried/fail-once"
    simulator.configure(pre_import_seconds=[0.05, 0.05])
    repo_id = add(store, path)
    migrator.start(current(store, repo_id), store.settings(), tokens.writer())
    wait_for_status(migrator.registry, path, RegistryImportStatus.PRE_IMPORT_FAILED)
    failed = migrator.on_registry_status(
        current(store, repo_id), RegistryImportStatus.PRE_IMPORT_FAILED, tokens.writer()
    )
    assert failed.outcome is StepOutcome.ABORTED
    simulator.configure(pre_import_seconds=[30, 30])
    assert migrator.retry(current(store, repo_id), tokens.writer()).outcome is StepOutcome.STARTED
    assert current(store, repo_id).migration_pre_import_starts == 2
    report = migrator.on_registry_status(
        current(store, repo_id), RegistryImportStatus.PRE_IMPORT_FAILED, tokens.writer()
    )
    assert report.outcome is StepOutcome.IGNORED
    assert report.fields["registry_status"] == "pre_import_in_progress"
    row = current(store, repo_id)
    assert (row.migration_state, row.migration_retries_count) == (State.PRE_IMPORTING, 1)


def test_a_first_attempts_notification_is_applied_without_asking_the_registry(
    clean_store: Store, tokens: Tokens
) -> None:
    """The phase was started once: no earlier attempt can have sent it, so the registry is
    not asked (it is down here, and the notification is applied all the same)."""
    with unreachable_registry() as registry:
        migrator = Migrator(clean_store, registry)
        repo_id = add(clean_store, "group/first-attempt/image")
        claim_without_registry(clean_store, repo_id, tokens)
        assert current(clean_store, repo_id).migration_pre_import_starts == 1
        report = migrator.on_registry_status(
            current(clean_store, repo_id), RegistryImportStatus.PRE_IMPORT_FAILED, tokens.writer()
        )
    assert report.outcome is StepOutcome.ABORTED
    row = current(clean_store, repo_id)
    assert (row.migration_state, row.migration_aborted_in_state, row.migration_retries_count) == (
        State.IMPORT_ABORTED, State.PRE_IMPORTING, 1,
    )  # fmt: skip


@pytest.mark.parametrize("second_start", ["retry", "requeue"])
def test_a_retried_attempts_notification_is_not_applied_unchecked_when_the_registry_is_down(
    clean_store: Store, tokens: Tokens, second_start: str
) -> None:
    """The phase was started before (a retry, or a requeue, which resets the retries count
    but not the starts): the notification may be an earlier attempt's, and the registry
    cannot say. Nothing is applied; the caller tries again later."""
    with unreachable_registry() as registry:
        migrator = Migrator(clean_store, registry)
        repo_id = add(clean_store, "group/unverified/image")
        claim_without_registry(clean_store, repo_id, tokens)
        aborted = migrator.on_registry_status(
            current(clean_store, repo_id), RegistryImportStatus.PRE_IMPORT_FAILED, tokens.writer()
        )
        assert aborted.outcome is StepOutcome.ABORTED
        if second_start == "requeue":
            assert len(clean_store.requeue(state=State.IMPORT_ABORTED)) == 1
            event, from_state = "start_pre_import", State.DEFAULT
        else:
            event, from_state = "retry_pre_import", State.IMPORT_ABORTED
        assert clean_store.claim(repo_id, expected_state=from_state, event=event,
                                 token=tokens.writer().token, actor="test",
                                 message_id=None).ok  # fmt: skip
        assert current(clean_store, repo_id).migration_pre_import_starts == 2
        with pytest.raises(RegistryUnavailable):
            migrator.on_registry_status(
                current(clean_store, repo_id),
                RegistryImportStatus.PRE_IMPORT_FAILED,
                tokens.writer(),
            )
    assert current(clean_store, repo_id).migration_state is State.PRE_IMPORTING


def _age_step(database_url: str, repo_id: int, seconds: float) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE container_repositories SET last_step_at = now() - make_interval(secs => %s),"
            " migration_pre_import_started_at = now() - make_interval(secs => %s) WHERE id = %s",
            (seconds, seconds, repo_id),
        )


def test_guard_cancels_a_pre_import_past_its_timeout_then_aborts(
    migrator: Migrator, tokens: Tokens, simulator: SimulatorServer, database_url: str
) -> None:
    store = migrator.store
    store.update_settings(pre_import_timeout=60, max_step_duration=30, max_retries=3)
    repo_id = add(store, "group/hung/image")
    migrator.start(current(store, repo_id), store.settings(), tokens.writer())
    _age_step(database_url, repo_id, 120)
    [stale] = store.stale(store.settings())
    report = migrator.reconcile_stale(stale, store.settings(), tokens.writer())
    assert report.outcome is StepOutcome.ABORTED
    assert report.fields["canceled"] == "accepted"
    assert current(store, repo_id).migration_state is State.IMPORT_ABORTED
    cancels = [e for e in simulator.report(events=True)["events"] if e.get("action") == "cancel"]
    assert cancels, "the guard did not cancel the running pre-import"


def test_guard_skips_as_canceled_when_the_retries_are_used_up(
    migrator: Migrator, tokens: Tokens, database_url: str
) -> None:
    store = migrator.store
    store.update_settings(pre_import_timeout=60, max_step_duration=30, max_retries=1)
    repo_id = add(store, "group/hopeless/image")
    migrator.start(current(store, repo_id), store.settings(), tokens.writer())
    _age_step(database_url, repo_id, 120)
    report = migrator.reconcile_stale(current(store, repo_id), store.settings(), tokens.writer())
    assert report.outcome is StepOutcome.SKIPPED
    assert current(store, repo_id).migration_skipped_reason is SkipReason.MIGRATION_CANCELED


def test_guard_undoes_a_claim_the_registry_never_heard_of(
    migrator: Migrator, tokens: Tokens, database_url: str
) -> None:
    """A worker killed between its claim and its registry call leaves such a repository:
    its claim is undone, no retry charged (the death was not the repository's doing)."""
    store = migrator.store
    repo_id = add(store, "group/orphan/image")
    claim_without_registry(store, repo_id, tokens)
    _age_step(database_url, repo_id, 600)
    report = migrator.reconcile_stale(current(store, repo_id), store.settings(), tokens.writer())
    assert report.outcome is StepOutcome.UNDONE
    row = current(store, repo_id)
    assert (row.migration_state, row.migration_retries_count) == (State.DEFAULT, 0)
    assert _events(database_url, repo_id)[-1][2]["fault_class"] == "interrupted"


def test_guard_finishes_a_repository_the_registry_holds_natively(
    migrator: Migrator, tokens: Tokens, database_url: str
) -> None:
    store = migrator.store
    repo_id = add(store, "group/native-orphan/image")
    claim_without_registry(store, repo_id, tokens)
    _age_step(database_url, repo_id, 600)
    report = migrator.reconcile_stale(current(store, repo_id), store.settings(), tokens.writer())
    assert report.outcome is StepOutcome.FINISHED
    row = current(store, repo_id)
    assert (row.migration_state, row.migration_skipped_reason) == (
        State.IMPORT_DONE, SkipReason.NATIVE_IMPORT,
    )  # fmt: skip


def test_guard_leaves_things_alone_when_the_registry_is_unreachable(
    clean_store: Store, tokens: Tokens
) -> None:
    with unreachable_registry() as registry:
        migrator = Migrator(clean_store, registry)
        repo_id = add(clean_store, "group/unknown/image")
        claim_without_registry(clean_store, repo_id, tokens)
        report = migrator.reconcile_stale(
            current(clean_store, repo_id), clean_store.settings(), tokens.writer()
        )
    assert report.outcome is StepOutcome.REGISTRY_FAULT
    assert current(clean_store, repo_id).migration_state is State.PRE_IMPORTING


def test_guard_cancels_and_aborts_a_repository_whose_status_it_does_not_know(
    migrator: Migrator, tokens: Tokens, simulator: SimulatorServer, database_url: str
) -> None:
    """A 200 with a status outside the API's list is the repository's, not the registry's:
    the guard cancels and aborts it, as the reference does, instead of keeping its slot."""
    store = migrator.store
    repo_id = add(store, "group/unknown-status/image")
    claim_without_registry(store, repo_id, tokens)
    _age_step(database_url, repo_id, 600)
    report = migrator.reconcile_stale(current(store, repo_id), store.settings(), tokens.writer())
    assert report.outcome is StepOutcome.ABORTED
    assert report.fields["registry_status"] == "unknown_status"
    assert "canceled" in report.fields
    row = current(store, repo_id)
    assert (row.migration_state, row.migration_retries_count) == (State.IMPORT_ABORTED, 1)
    assert _events(database_url, repo_id)[-1][2]["cause"] == "registry_state_mismatch"
    cancels = [e for e in simulator.report(events=True)["events"] if e.get("action") == "cancel"]
    assert cancels, "the guard did not cancel before aborting"


def test_guard_postpones_when_the_registry_answers_5xx(
    migrator: Migrator, tokens: Tokens, database_url: str
) -> None:
    store = migrator.store
    repo_id = add(store, "group/server-error/image")
    claim_without_registry(store, repo_id, tokens)
    _age_step(database_url, repo_id, 600)
    report = migrator.reconcile_stale(current(store, repo_id), store.settings(), tokens.writer())
    assert report.outcome is StepOutcome.REGISTRY_FAULT
    row = current(store, repo_id)
    assert (row.migration_state, row.migration_retries_count) == (State.PRE_IMPORTING, 0)


def _pre_import_done(store: Store, simulator: SimulatorServer, path: str, tokens: Tokens) -> int:
    """A repository whose pre-import ran at the registry and is pre_import_done here, as
    after a final start whose answer was lost and whose claim was undone."""
    repo_id = add(store, path)
    claim_without_registry(store, repo_id, tokens)
    assert store.step(repo_id, expected_state=State.PRE_IMPORTING, event="finish_pre_import",
                      token=tokens.writer().token, actor="test", message_id=None).ok  # fmt: skip
    with RegistryClient(simulator.url) as registry:
        assert registry.start_pre_import(path).started
        _wait(lambda: registry.status(path).status is RegistryImportStatus.PRE_IMPORT_COMPLETE)
        assert registry.start_import(path).started  # the start the worker never heard of
    return repo_id


def _wait(predicate, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_an_import_finished_after_its_start_was_undone_is_done_not_charged(
    migrator: Migrator, tokens: Tokens, simulator: SimulatorServer
) -> None:
    """The final start's answer was lost (and the status read too): the claim was undone to
    pre_import_done, but the registry imported it. Its import_complete notification, or the
    guard, finishes it; neither aborts it (a chaos run charged such a repository a retry)."""
    store = migrator.store
    simulator.configure(pre_import_seconds=[0.05, 0.05], import_seconds=[0.05, 0.05])
    repo_id = _pre_import_done(store, simulator, "group/late-final/image", tokens)
    with RegistryClient(simulator.url) as registry:
        _wait(lambda: registry.status("group/late-final/image").status
              is RegistryImportStatus.IMPORT_COMPLETE)  # fmt: skip
    report = migrator.on_registry_status(
        current(store, repo_id), RegistryImportStatus.IMPORT_COMPLETE, tokens.writer()
    )
    assert report.outcome is StepOutcome.FINISHED
    row = current(store, repo_id)
    assert (row.migration_state, row.migration_retries_count) == (State.IMPORT_DONE, 0)


def test_the_guard_takes_over_a_final_import_the_registry_runs(
    migrator: Migrator, tokens: Tokens, simulator: SimulatorServer, database_url: str
) -> None:
    store = migrator.store
    simulator.configure(pre_import_seconds=[0.05, 0.05], import_seconds=[60, 60])
    repo_id = _pre_import_done(store, simulator, "group/running-final/image", tokens)
    _age_step(database_url, repo_id, 600)
    report = migrator.reconcile_stale(current(store, repo_id), store.settings(), tokens.writer())
    assert report.outcome is StepOutcome.ALIGNED
    row = current(store, repo_id)
    assert (row.migration_state, row.migration_retries_count) == (State.IMPORTING, 0)


def test_a_retry_never_sent_is_not_charged_for_the_failure_already_charged(
    migrator: Migrator, tokens: Tokens, simulator: SimulatorServer, database_url: str
) -> None:
    """The first pre-import failed (charged once); the retry was claimed, and its worker died
    before the start: the registry still shows the first failure. The guard (or the
    redelivered message) undoes the retry's claim instead of charging that failure again
    (a chaos run charged such a fail-once repository twice)."""
    store = migrator.store
    path = "group/fail-once-twice/image"
    simulator.configure(pre_import_seconds=[0.05, 0.05])
    repo_id = add(store, path)
    started = migrator.start(current(store, repo_id), store.settings(), tokens.writer())
    assert started.outcome is StepOutcome.STARTED
    with RegistryClient(simulator.url) as registry:
        _wait(lambda: registry.status(path).status is RegistryImportStatus.PRE_IMPORT_FAILED)
    failed = migrator.on_registry_status(
        current(store, repo_id), RegistryImportStatus.PRE_IMPORT_FAILED, tokens.writer()
    )
    assert failed.outcome is StepOutcome.ABORTED
    # The retry's claim, then its worker dies before the start call.
    assert store.claim(repo_id, expected_state=State.IMPORT_ABORTED, event="retry_pre_import",
                       token=tokens.writer().token, actor="test", message_id=None).ok  # fmt: skip
    _age_step(database_url, repo_id, 600)
    report = migrator.reconcile_stale(current(store, repo_id), store.settings(), tokens.writer())
    assert report.outcome is StepOutcome.UNDONE
    row = current(store, repo_id)
    assert (row.migration_state, row.migration_retries_count) == (State.IMPORT_ABORTED, 1)
