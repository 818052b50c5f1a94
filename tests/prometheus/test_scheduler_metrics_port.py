"""``registry-migrator scheduler --metrics-port``: a port already taken is one line, exit 2.

(The metrics it serves are scraped in test_scrape.py.)
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from migration.store import Store

CLI = str(Path(sys.executable).with_name("registry-migrator"))


def test_a_taken_metrics_port_is_one_line_and_exit_2(
    stack: dict[str, str], database_url: str, store: Store
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [CLI, "scheduler", "--health-port", "0", "--metrics-port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            # A database at the schema it needs: the scheduler checks that first.
            env={
                **os.environ,
                **stack,
                "MIGRATOR_DATABASE_URL": database_url,
                "MIGRATOR_ETCD_PREFIX": "/metrics-port-test",
            },
        )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines == [f"registry-migrator: --metrics-port {port}: [Errno 98] Address already in use"]
