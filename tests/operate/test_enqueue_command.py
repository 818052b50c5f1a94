"""``registry-migrator enqueue`` when a server fails mid-way: one line on stderr, exit 1."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

from devtools.launcher import free_port
from migration.store import Store

CLI = str(Path(sys.executable).with_name("registry-migrator"))


def test_enqueue_with_rabbitmq_down_says_so_in_one_line(store: Store, database_url: str) -> None:
    closed_port = free_port()  # nothing listens there: the publish fails
    env = {
        **os.environ,
        "MIGRATOR_DATABASE_URL": database_url,
        "MIGRATOR_ETCD_PREFIX": f"/test-{uuid.uuid4().hex[:8]}",
        "MIGRATOR_QUEUE_NAME": f"test_enqueue_{uuid.uuid4().hex[:8]}",
        "MIGRATOR_BROKER_URL": f"amqp://guest:guest@127.0.0.1:{closed_port}/%2F",
    }
    done = subprocess.run(
        [CLI, "enqueue"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, done.stderr
    assert errors[0].startswith("registry-migrator: enqueue failed:"), errors
