"""ArgumentCheck and the notification retry policy, on Dramatiq's StubBroker (no servers).

The same middleware is exercised against RabbitMQ by tests/badinput/test_messages.py; here
a worker on a StubBroker runs real messages through it fast, so the logic is pinned down
without any server: a message that does not fit its actor's signature reaches the
dead-letter list and never the actor; one that fits runs once.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import dramatiq
import pytest
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import Retries

from actors import enqueuer
from actors.enqueuer import enqueue_next_migration
from actors.later import REGISTRY_RETRIES, TryLater
from actors.notifications import LeaseBusy, _retry_when, handle_registry_notification
from actors.validation import ArgumentCheck, argument_problem

QUEUE = "argument-check"


@pytest.fixture
def stub() -> Iterator[tuple[StubBroker, list[tuple[Any, ...]], dramatiq.Actor[Any, Any]]]:
    broker = StubBroker(middleware=[Retries(max_retries=0)])
    broker.add_middleware(ArgumentCheck())
    calls: list[tuple[Any, ...]] = []

    # The same shape as handle_registry_notification: two required strings, one optional.
    def notify(path: str, status: str, detail: str = "") -> None:
        calls.append((path, status, detail))

    actor = dramatiq.Actor(
        notify, broker=broker, actor_name="notify", queue_name=QUEUE, priority=0, options={}
    )
    worker = dramatiq.Worker(broker, worker_timeout=50, worker_threads=1)
    worker.start()
    try:
        yield broker, calls, actor
    finally:
        worker.stop()
        broker.close()


def _enqueue(broker: StubBroker, args: Any, kwargs: Any) -> None:
    broker.enqueue(
        dramatiq.Message(
            queue_name=QUEUE, actor_name="notify", args=args, kwargs=kwargs, options={}
        )
    )


BAD_CALLS = [
    pytest.param((), {}, id="missing-arguments"),
    pytest.param(("a/b",), {}, id="missing-status"),
    pytest.param((1, "import_complete"), {}, id="int-path"),
    pytest.param(("a/b", None), {}, id="none-status"),
    pytest.param(("a/b", "import_complete", "d", "extra"), {}, id="too-many"),
    pytest.param(("a/b", "import_complete"), {"colour": "red"}, id="unknown-keyword"),
    pytest.param(("a/b",), {"path": "c/d", "status": "x"}, id="path-twice"),
    pytest.param({"path": "a/b"}, {}, id="args-an-object"),
    pytest.param(("a/b", "import_complete"), ["detail"], id="kwargs-not-an-object"),
]


@pytest.mark.parametrize(("args", "kwargs"), BAD_CALLS)
def test_a_message_that_does_not_fit_is_dead_lettered_and_never_runs(
    stub: tuple[StubBroker, list[tuple[Any, ...]], dramatiq.Actor[Any, Any]],
    args: Any,
    kwargs: Any,
) -> None:
    broker, calls, _actor = stub
    _enqueue(broker, args, kwargs)
    broker.join(QUEUE, fail_fast=False, timeout=10_000)
    assert calls == []
    assert len(broker.dead_letters) == 1
    # The worker's own log line about the skipped message must not fail on the body's shape.
    assert str(broker.dead_letters[0])


def test_a_message_that_fits_runs_once_and_is_not_dead_lettered(
    stub: tuple[StubBroker, list[tuple[Any, ...]], dramatiq.Actor[Any, Any]],
) -> None:
    broker, calls, actor = stub
    actor.send("group/project", "import_complete")
    actor.send_with_options(args=("group/other", "pre_import_failed"), kwargs={"detail": "x"})
    broker.join(QUEUE, fail_fast=False, timeout=10_000)
    assert sorted(calls) == [
        ("group/other", "pre_import_failed", "x"),
        ("group/project", "import_complete", ""),
    ]
    assert broker.dead_letters == []


def test_the_real_actors_signatures_are_what_the_check_enforces() -> None:
    notify = handle_registry_notification.fn
    assert argument_problem(notify, ("a/b", "import_complete"), {}) is None
    assert argument_problem(notify, ("a/b",), {}) is not None
    assert argument_problem(notify, ("a/b", 5), {}) is not None
    assert argument_problem(notify, ("a/b", "import_complete"), {"repository_id": 3}) is None
    assert argument_problem(notify, ("a/b", "import_complete", "", 3), {}) is not None
    enqueue = enqueue_next_migration.fn
    assert argument_problem(enqueue, (), {}) is None
    assert argument_problem(enqueue, ("/gate/0", 12, "scheduler"), {}) is None
    assert argument_problem(enqueue, ("/gate/0", "12"), {}) is not None
    # bool is an int subclass in Python, never a token here.
    assert argument_problem(enqueue, ("/gate/0", True), {}) is not None


def test_a_busy_lease_is_retried_far_longer_than_other_errors() -> None:
    # A Retry: no traceback. A live holder (its lease full) lets go soon: 0.1 s first,
    # doubling with each retry, then every second (jittered by a quarter either way).
    waits = [LeaseBusy("held", after=9.0, retries=n).delay for n in (0, 1, 2, 3, 4, 50)]
    bounds = [(75, 125), (150, 250), (300, 500), (600, 1000), (750, 1250), (750, 1250)]
    for wait, (low, high) in zip(waits, bounds, strict=True):
        assert wait is not None and low <= wait <= high, (waits, bounds)
    busy = LeaseBusy("held", after=9.0, retries=239)
    # Sooner when the holder's lease ends sooner (a dead holder's, about to expire).
    soon = LeaseBusy("held", after=0.4, retries=6)
    assert soon.delay is not None and 300 <= soon.delay <= 500
    other = RuntimeError("database gone")
    assert _retry_when(0, busy) and _retry_when(239, busy)
    assert not _retry_when(240, busy)
    assert _retry_when(4, other)
    assert not _retry_when(5, other)
    # A dependency that cannot answer (registry, etcd, PostgreSQL): retried for hours.
    later = TryLater("etcd down", after=2.0)
    assert later.delay is not None and 2000 <= later.delay <= 3000
    assert _retry_when(REGISTRY_RETRIES - 1, later)
    assert not _retry_when(REGISTRY_RETRIES, later)
    # The enqueuer: a recovery the registry kept from finishing, as long; anything else,
    # three times.
    assert enqueuer._retry_when(REGISTRY_RETRIES - 1, later)
    assert not enqueuer._retry_when(REGISTRY_RETRIES, later)
    assert enqueuer._retry_when(2, other)
    assert not enqueuer._retry_when(3, other)
