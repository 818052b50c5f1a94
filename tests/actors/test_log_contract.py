"""The enqueuer's log contract: every kind of ``enqueue_next_migration`` line a real worker
writes carries the reference's keys, and no key that the README's table does not explain.

GitLab's runbooks grep EnqueuerWorker's lines for ``import_type``, the settings it read and
the repository it worked on; an operator moving from it must find the same here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from devtools.launcher import LocalMigration
from migration.store import Store
from tests.actors.conftest import wait_until

README = Path(__file__).parents[2] / "README.md"
#: Keys every JSON log line has (structlog's and the message context's), not the run's.
ENVELOPE = {"event", "level", "timestamp", "logger", "actor", "message_id"}
BOOM = "lc/boom/app"


def documented_keys() -> set[str]:
    """The keys named in the first column of the README's enqueuer log table."""
    text = README.read_text(encoding="utf-8")
    table = text[
        text.index("**The enqueuer's log line.**") : text.index("**After a worker died.**")
    ]
    keys: set[str] = set()
    for row in re.findall(r"^\| ([^|]+) \|", table, flags=re.MULTILINE):
        keys.update(re.findall(r"`([a-z_]+)`", row))
    return keys


def _lines(run: LocalMigration) -> list[dict[str, Any]]:
    return [
        line
        for index in range(2)
        for line in run.log_events(f"worker-{index}", "enqueue_next_migration")
    ]


def _first(lines: list[dict[str, Any]], **match: object) -> dict[str, Any] | None:
    return next((x for x in lines if all(x.get(k) == v for k, v in match.items())), None)


def test_every_kind_of_enqueuer_line_keeps_the_contract(
    clean_store: Store, database_url: str, make_migration: Callable[..., LocalMigration]
) -> None:
    for path in ("lc/plain-one/app", "lc/fail-once-two/app", "lc/native-three/app", BOOM):
        clean_store.add_repository(path)
    # A run that raises while it works on a repository: PostgreSQL refuses BOOM's claim.
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            f" IF NEW.path = '{BOOM}' AND NEW.migration_state = 'pre_importing' THEN"
            " RAISE EXCEPTION 'boom: refused by a test trigger'; END IF; RETURN NEW; END $$"
        )
        conn.execute(
            "CREATE TRIGGER boom BEFORE UPDATE ON container_repositories"
            " FOR EACH ROW EXECUTE FUNCTION boom()"
        )
    clean_store.update_settings(capacity=4, enqueue_interval=1, enqueue_waiting_time=0)
    run = make_migration(
        workers=2,
        threads=2,
        simulator_args=["--pre-import-seconds", "0.1", "0.3", "--import-seconds", "0.1", "0.3"],
    )
    run.start()
    kinds: dict[str, dict[str, object]] = {
        "next": {"import_type": "next", "job_status": "started"},
        "retry": {"import_type": "retry"},
        "native": {"finish_reason": "native_import"},
        "error": {"job_status": "error", "container_repository_path": BOOM},
    }
    wait_until(
        lambda: all(_first(_lines(run), **m) for m in kinds.values()),
        timeout=90,
        what="a line of each kind",
    )
    clean_store.update_settings(capacity=0)
    kinds["at_capacity"] = {"job_status": "at_capacity"}
    wait_until(lambda: _first(_lines(run), **kinds["at_capacity"]), timeout=30, what="at_capacity")
    clean_store.update_settings(enabled=False)
    kinds["disabled"] = {"job_status": "disabled"}
    wait_until(lambda: _first(_lines(run), **kinds["disabled"]), timeout=30, what="disabled")

    documented = documented_keys()
    lines = _lines(run)
    for line in lines:
        undocumented = set(line) - ENVELOPE - documented
        assert not undocumented, (undocumented, line)
    named = {"container_repository_id", "container_repository_path",
             "container_repository_migration_state", "import_type", "fencing_token"}  # fmt: skip
    settings_read = {"migration_enabled", "below_capacity", "max_capacity_setting",
                     "current_waiting_time_setting", "in_flight"}  # fmt: skip
    for kind, match in kinds.items():
        line = _first(lines, **match)
        assert line is not None, kind
        assert {"job_status", "source", "duration_s", "migration_enabled"} <= set(line), kind
        if kind == "disabled":
            continue
        assert settings_read <= set(line), (kind, line)
        if kind in ("next", "retry", "native", "error"):
            assert named <= set(line), (kind, line)
        if kind == "error":
            assert "boom" in line["error"]
            assert line["container_repository_migration_state"] == "default"
    retry = _first(lines, **kinds["retry"])
    assert retry is not None and "fail-once" in retry["container_repository_path"]
