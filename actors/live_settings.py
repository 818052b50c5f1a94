"""The migration settings as one process reads them: at most ``max_age`` seconds old.

Settings are live (an operator changes them in PostgreSQL without a restart), but an
enqueuer run and a trigger need them no fresher than a second: every run and every trigger
read the settings row, one PostgreSQL round trip each, several per migrated repository.
Nothing that must be exact depends on this copy: the claim re-reads ``enabled`` and
``capacity`` under the settings row lock (invariant 3), so a pause holds at once for
claims, and a resume or a new capacity reaches the runs within ``max_age``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from migration.settings import Settings


class LiveSettings:
    """The last settings read, read again when older than ``max_age`` (thread-safe).

    :param read: reads the settings (``Store.settings``).
    :param max_age: seconds a read is reused.
    """

    def __init__(self, read: Callable[[], Settings], *, max_age: float = 1.0) -> None:
        self.read = read
        self.max_age = max_age
        self._lock = threading.Lock()
        self._settings: Settings | None = None
        self._read_at = 0.0  # time.monotonic() just before the read that gave _settings

    def get(self) -> Settings:
        """The settings, at most ``max_age`` seconds old.

        :raises StoreError: PostgreSQL could not be read (nothing is cached from a failure).
        """
        with self._lock:
            # One thread reads while the others wait for its answer: no burst of reads when
            # the copy expires under eight busy threads.
            if self._settings is None or time.monotonic() - self._read_at >= self.max_age:
                read_at = time.monotonic()
                self._settings = self.read()
                self._read_at = read_at
            return self._settings
