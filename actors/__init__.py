"""The Dramatiq actors of the migration, on RabbitMQ.

Importing this package configures the broker from ``MIGRATOR_BROKER_URL`` and declares
the actors, so ``dramatiq actors --processes N --threads M`` runs the workers.
"""

import os

import dramatiq

from actors.broker import make_broker
from actors.config import CONFIG
from actors.runtime import RuntimeMiddleware
from actors.validation import ArgumentCheck
from migration.logging import configure as _configure_logging

_configure_logging(CONFIG.log_level)
broker = make_broker(CONFIG, prometheus=os.environ.get("MIGRATOR_PROMETHEUS", "1") == "1")
broker.add_middleware(RuntimeMiddleware())
broker.add_middleware(ArgumentCheck())
dramatiq.set_broker(broker)

from actors.enqueuer import enqueue_next_migration, trigger_enqueue  # noqa: E402
from actors.guard import guard_stale_migrations  # noqa: E402
from actors.notifications import handle_registry_notification  # noqa: E402

__all__ = [
    "broker",
    "enqueue_next_migration",
    "guard_stale_migrations",
    "handle_registry_notification",
    "trigger_enqueue",
]
