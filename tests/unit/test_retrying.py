"""migration.retrying: the one backoff policy (waits, stops, the last answer, the log line)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
import tenacity

from migration import retrying


def _state(attempt: int) -> tenacity.RetryCallState:
    state = tenacity.RetryCallState(retry_object=tenacity.Retrying(), fn=None, args=(), kwargs={})
    state.attempt_number = attempt
    return state


def test_waits_double_with_equal_jitter_up_to_the_maximum() -> None:
    wait = retrying.wait_equal_jitter(initial=0.2, maximum=1.0)
    for attempt, ceiling in ((1, 0.2), (2, 0.4), (3, 0.8), (4, 1.0), (40, 1.0), (5000, 1.0)):
        waits = [wait(_state(attempt)) for _ in range(200)]
        assert all(ceiling / 2 <= w <= ceiling for w in waits), (attempt, min(waits), max(waits))
        assert max(waits) - min(waits) > ceiling / 10, "no jitter"


def test_stops_after_the_attempts_and_answers_the_last_result() -> None:
    calls: list[int] = []

    def busy() -> str:
        calls.append(1)
        return "busy"

    policy = retrying.policy(
        initial=0.01, attempts=3, retry=tenacity.retry_if_result(lambda r: r == "busy")
    )
    assert policy(busy) == "busy"
    assert len(calls) == 3


def test_raises_the_last_exception_not_a_retry_error() -> None:
    calls: list[int] = []

    def down() -> None:
        calls.append(1)
        raise ConnectionError(f"down {len(calls)}")

    with pytest.raises(ConnectionError, match="down 2"):
        retrying.policy(initial=0.01, attempts=2)(down)


def test_a_result_that_is_not_retried_returns_at_once() -> None:
    answers = iter(["busy", "busy", "done"])
    policy = retrying.policy(initial=0.01, retry=tenacity.retry_if_result(lambda r: r == "busy"))
    assert policy(lambda: next(answers)) == "done"


def test_the_stop_event_ends_the_wait_and_the_retries() -> None:
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    began = time.monotonic()

    def down() -> None:
        raise OSError("down")

    with pytest.raises(OSError):
        retrying.policy(initial=60, stop_event=stop)(down)
    assert time.monotonic() - began < 5, "the 30-60 s wait was not cut short"


def test_a_deadline_stops_before_a_wait_past_it() -> None:
    began = time.monotonic()
    with pytest.raises(OSError):
        retrying.policy(initial=0.4, deadline=0.5)(_raise_os_error)
    assert time.monotonic() - began < 0.5 + 0.5


def _raise_os_error() -> None:
    raise OSError("down")


def test_logs_before_each_wait() -> None:
    lines: list[tuple[str, dict[str, Any]]] = []

    class Logger:
        def warning(self, event: str, **fields: Any) -> None:
            lines.append((event, fields))

    with pytest.raises(OSError):
        retrying.policy(
            initial=0.01,
            attempts=3,
            before_sleep=retrying.log_before_sleep(Logger(), "thing_failed", server="x"),
        )(_raise_os_error)
    assert [event for event, _ in lines] == ["thing_failed", "thing_failed"]
    assert [fields["attempt"] for _, fields in lines] == [1, 2]
    assert all(f["error"] == "down" and f["server"] == "x" for _, f in lines)
    assert all(0 <= f["retry_in_s"] <= 0.02 for _, f in lines)


def test_async_policy_with_a_further_stop() -> None:
    calls: list[int] = []

    async def refused() -> int:
        calls.append(1)
        return 403

    policy = retrying.async_policy(
        initial=0.01,
        attempts=10,
        retry=tenacity.retry_if_result(lambda code: code != 200),
        stop=lambda state: len(calls) >= 2,
    )
    assert asyncio.run(policy(refused)) == 403
    assert len(calls) == 2
