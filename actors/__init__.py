"""The Dramatiq actors of the migration, on RabbitMQ.

Importing this package configures the broker from ``MIGRATOR_BROKER_URL`` and declares
the actors, so ``dramatiq actors --processes N --threads M`` runs the workers.
"""

import multiprocessing
import os
import sys

#: Dramatiq's Prometheus middleware exports the workers' metrics (``MIGRATOR_PROMETHEUS``).
PROMETHEUS = os.environ.get("MIGRATOR_PROMETHEUS", "1") == "1"

# In a worker (a process ``dramatiq actors`` started), the metrics of migration.metrics must be
# in prometheus_client's multiprocess mode, or the middleware's exposition server (another
# process) never sees them. prometheus_client picks the mode once, at its own import, from
# PROMETHEUS_MULTIPROC_DIR; the middleware sets it only after this module was imported (its
# after_process_boot): set it here, before anything imports prometheus_client.
if PROMETHEUS and multiprocessing.parent_process() is not None:
    from dramatiq.middleware.prometheus import DB_PATH as _PROMETHEUS_DB

    if "prometheus_client.values" in sys.modules and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        print(
            "registry-migrator: prometheus_client was imported before actors: the worker's own"
            " metrics will not be exported",
            file=sys.stderr,
        )
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", _PROMETHEUS_DB)

import dramatiq  # noqa: E402

from actors.broker import make_broker  # noqa: E402
from actors.config import CONFIG  # noqa: E402
from actors.runtime import RuntimeMiddleware  # noqa: E402
from actors.validation import ArgumentCheck  # noqa: E402
from migration.logging import configure as _configure_logging  # noqa: E402

_configure_logging(CONFIG.log_level)
broker = make_broker(CONFIG, prometheus=PROMETHEUS)
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
