"""The Dramatiq broker: RabbitMQ with publisher confirms and the middleware we rely on."""

from __future__ import annotations

import random
from typing import Any

import pika
import pika.exceptions
import structlog
from dramatiq.brokers.rabbitmq import DEAD_MESSAGE_TTL, RabbitmqBroker
from dramatiq.common import dq_name, xq_name
from dramatiq.middleware import (
    AgeLimit,
    CurrentMessage,
    Middleware,
    Retries,
    ShutdownNotifications,
    TimeLimit,
)

from migration.config import Config

log = structlog.get_logger(__name__)

#: Below RabbitMQ's 30-minute consumer timeout (an unacked message past it closes the
#: channel), and far above any one step: a step is a few database writes and one
#: registry call with its own timeout.
TIME_LIMIT_MS = 10 * 60 * 1000
#: A trigger older than this is stale: newer triggers have done its work.
MAX_AGE_MS = 60 * 60 * 1000
#: How late a delayed message may be sent on at most (ms): see :class:`PromptDelays`.
DELAY_PRECISION_MS = 100


class PromptDelays(Middleware):
    """Wakes a worker's consumers every ``precision_ms`` when idle, not every second
    (Dramatiq's ``worker_timeout``, 1000 ms by default).

    A delayed message (a retry) waits in the consumer of the delay queue, which sends it on
    only when it wakes: on a message of that queue, or when idle for ``worker_timeout``.
    The delay queue is quiet, so a retry came up to a second after its time. A
    notification that met a busy lease is retried after 0.1 s, and came about a second
    later, its repository's slot of the capacity held all the while
    (``bench/throughput.py``, start-bound: the last repository of a round finished 0.8 s
    after the rest). The worker threads keep Dramatiq's timeout: it only bounds how soon
    an idle thread sees a stop, and their wake-ups were half the cost (an idle worker of 8
    threads: 1.0 ms of CPU a second; 8.2 with everything at 100 ms; 4.7 with the consumers
    only, as here).

    :param precision_ms: the most a delayed message is held past its time, in ms; a
        ``worker_timeout`` already lower is kept.
    """

    def __init__(self, *, precision_ms: int = DELAY_PRECISION_MS) -> None:
        if precision_ms < 1:
            raise ValueError("precision_ms must be at least 1")
        self.precision_ms = precision_ms
        self._thread_timeout_s: float | None = None

    def before_worker_boot(self, broker: Any, worker: Any) -> None:
        # Read by each consumer thread when it is made, after this hook (and for a queue
        # declared later on); the worker threads read it too, and get theirs back below.
        self._thread_timeout_s = worker.worker_timeout / 1000
        worker.worker_timeout = min(worker.worker_timeout, self.precision_ms)

    def after_worker_boot(self, broker: Any, worker: Any) -> None:
        if self._thread_timeout_s is not None:
            for thread in worker.workers:
                thread.timeout = self._thread_timeout_s


class MigratorBroker(RabbitmqBroker):
    """Dramatiq's RabbitMQ broker, declaring its queues with a queue type.

    Dramatiq declares each queue, its delay queue (``.DQ``) and its dead-letter queue
    (``.XQ``) itself, all durable and none exclusive (what quorum queues need). With
    ``queue_type="quorum"`` the three get ``x-queue-type: quorum`` (RabbitMQ 3.10 quorum
    queues also keep the dead-letter queue's ``x-message-ttl``); with ``"classic"`` they are
    declared exactly as Dramatiq does, without the argument, so existing classic queues of
    the same name are declared with the same arguments as before.

    RabbitMQ refuses to redeclare a queue with other arguments (PRECONDITION_FAILED):
    switching an existing migration's type needs new queues (README, "RabbitMQ: a cluster
    and quorum queues"); the refusal is logged as ``queue_type_mismatch``.

    :param queue_type: ``classic`` or ``quorum``.
    :param urls: the nodes' AMQP URLs; a connection tries them in order, starting at a
        random one, so the processes' connections spread over the cluster.
    """

    def __init__(self, *, queue_type: str, urls: tuple[str, ...], **options: Any) -> None:
        super().__init__(url=list(urls), **options)
        start = random.randrange(len(urls))
        self.parameters = [pika.URLParameters(u) for u in urls[start:] + urls[:start]]
        self.queue_type = queue_type

    def _with_type(self, arguments: dict[str, Any]) -> dict[str, Any]:
        if self.queue_type == "classic":
            return arguments
        return {**arguments, "x-queue-type": self.queue_type}

    def _build_queue_arguments(self, queue_name: str) -> dict[str, Any]:
        arguments: dict[str, Any] = super()._build_queue_arguments(queue_name)
        return self._with_type(arguments)

    def _declare_xq_queue(self, queue_name: str) -> Any:
        arguments = self._with_type({"x-message-ttl": DEAD_MESSAGE_TTL})
        return self._declare_checked(xq_name(queue_name), arguments)

    def _declare_queue(self, queue_name: str) -> Any:
        return self._declare_checked(queue_name, self._build_queue_arguments(queue_name))

    def _declare_dq_queue(self, queue_name: str) -> Any:
        return self._declare_checked(dq_name(queue_name), self._build_queue_arguments(queue_name))

    def _declare_checked(self, name: str, arguments: dict[str, Any]) -> Any:
        try:
            return self.channel.queue_declare(queue=name, durable=True, arguments=arguments)
        except pika.exceptions.ChannelClosedByBroker as error:
            if error.reply_code == 406:  # PRECONDITION_FAILED: declared with other arguments
                log.error(
                    "queue_type_mismatch",
                    queue=name,
                    queue_type=self.queue_type,
                    error=error.reply_text,
                    action="the queue exists with another type: drain it and delete it, or"
                    " set another MIGRATOR_QUEUE_NAME (README: RabbitMQ, to switch)",
                )
            raise


def make_broker(config: Config, *, prometheus: bool = False) -> RabbitmqBroker:
    """A RabbitMQ broker for ``config.broker_urls`` (heartbeat set in the URLs), its queues
    of ``config.queue_type``.

    :param config: the process configuration.
    :param prometheus: add Dramatiq's Prometheus middleware (worker processes only: it
        serves metrics from a forked process).
    """
    # Dramatiq's defaults less Callbacks and Pipelines (no actor sends on_success/on_failure
    # or pipes: their hooks ran on every message for nothing, ~13 us of the ~30 us the
    # process hooks took), plus CurrentMessage.
    middleware = [
        AgeLimit(max_age=MAX_AGE_MS),
        TimeLimit(time_limit=TIME_LIMIT_MS),
        ShutdownNotifications(notify_shutdown=True),
        Retries(max_retries=3, min_backoff=500, max_backoff=30_000),
        CurrentMessage(),
        PromptDelays(),
    ]
    if prometheus:
        from dramatiq.middleware.prometheus import Prometheus  # noqa: PLC0415 - optional

        middleware.append(Prometheus())
    # confirm_delivery: a publish returns only once RabbitMQ has the message, so the
    # notification API answers 202 only for a notification that cannot be lost.
    return MigratorBroker(
        queue_type=config.queue_type,
        urls=config.broker_urls,
        confirm_delivery=True,
        middleware=middleware,
    )
