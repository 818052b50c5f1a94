"""A migration whose etcd fills up: stopped without a charge, resumed after the runbook.

The migration's etcd is private, with a 2 MiB ``--quota-backend-bytes`` and no
auto-compaction. Lease cycles of the test bring it to 95 % of the quota before the
migration starts, and fill the rest once a few repositories are done: etcd raises its
NOSPACE alarm mid-migration and refuses every write. Then, as for any etcd outage:

- runs, notifications and triggers fail on the lease or gate write, typed
  (:class:`~leases.EtcdNoSpace`), each logged once as ``etcd_nospace`` at error level with
  what to do;
- no repository is charged: no retry counted, none aborted or skipped;
- ``registry-migrator leases etcd-space`` exits 1 naming the alarm, ``--recover``
  (compact, defragment, disarm) exits 0, and the migration finishes by itself, every
  repository ``import_done`` with no retry.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from devtools.launcher import LocalMigration
from devtools.servers import EtcdCluster
from leases import EtcdClient, EtcdNoSpace, Session
from migration.states import State
from migration.store import Store
from tests.fixtures import wait_until
from tests.invariants import all_terminal
from tests.leases.test_etcd_space import MIB, lease_cycles

COUNT = 60
QUOTA = 2 * MIB


def _repositories(url: str, where: str) -> list[tuple[object, ...]]:
    """(id, state, retries, last step) of the repositories ``where`` says."""
    with psycopg.connect(url) as conn:
        query = sql.SQL(
            "SELECT id, migration_state, migration_retries_count, last_step_at"
            " FROM container_repositories WHERE {} ORDER BY id"
        ).format(sql.SQL(where))
        return conn.execute(query).fetchall()


def _charged(url: str) -> list[tuple[object, ...]]:
    """Repositories with a retry counted, or aborted or skipped."""
    return _repositories(
        url,
        "migration_retries_count > 0 OR migration_state IN ('import_aborted', 'import_skipped')",
    )


def _moving(url: str) -> list[tuple[object, ...]]:
    """Repositories not yet terminal."""
    return _repositories(url, "migration_state NOT IN ('import_done', 'import_skipped')")


def _nospace_lines(run: LocalMigration) -> Counter[str]:
    found: Counter[str] = Counter()
    for name in ("worker-0", "scheduler-0", "api"):
        for line in run.log_events(name, "etcd_nospace"):
            assert line["level"] == "error"
            assert "etcd-space --recover" in line["action"]
            found[str(line["where"])] += 1
    return found


def _etcd_space(run: LocalMigration, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).with_name("registry-migrator")), "leases", "etcd-space", *args],
        env={**os.environ, **run.env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_full_etcd_stops_the_migration_uncharged_until_recovered(
    clean_store: Store,
    database_url: str,
    make_migration: Callable[..., LocalMigration],
    tmp_path: Path,
) -> None:
    for n in range(COUNT):
        clean_store.add_repository(f"nospace/project-{n}/image", tags_count=3)
    clean_store.update_settings(
        capacity=5, enqueue_interval=1, guard_interval=1, max_step_duration=5
    )
    with EtcdCluster(
        members=1, data_root=tmp_path / "etcd", extra_args=[f"--quota-backend-bytes={QUOTA}"]
    ) as etcd:
        host, port = etcd.endpoints[0].rsplit(":", 1)
        with EtcdClient([(host, int(port))], timeout=5) as client, Session(client) as filler:
            # Sampled often and stopped short of the quota: the filler outruns the samples
            # (about 100 KB per 0.2 s here), and a prefill that ended past the quota left
            # the migration unable to start at all (CI: NOSPACE at the first lease grant).
            prefill = lease_cycles(
                filler, "/filler", count=None, sample_every=0.05, until_db_size=int(0.9 * QUOTA)
            )
            assert client.alarms() == [], f"the prefill filled etcd ({prefill.max_db_size} B)"
        assert prefill.error is None, prefill.error
        run = make_migration(
            env={"MIGRATOR_ETCD_ENDPOINTS": etcd.endpoints[0]},
            workers=1,
            threads=4,
            simulator_args=["--pre-import-seconds", "0.3", "1.0", "--import-seconds", "0.3",
                            "1.0"],
        )  # fmt: skip
        run.start(timeout=120)
        started_at = time.monotonic()
        wait_until(
            lambda: clean_store.counts_by_state().get(State.IMPORT_DONE, 0) >= 3,
            timeout=120,
            what="a few repositories migrated",
        )
        with EtcdClient([(host, int(port))], timeout=5) as client, Session(client) as filler:
            rest = lease_cycles(filler, "/filler-rest", count=None, sample_every=0.2)
        assert isinstance(rest.error, EtcdNoSpace), rest.error
        full_at = time.monotonic()
        done_at_alarm = clean_store.counts_by_state().get(State.IMPORT_DONE, 0)
        assert done_at_alarm < COUNT, "the migration ended before etcd was full"

        # The migration meets the alarm: every process that writes to etcd says so.
        wait_until(
            lambda: sum(_nospace_lines(run).values()) >= 3,
            timeout=60,
            what="etcd_nospace lines from the migration",
        )
        time.sleep(5)  # runs, notifications and the guard keep failing meanwhile
        stalled = clean_store.counts_by_state()
        assert _charged(database_url) == []
        report = _etcd_space(run)
        assert report.returncode == 1, report.stdout + report.stderr
        assert "NOSPACE" in report.stdout

        recovered = _etcd_space(run, "--recover")
        assert recovered.returncode == 0, recovered.stdout + recovered.stderr
        assert "disarmed 1 NOSPACE alarm(s)" in recovered.stdout
        recovered_at = time.monotonic()
        try:
            wait_until(
                lambda: all_terminal(clean_store),
                timeout=240,
                interval=0.5,
                what=f"{COUNT} repositories terminal after the recovery",
            )
        except AssertionError as error:
            raise AssertionError(f"{error}; still moving: {_moving(database_url)}") from None
        finished_at = time.monotonic()
        lines = _nospace_lines(run)
        undone = {
            event: sum(len(run.log_events(name, event)) for name in ("worker-0", "scheduler-0"))
            for event in ("lease_create_undone", "lease_create_uncertain", "lease_released_late")
        }
    counts = {state: n for state, n in clean_store.counts_by_state().items() if n}
    print(
        f"\nprefilled with {prefill.done} cycles to {prefill.max_db_size} B, filled with"
        f" {rest.done} more; NOSPACE"
        f" {full_at - started_at:.1f} s into the migration, {done_at_alarm} repositories done;"
        f" during the alarm: { {str(k): v for k, v in stalled.items() if v} };"
        f" etcd_nospace lines by where: {dict(lines)}; recovered"
        f" {recovered_at - full_at:.1f} s after the alarm; all terminal"
        f" {finished_at - recovered_at:.1f} s after the recovery; keys etcd created but"
        f" answered NOSPACE: {undone}"
    )
    print(recovered.stdout.strip())
    assert counts == {State.IMPORT_DONE: COUNT}
    assert _charged(database_url) == []


pytestmark = pytest.mark.timeout(900)
