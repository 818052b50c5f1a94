"""JSON log lines stay whole when structlog and stdlib loggers write from many threads."""

from __future__ import annotations

import json
import subprocess
import sys

_WRITERS = """
import logging, threading
import structlog
from migration.logging import configure
configure("info")
ours, library = structlog.get_logger(), logging.getLogger("library")
def from_structlog():
    for i in range(2000):
        ours.info("s" * 200, i=i)
def from_stdlib():
    for _ in range(2000):
        library.info("l" * 200)
threads = [threading.Thread(target=f) for f in (from_structlog, from_stdlib) * 2]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""


def test_concurrent_structlog_and_stdlib_lines_never_interleave() -> None:
    # A process of its own: configure() replaces the root handlers.
    done = subprocess.run(
        [sys.executable, "-c", _WRITERS], capture_output=True, text=True, timeout=120, check=True
    )
    lines = done.stdout.splitlines()
    assert len(lines) == 8000
    events = [json.loads(line)["event"] for line in lines]  # each line is one JSON object
    assert sum(e.startswith("s") for e in events) == sum(e.startswith("l") for e in events)
