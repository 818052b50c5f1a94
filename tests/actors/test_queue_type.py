"""``MIGRATOR_QUEUE_TYPE``: the broker declares its three queues with the type, against the
stack's RabbitMQ (a quorum queue also lives on a single node).

- ``quorum``: the queue, ``.DQ`` and ``.XQ`` are quorum queues; a message goes through.
- ``classic``: declared exactly as Dramatiq does, so an existing classic queue is accepted.
- A type that disagrees with the existing queues is refused by RabbitMQ
  (PRECONDITION_FAILED) and logged as ``queue_type_mismatch`` with what to do.
"""

from __future__ import annotations

import dramatiq
import pika
import pika.exceptions
import pytest
import structlog
from dramatiq.errors import ConnectionClosed

from actors.broker import MigratorBroker
from migration.config import Config


def _broker(config: Config, queue_type: str) -> MigratorBroker:
    return MigratorBroker(queue_type=queue_type, urls=config.broker_urls, confirm_delivery=True)


def _redeclare(stack: dict[str, str], name: str, arguments: dict[str, object]) -> int:
    """Declare ``name`` again with ``arguments``: 0 when RabbitMQ agrees, else its code."""
    connection = pika.BlockingConnection(pika.URLParameters(stack["MIGRATOR_BROKER_URL"]))
    try:
        connection.channel().queue_declare(queue=name, durable=True, arguments=arguments)
        return 0
    except pika.exceptions.ChannelClosedByBroker as error:
        return int(error.reply_code)
    finally:
        if connection.is_open:
            connection.close()


def test_quorum_declares_all_three_queues_as_quorum_queues(
    stack: dict[str, str], queue: str
) -> None:
    config = Config.from_env({**stack, "MIGRATOR_QUEUE_TYPE": "quorum"})
    broker = _broker(config, config.queue_type)
    try:
        broker.declare_queue(queue, ensure=True)

        @dramatiq.actor(broker=broker, queue_name=queue, actor_name=f"probe_{queue}")
        def probe(n: int) -> None: ...

        probe.send(1)
        messages, delayed, dead = broker.get_queue_message_counts(queue)
        assert (messages, delayed, dead) == (1, 0, 0)
    finally:
        broker.close()
    quorum = {"x-queue-type": "quorum"}
    dlx = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": f"{queue}.XQ"}
    assert _redeclare(stack, queue, {**dlx, **quorum}) == 0
    assert _redeclare(stack, f"{queue}.DQ", {**dlx, **quorum}) == 0
    assert _redeclare(stack, f"{queue}.XQ", {"x-message-ttl": 86400000 * 7, **quorum}) == 0
    assert _redeclare(stack, queue, dlx) == 406  # not a classic queue


def test_a_type_that_disagrees_with_the_queues_is_refused_and_logged(
    stack: dict[str, str], queue: str
) -> None:
    config = Config.from_env(stack)
    assert config.queue_type == "classic"
    classic = _broker(config, "classic")
    try:
        classic.declare_queue(queue, ensure=True)  # as Dramatiq itself declares it
    finally:
        classic.close()
    quorum = _broker(config, "quorum")
    try:
        with structlog.testing.capture_logs() as logs, pytest.raises(ConnectionClosed):
            quorum.declare_queue(queue, ensure=True)
    finally:
        quorum.close()
    mismatches = [line for line in logs if line["event"] == "queue_type_mismatch"]
    assert mismatches, logs
    assert mismatches[0]["queue"] == queue
    assert mismatches[0]["log_level"] == "error"
    assert "MIGRATOR_QUEUE_NAME" in mismatches[0]["action"]
