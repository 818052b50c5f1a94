"""No secret or password in any log line.

A whole local migration (simulator, API, worker, scheduler) runs with recognisable
secrets: the notification secret, the registry token, the etcd password (of a private etcd
with auth on), and a PostgreSQL password in the database URL (the stack trusts loopback,
so any password is accepted). It migrates a few repositories, refuses requests with a
missing or wrong secret, and every line every process wrote is then searched for them.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
from click.testing import CliRunner

from devtools.launcher import LocalMigration
from migration.states import State
from migration.store import Store
from service.cli import main
from tests.security.conftest import AuthEtcd


def _with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    user = parts.username or "postgres"
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}"))


def test_no_secret_appears_in_any_log(
    stack: dict[str, str],
    database_url: str,
    clean_store: Store,
    auth_etcd: AuthEtcd,
    tmp_path: Path,
) -> None:
    secrets = {
        "notification secret": f"notif-SECRET-{uuid.uuid4().hex}",
        "registry token": f"registry-TOKEN-{uuid.uuid4().hex}",
        "database password": f"db-PASSWORD-{uuid.uuid4().hex}",
        "etcd password": auth_etcd.password,
    }
    env = {
        **stack,
        "MIGRATOR_DATABASE_URL": _with_password(database_url, secrets["database password"]),
        "MIGRATOR_ETCD_ENDPOINTS": f"{auth_etcd.endpoint[0]}:{auth_etcd.endpoint[1]}",
        "MIGRATOR_ETCD_USER": auth_etcd.user,
        "MIGRATOR_ETCD_PASSWORD": auth_etcd.password,
        "MIGRATOR_REGISTRY_TOKEN": secrets["registry token"],
        "MIGRATOR_LOG_LEVEL": "debug",  # the most there is to leak
    }
    ids = [clean_store.add_repository(f"group/secret-{n}", tags_count=3) for n in range(6)]
    clean_store.update_settings(capacity=3, enqueue_interval=1, guard_interval=2)
    run = LocalMigration(
        env=env,
        log_dir=tmp_path / "logs",
        workers=1,
        threads=2,
        schedulers=1,
        secret=secrets["notification secret"],
        etcd_prefix=f"{auth_etcd.prefix}/secrets-{uuid.uuid4().hex[:8]}",
        lease_ttl=3,
    )
    with run:
        url = f"{run.api_url}/notifications/registry/repositories/group/secret-0/status"
        body = {"name": "secret-0", "path": "group/secret-0", "status": "import_complete"}
        refused = [
            httpx.put(url, json=body, headers=headers, timeout=10).status_code
            for headers in (
                {},
                {"Authorization": "wrong"},
                {"Authorization": secrets["notification secret"][:-1]},
                {"Authorization": f"Bearer {secrets['notification secret']}"},
            )
        ]
        assert refused == [401] * 4
        assert httpx.get(f"{run.api_url}/readyz", timeout=10).status_code == 200
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            states = [clean_store.get(i).migration_state for i in ids]  # type: ignore[union-attr]
            if all(s is State.IMPORT_DONE for s in states):
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"not all migrated in time: {states}\n{run.log_path('worker-0')}")
        cli_env = {**env, "MIGRATOR_ETCD_PREFIX": run.env["MIGRATOR_ETCD_PREFIX"]}
        for command in (["leases", "list"], ["settings", "show"], ["status"]):
            result = CliRunner().invoke(main, command, env=cli_env)
            (tmp_path / "logs" / f"cli-{command[0]}.log").write_text(result.stdout + result.stderr)
        # A wrong etcd password: the error says so, without the password given.
        wrong = CliRunner().invoke(
            main,
            ["leases", "list"],
            env={**cli_env, "MIGRATOR_ETCD_PASSWORD": "x" + secrets["etcd password"]},
        )
        assert wrong.exit_code != 0
        (tmp_path / "logs" / "cli-wrong-password.log").write_text(wrong.stdout + wrong.stderr)
    logs = sorted((tmp_path / "logs").glob("*.log"))
    assert {p.name for p in logs} >= {"api.log", "worker-0.log", "scheduler-0.log", "simulator.log"}
    total = 0
    for path in logs:
        text = path.read_text(errors="replace")
        total += len(text.splitlines())
        for name, value in secrets.items():
            assert value not in text, f"the {name} appears in {path.name}"
    assert total > 50, "the processes should have logged their work"
