"""``registry-migrator demo`` end to end, as CI runs it: small N, plain progress lines."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from devtools.demo import DENIED_NAMESPACE, database_url_for, drop_database
from migration.config import Config
from migration.keys import leases_prefix

CLI = str(Path(sys.executable).with_name("registry-migrator"))


class DemoRun:
    """Unique names for one demo run, so concurrent test runs never collide."""

    def __init__(self, log_dir: Path) -> None:
        tag = uuid.uuid4().hex[:10]
        self.database = f"demo_test_{tag}"
        self.prefix = f"/demo-test-{tag}"
        self.queue = f"demo_test_{tag}"
        self.log_dir = log_dir
        self.base_url = Config.from_env().database_url
        self.url = database_url_for(self.base_url, self.database)

    def command(self, *extra: str) -> list[str]:
        return [CLI, "demo", "--no-live", "--database", self.database,
                "--etcd-prefix", self.prefix, "--queue-name", self.queue,
                "--log-dir", str(self.log_dir), *extra]  # fmt: skip

    def leftover_processes(self) -> list[int]:
        """Processes whose environment names this run's queue: the demo's children."""
        marker = f"MIGRATOR_QUEUE_NAME={self.queue}".encode()
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as environ:
                    if marker in environ.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:
                continue
        return found


@pytest.fixture
def demo_run(stack: dict[str, str], tmp_path: Path) -> Iterator[DemoRun]:
    run = DemoRun(tmp_path / "logs")
    try:
        yield run
    finally:
        for pid in run.leftover_processes():  # never leave them to the next test
            os.kill(pid, signal.SIGKILL)
        drop_database(run.base_url, run.database)


def _wait_gone(run: DemoRun, *, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := run.leftover_processes()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.mark.timeout(480)  # the subprocess has its own 420 s bound
def test_demo_migrates_every_eligible_repository(demo_run: DemoRun) -> None:
    done = subprocess.run(
        demo_run.command("--count", "40", "--workers", "2", "--threads", "4",
                         "--time-scale", "0.2", "--interval", "2", "--timeout", "240"),
        capture_output=True, text=True, timeout=420, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "terminal" in done.stdout  # plain progress lines
    assert "runs that found a busy lease" in done.stdout
    assert _wait_gone(demo_run, seconds=5) == []
    with psycopg.connect(demo_run.url) as conn:
        not_terminal = conn.execute(
            "SELECT path, migration_state FROM container_repositories"
            " WHERE migration_state NOT IN ('import_done', 'import_skipped')"
        ).fetchall()
        reasons = {r[0] for r in conn.execute(
            "SELECT DISTINCT migration_skipped_reason FROM container_repositories")}  # fmt: skip
        done_reasons = {r[0] for r in conn.execute(
            "SELECT DISTINCT migration_skipped_reason FROM container_repositories"
            " WHERE migration_state = 'import_done'")}  # fmt: skip
        total = conn.execute("SELECT count(*) FROM container_repositories").fetchone()[0]  # type: ignore[index]
        retried_then_done = conn.execute(
            "SELECT count(*) FROM container_repositories WHERE path LIKE '%fail-once%'"
            " AND migration_state = 'import_done' AND migration_retries_count >= 1"
        ).fetchone()[0]  # type: ignore[index]
    assert total == 40
    # Only the denied namespace is left, untouched, in default.
    assert not_terminal, "the seed has a denied namespace"
    assert {(path.split("/")[0], state) for path, state in not_terminal} == {
        (DENIED_NAMESPACE, "default")
    }
    assert {"too_many_tags", "native_import", "not_found", "too_many_retries"} <= reasons
    assert retried_then_done >= 1
    # Native and not-found repositories are done, with the reason (reference parity).
    assert {"native_import", "not_found"} <= done_reasons


@pytest.mark.timeout(420)
def test_sigterm_stops_every_child(demo_run: DemoRun) -> None:
    process = subprocess.Popen(
        demo_run.command("--count", "300", "--workers", "2", "--threads", "4",
                         "--interval", "0.5", "--timeout", "300"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        seen = []
        deadline = time.monotonic() + 180
        for line in process.stdout:
            seen.append(line)
            if "in flight" in line and "in flight 0/" not in line:
                break
            assert time.monotonic() < deadline, "".join(seen)
        assert demo_run.leftover_processes(), "the demo's children should be running now"
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, "".join(seen) + rest
    assert "stopping every process" in rest
    assert _wait_gone(demo_run, seconds=5) == []
    # A graceful stop revokes the workers' etcd leases at once (no TTL wait).
    config = Config.from_env()
    with config.etcd_client() as client:
        assert client.get_prefix(leases_prefix(demo_run.prefix)) == []
