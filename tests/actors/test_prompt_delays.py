"""A delayed message (a retry) runs at its time, not up to a second after it, on the
stack's RabbitMQ with our broker's middleware (:class:`actors.broker.PromptDelays`).

Dramatiq's consumer of the delay queue sends a due message on only when it wakes: on a
message of that queue, or after ``worker_timeout`` (1000 ms by default) of quiet. Six
messages sent 0.15 s apart with a 1.5 s delay all reach the delay queue before the first
is due; their times then fall across a whole second of quiet, so with a one-second wake-up
one of them is at least 0.5 s late. With the middleware each is sent on within 0.1 s.
"""

from __future__ import annotations

import threading
import time

import dramatiq
import pytest
from dramatiq.brokers.stub import StubBroker

from actors.broker import DELAY_PRECISION_MS, PromptDelays, make_broker
from migration.config import Config

DELAY_S = 1.5
SPACING_S = 0.15
MESSAGES = 6
#: Generous against the 0.1 s precision (a loaded two-core machine), well under the 0.5 s
#: that the one-second wake-up makes certain.
MOST_LATE_S = 0.45


def test_consumers_wake_every_precision_and_threads_every_second() -> None:
    broker = StubBroker(middleware=[PromptDelays(precision_ms=80)])
    broker.declare_queue("prompt-delays")
    worker = dramatiq.Worker(broker, worker_threads=2)  # Dramatiq's default: 1000 ms
    worker.start()
    try:
        assert worker.worker_timeout == 80
        assert worker.consumers  # the queue's and its delay queue's
        assert all(consumer.worker_timeout == 80 for consumer in worker.consumers.values())
        assert [thread.timeout for thread in worker.workers] == [1.0, 1.0]
    finally:
        worker.stop()
        broker.close()
    with pytest.raises(ValueError, match="at least 1"):
        PromptDelays(precision_ms=0)


def test_delayed_messages_run_on_time(stack: dict[str, str], queue: str) -> None:
    broker = make_broker(Config.from_env(stack))
    ran: dict[int, float] = {}
    due: dict[int, float] = {}
    done = threading.Event()

    @dramatiq.actor(broker=broker, queue_name=queue, actor_name=f"probe_{queue}")
    def probe(n: int) -> None:
        ran[n] = time.monotonic()
        if len(ran) == MESSAGES:
            done.set()

    worker = dramatiq.Worker(broker, worker_threads=2)
    worker.start()
    try:
        assert worker.worker_timeout == DELAY_PRECISION_MS
        for n in range(MESSAGES):
            due[n] = time.monotonic() + DELAY_S
            probe.send_with_options(args=(n,), delay=int(DELAY_S * 1000))
            time.sleep(SPACING_S)
        assert done.wait(timeout=DELAY_S + MESSAGES * SPACING_S + 10), sorted(ran)
    finally:
        worker.stop()
        broker.close()
    late = {n: round(ran[n] - due[n], 3) for n in range(MESSAGES)}
    assert all(seconds >= -0.05 for seconds in late.values()), late  # none ran early
    assert max(late.values()) < MOST_LATE_S, late
