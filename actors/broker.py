"""The Dramatiq broker: RabbitMQ with publisher confirms and the middleware we rely on."""

from __future__ import annotations

from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.middleware import (
    AgeLimit,
    Callbacks,
    CurrentMessage,
    Pipelines,
    Retries,
    ShutdownNotifications,
    TimeLimit,
)

from migration.config import Config

#: Below RabbitMQ's 30-minute consumer timeout (an unacked message past it closes the
#: channel), and far above any one step: a step is a few database writes and one
#: registry call with its own timeout.
TIME_LIMIT_MS = 10 * 60 * 1000
#: A trigger older than this is stale: newer triggers have done its work.
MAX_AGE_MS = 60 * 60 * 1000


def make_broker(config: Config, *, prometheus: bool = False) -> RabbitmqBroker:
    """A RabbitMQ broker for ``config.broker_url`` (heartbeat set in the URL).

    :param config: the process configuration.
    :param prometheus: add Dramatiq's Prometheus middleware (worker processes only: it
        serves metrics from a forked process).
    """
    middleware = [
        AgeLimit(max_age=MAX_AGE_MS),
        TimeLimit(time_limit=TIME_LIMIT_MS),
        ShutdownNotifications(notify_shutdown=True),
        Callbacks(),
        Pipelines(),
        Retries(max_retries=3, min_backoff=500, max_backoff=30_000),
        CurrentMessage(),
    ]
    if prometheus:
        from dramatiq.middleware.prometheus import Prometheus  # noqa: PLC0415 - optional

        middleware.append(Prometheus())
    # confirm_delivery: a publish returns only once RabbitMQ has the message, so the
    # notification API answers 202 only for a notification that cannot be lost.
    return RabbitmqBroker(url=config.broker_url, confirm_delivery=True, middleware=middleware)
