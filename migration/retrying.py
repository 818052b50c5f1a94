"""The one retry policy of the project, built on tenacity.

Whatever is retried here (the registry client's refused starts, the simulator's
notifications, the scheduler's failed steps, the start-up wait for the servers) backs off
the same way: exponentially from a first delay up to a ceiling, with "equal jitter" (half of
each delay fixed, half random, so that callers refused together do not come back
together), until an attempt succeeds or a number of attempts, a deadline or a stop event
says enough, with a structlog line before each wait. When it stops, the last attempt's
answer is the answer: its result is returned, its exception raised (no ``RetryError``).

Example::

    policy = retrying.policy(initial=0.5, maximum=10, stop_event=stop,
                             before_sleep=retrying.log_before_sleep(log, "server_unavailable"))
    policy(check)  # check() again after 0.25-0.5 s, 0.5-1 s, ... until it returns
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import tenacity
from tenacity import RetryCallState

#: A tenacity ``retry`` or ``stop`` condition: given the state after an attempt, whether
#: to try again (to stop). tenacity's own (``retry_if_result(...)``, ...) are such callables.
RetryIf = Callable[[RetryCallState], bool]


class wait_equal_jitter(tenacity.wait.wait_base):
    """Exponential backoff with equal jitter: before attempt ``n + 1``, wait between half
    and all of ``min(initial * 2 ** (n - 1), maximum)`` seconds.

    :param initial: the ceiling of the first wait (seconds).
    :param maximum: the largest ceiling.
    """

    def __init__(self, *, initial: float, maximum: float = math.inf) -> None:
        if initial < 0 or maximum < 0:
            raise ValueError("initial and maximum must not be negative")
        self.initial = initial
        self.maximum = maximum

    def __call__(self, retry_state: RetryCallState) -> float:
        exponent = min(retry_state.attempt_number - 1, 64)  # no float overflow after 1000s
        ceiling = min(self.initial * 2**exponent, self.maximum)
        return ceiling / 2 + random.uniform(0, ceiling / 2)


def log_before_sleep(
    logger: Any, event: str, *, level: str = "warning", **fields: Any
) -> Callable[[RetryCallState], None]:
    """A ``before_sleep`` that logs ``event`` with the attempt, the wait (``retry_in_s``) and
    the failed attempt's error, when it raised.

    :param logger: a structlog logger.
    :param event: the snake_case event name.
    :param level: the log method (``debug``, ``info``, ``warning``).
    :param fields: further key-value pairs of every line.
    """
    method = getattr(logger, level)

    def before_sleep(state: RetryCallState) -> None:
        outcome = state.outcome
        error = outcome.exception() if outcome is not None and outcome.failed else None
        extra = {"error": str(error)} if error is not None else {}
        method(
            event,
            attempt=state.attempt_number,
            retry_in_s=round(state.upcoming_sleep, 2),
            **extra,
            **fields,
        )

    return before_sleep


def _stop(
    attempts: int | None, deadline: float | None, stop_event: threading.Event | None
) -> tenacity.stop.stop_base:
    stops: list[tenacity.stop.stop_base] = []
    if attempts is not None:
        stops.append(tenacity.stop_after_attempt(attempts))
    if deadline is not None:
        stops.append(tenacity.stop_before_delay(deadline))  # never sleep past it
    if stop_event is not None:
        stops.append(tenacity.stop_when_event_set(stop_event))
    return tenacity.stop_any(*stops) if stops else tenacity.stop_never


def _last_answer(state: RetryCallState) -> Any:
    """What a stopped policy answers: the last attempt's result, or its exception raised."""
    assert state.outcome is not None
    return state.outcome.result()


def _options(
    *,
    initial: float,
    maximum: float,
    attempts: int | None,
    deadline: float | None,
    stop_event: threading.Event | None,
    retry: RetryIf | None,
    stop: RetryIf | None,
    before_sleep: Callable[[RetryCallState], Any] | None,
) -> dict[str, Any]:
    if attempts is not None and attempts < 1:
        raise ValueError("attempts must be at least 1")
    options: dict[str, Any] = {
        "wait": wait_equal_jitter(initial=initial, maximum=maximum),
        "stop": _stop(attempts, deadline, stop_event),
        "retry": retry if retry is not None else tenacity.retry_if_exception_type(),
        "retry_error_callback": _last_answer,
    }
    if stop is not None:
        base, further = options["stop"], stop
        options["stop"] = lambda state: base(state) or further(state)
    if before_sleep is not None:
        options["before_sleep"] = before_sleep
    return options


def policy(
    *,
    initial: float,
    maximum: float = math.inf,
    attempts: int | None = None,
    deadline: float | None = None,
    stop_event: threading.Event | None = None,
    retry: RetryIf | None = None,
    stop: RetryIf | None = None,
    before_sleep: Callable[[RetryCallState], Any] | None = None,
) -> tenacity.Retrying:
    """A retrying call: ``policy(...)(fn, *args)`` calls ``fn`` until it succeeds or a stop.

    :param initial: the ceiling of the first wait (seconds); see :class:`wait_equal_jitter`.
    :param maximum: the largest ceiling of a wait.
    :param attempts: the most attempts (None: no limit).
    :param deadline: seconds from the first attempt after which no wait begins.
    :param stop_event: stops the retries when set; the waits end as soon as it is set.
    :param retry: when to try again (default: when the attempt raised any exception), e.g.
        ``tenacity.retry_if_result(pred)``.
    :param stop: a further stop condition, given the state after an attempt.
    :param before_sleep: called before each wait, e.g. :func:`log_before_sleep`.
    """
    options = _options(
        initial=initial,
        maximum=maximum,
        attempts=attempts,
        deadline=deadline,
        stop_event=stop_event,
        retry=retry,
        stop=stop,
        before_sleep=before_sleep,
    )
    sleep: Callable[[float], Any] = stop_event.wait if stop_event is not None else time.sleep
    return tenacity.Retrying(sleep=sleep, **options)


def async_policy(
    *,
    initial: float,
    maximum: float = math.inf,
    attempts: int | None = None,
    deadline: float | None = None,
    retry: RetryIf | None = None,
    stop: RetryIf | None = None,
    before_sleep: Callable[[RetryCallState], Any] | None = None,
) -> tenacity.AsyncRetrying:
    """:func:`policy` for coroutines (waits with ``asyncio.sleep``): ``await
    async_policy(...)(coroutine_function, *args)``."""
    options = _options(
        initial=initial,
        maximum=maximum,
        attempts=attempts,
        deadline=deadline,
        stop_event=None,
        retry=retry,
        stop=stop,
        before_sleep=before_sleep,
    )
    return tenacity.AsyncRetrying(**options)


__all__ = ["RetryIf", "async_policy", "log_before_sleep", "policy", "wait_equal_jitter"]
