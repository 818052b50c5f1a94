"""Repositories for a local migration: a spread of the simulator's special paths.

Used by the tests and by ``bench/outage.py``::

    ids = seed_spread(store, 100, seed=11)
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from migration.store import Store


def seed_spread(store: Store, count: int, *, seed: int = 7) -> list[int]:
    """Add ``count`` repositories, about a tenth with each of the simulator's special paths.

    ``native`` (already imported: done, reason native_import), ``missing`` (404: done,
    reason not_found), ``fail-once`` (pre-import fails once, then migrates), ``fail-always``
    (skipped too_many_retries); the rest migrate normally. Created a day ago and earlier.
    """
    rng = random.Random(seed)
    specials = ("native", "missing", "fail-once", "fail-always")
    rows = []
    old = datetime.now(UTC) - timedelta(days=1)
    for n in range(count):
        kind = specials[n % 10] if n % 10 < len(specials) else "plain"
        path = f"group-{n % 17}/project-{n}/{kind}-{rng.randrange(10**6)}"
        rows.append((path, old - timedelta(minutes=n), rng.randrange(1, 20)))
    return store.add_repositories(rows)  # the store's one seeder


__all__ = ["seed_spread"]
