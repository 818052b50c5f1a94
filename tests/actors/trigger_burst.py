"""Fire ``trigger_enqueue`` from many threads in a process of its own; print what happened.

Run by tests/actors/test_triggers.py as ``python -m tests.actors.trigger_burst COUNT THREADS``
with ``MIGRATOR_*`` set: the ``actors`` package reads its queue name when first imported,
and the pytest process has usually imported it already (test modules import parts of it),
so the burst gets a fresh interpreter with the test's own queue.

Prints one JSON line: {"attempts": N, "sent": N, "pending": N}.
"""

from __future__ import annotations

import json
import sys
import threading

from actors.enqueuer import trigger_enqueue
from actors.runtime import Runtime
from migration.config import Config


def main(count: int, threads: int) -> None:
    runtime = Runtime(Config.from_env(), pool_size=threads + 4)
    sent: list[bool] = []
    lock = threading.Lock()

    def fire(times: int) -> None:
        for _ in range(times):
            result = trigger_enqueue(runtime, source="test")
            with lock:
                sent.append(result)

    share, extra = divmod(count, threads)
    workers = [
        threading.Thread(target=fire, args=(share + (1 if i < extra else 0),))
        for i in range(threads)
    ]
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        pending = runtime.gate.pending()
    finally:
        runtime.close()
    print(json.dumps({"attempts": len(sent), "sent": sum(sent), "pending": pending}))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
