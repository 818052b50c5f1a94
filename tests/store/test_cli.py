"""The db, repositories and settings commands against a real PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from click.testing import CliRunner, Result

from migration.store import SchemaOutdated, Store, schema_files
from service.cli import main
from tests.fixtures import temporary_database


@pytest.fixture(autouse=True, scope="module")
def _restore_structlog() -> Iterator[None]:
    # The commands quiet structlog when nothing configured it; undo that for other modules.
    yield
    structlog.reset_defaults()


def _run(database_url: str, *args: str) -> Result:
    return CliRunner().invoke(main, list(args), env={"MIGRATOR_DATABASE_URL": database_url})


def test_db_upgrade_is_idempotent(database_url: str) -> None:
    first = _run(database_url, "db", "upgrade")
    assert first.exit_code == 0, first.output
    assert first.stdout.startswith("applied 0001_initial")
    again = _run(database_url, "db", "upgrade")
    latest = schema_files()[-1][0]
    assert again.exit_code == 0 and f"schema up to date at {latest}" in again.stdout


def test_repositories_add_and_show(database_url: str) -> None:
    assert _run(database_url, "db", "upgrade").exit_code == 0
    added = _run(database_url, "repositories", "add", "cli/app/server",
                 "--created-at", "2021-03-01T00:00:00Z", "--tags", "40")  # fmt: skip
    assert added.exit_code == 0, added.output
    rid = int(added.stdout.strip())
    by_id = _run(database_url, "repositories", "show", str(rid))
    assert by_id.exit_code == 0 and "cli/app/server" in by_id.stdout
    assert "state            default" in by_id.stdout
    shown = _run(database_url, "repositories", "show", "cli/app/server", "--json")
    data = json.loads(shown.stdout)
    assert data["repository"]["id"] == rid and data["repository"]["tags_count"] == 40
    assert data["repository"]["created_at"].startswith("2021-03-01") and data["events"] == []
    missing = _run(database_url, "repositories", "show", "no/such")
    assert (
        missing.exit_code == 1
        and missing.stderr.strip() == "registry-migrator: no repository no/such"
    )


def test_repositories_add_refuses_bad_input_with_one_line(database_url: str) -> None:
    assert _run(database_url, "db", "upgrade").exit_code == 0
    for args in (["Bad/Path"], ["ok/path", "--created-at", "yesterday"],
                 ["ok/path", "--created-at", "2021-01-01T00:00:00"]):  # fmt: skip
        result = _run(database_url, "repositories", "add", *args)
        assert result.exit_code == 2, (args, result.output)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    dup = _run(database_url, "repositories", "add", "cli/dup")
    assert dup.exit_code == 0
    again = _run(database_url, "repositories", "add", "cli/dup")
    assert again.exit_code == 2 and "exists already" in again.stderr


def test_repositories_seed(database_url: str) -> None:
    assert _run(database_url, "db", "upgrade").exit_code == 0
    result = _run(database_url, "repositories", "seed", "--count", "300")
    assert result.exit_code == 0 and "added 300 repositories" in result.stdout


def test_settings_set_with_a_bad_value_exits_2_and_changes_nothing(database_url: str) -> None:
    assert _run(database_url, "db", "upgrade").exit_code == 0
    before = json.loads(_run(database_url, "settings", "show", "--json").stdout)
    for args in (["capacity=5", "max_retries=0"], ["capacity=-1"], ["nosuch=1"], ["capacity"]):
        result = _run(database_url, "settings", "set", *args)
        assert result.exit_code == 2, (args, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("registry-migrator: "), result.stderr
    assert json.loads(_run(database_url, "settings", "show", "--json").stdout) == before
    ok = _run(database_url, "settings", "set", "capacity=7", "root_namespace_deny_list=a,b")
    assert ok.exit_code == 0, ok.output
    after = json.loads(_run(database_url, "settings", "show", "--json").stdout)
    assert (after["capacity"], after["root_namespace_deny_list"]) == (7, ["a", "b"])


def test_pause_and_resume(database_url: str) -> None:
    assert _run(database_url, "db", "upgrade").exit_code == 0
    assert _run(database_url, "pause").exit_code == 0
    assert json.loads(_run(database_url, "settings", "show", "--json").stdout)["enabled"] is False
    assert _run(database_url, "resume").exit_code == 0
    assert json.loads(_run(database_url, "settings", "show", "--json").stdout)["enabled"] is True


def test_database_down_is_one_line_without_traceback() -> None:
    env = {**os.environ, "MIGRATOR_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/nothing"}
    done = subprocess.run(
        [str(Path(sys.executable).parent / "registry-migrator"), "settings", "show"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach PostgreSQL at 127.0.0.1:1/nothing" in lines[0]


def test_processes_refuse_a_schema_older_than_they_need(database_url: str) -> None:
    with temporary_database(database_url, prefix="test_old_schema") as url:
        newest = schema_files()[-1][0]
        with Store(url, max_size=1) as store:
            # The database as the previous release left it: the newest version not applied.
            store.require_schema()
            with store._connection() as conn:  # the test's own surgery, not the store's API
                conn.execute("DELETE FROM schema_migrations WHERE version = %s", (newest,))
            with pytest.raises(SchemaOutdated, match=f"needs {newest}.*db upgrade"):
                store.require_schema()
        env = {"MIGRATOR_NOTIFICATION_SECRET": "s3cret-for-the-test"}
        for args in (["settings", "show"], ["status", "--json"], ["repositories", "show", "1"],
                     ["api", "--port", "1"], ["scheduler", "--health-port", "0"]):  # fmt: skip
            result = CliRunner().invoke(main, args, env={"MIGRATOR_DATABASE_URL": url, **env})
            assert result.exit_code == 1, (args, result.output)
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1, (args, result.stderr)
            assert newest in lines[0] and "registry-migrator db upgrade" in lines[0], lines
        # A worker process exits at boot, saying why (Dramatiq's main process then stops).
        worker = subprocess.run(
            [str(Path(sys.executable).parent / "dramatiq"), "actors", "--processes", "1",
             "--threads", "1"],
            env={**os.environ, "MIGRATOR_DATABASE_URL": url}, capture_output=True, text=True,
            timeout=120, check=False,
        )  # fmt: skip
        assert worker.returncode != 0
        output = (worker.stdout + worker.stderr).splitlines()
        [said] = [line for line in output if "schema_outdated" in line]
        assert newest in said and "registry-migrator db upgrade" in said
        # db upgrade itself opens the store regardless, and is the fix.
        upgraded = _run(url, "db", "upgrade")
        assert upgraded.exit_code == 0 and f"applied {newest}" in upgraded.stdout
        assert _run(url, "settings", "show").exit_code == 0
