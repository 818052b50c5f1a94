"""Do one ``run_in_place`` in a process of its own, its run failing or not; print what it did.

Run by tests/actors/test_triggers.py as ``python -m tests.actors.run_in_place_probe fail|ok``
with ``MIGRATOR_*`` set (a fresh interpreter reads the test's own queue name, as
trigger_burst does). ``fail`` makes the run's first read (the in-flight count and the
candidates) raise StoreUnavailable, as a PostgreSQL gone between the notification's step
and its run would.

Prints one JSON line: {"pending": N} (the dedup gate's markers after the call).
"""

from __future__ import annotations

import json
import sys

from actors.enqueuer import run_in_place
from actors.runtime import Runtime
from migration.config import Config
from migration.store import StoreUnavailable


def main(mode: str) -> None:
    runtime = Runtime(Config.from_env(), pool_size=2)
    try:
        if mode == "fail":

            def gone(*_args: object, **_kwargs: object) -> object:
                raise StoreUnavailable("PostgreSQL gone (injected by the probe)")

            runtime.store.in_flight = gone  # type: ignore[method-assign]
            runtime.store.in_flight_and_candidates = gone  # type: ignore[method-assign]
        run_in_place(runtime, source="notification")
        pending = runtime.gate.pending()
    finally:
        runtime.close()
    print(json.dumps({"pending": pending}))


if __name__ == "__main__":
    main(sys.argv[1])
