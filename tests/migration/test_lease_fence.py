"""Invariant 8: no registry call once the lease may be gone, against real etcd (a session
and its hold), PostgreSQL and the simulator over HTTP."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from devtools.simulator import SimulatorServer
from leases import EtcdClient, Session, try_acquire
from migration.config import Config
from migration.migrator import LEASE_SLACK, LeaseAtRisk, Migrator, StepOutcome, Writer
from migration.registry import RegistryClient
from migration.states import State
from migration.store import Store


@pytest.fixture
def etcd(stack: dict[str, str]) -> Iterator[EtcdClient]:
    with Config.from_env().etcd_client() as client:
        yield client


def _starts(simulator: SimulatorServer) -> int:
    return sum(1 for e in simulator.report(events=True)["events"] if e.get("action") == "start")


def _writer(session: Session) -> Writer:
    acquisition = try_acquire(session, f"/test-fence-{uuid.uuid4().hex[:8]}/key")
    assert acquisition.hold is not None
    hold = acquisition.hold
    return Writer(token=hold.token, actor="test", message_id=None, lease=hold)


def test_a_live_lease_shortens_the_call_timeout_to_what_it_has_left(etcd: EtcdClient) -> None:
    with Session(etcd, ttl=3) as session:
        writer = _writer(session)
        allowed = writer.fence(30.0)
        assert 0.5 <= allowed <= 3 - LEASE_SLACK
        assert writer.fence(0.2) == 0.2  # a shorter client timeout stands


def test_no_registry_call_once_the_lease_is_gone(etcd: EtcdClient, clean_store: Store) -> None:
    repo_id = clean_store.add_repository(
        "fence/gone/app", created_at=datetime.now(UTC) - timedelta(days=1)
    )
    with SimulatorServer() as simulator, RegistryClient(simulator.url) as registry:
        migrator = Migrator(clean_store, registry)
        session = Session(etcd, ttl=3)
        writer = _writer(session)
        session.close()  # revoked: as after a pause or a partition past the TTL
        with pytest.raises(LeaseAtRisk):
            writer.fence(5.0)
        repository = clean_store.get(repo_id)
        assert repository is not None
        report = migrator.start(repository, clean_store.settings(), writer)
        assert report.outcome is StepOutcome.LEASE_AT_RISK
        assert _starts(simulator) == 0  # the start was never sent
        row = clean_store.get(repo_id)
        assert row is not None
        # The claim was written (the store fences by token, not by etcd) and undone.
        assert (row.migration_state, row.migration_retries_count) == (State.DEFAULT, 0)
        # The retry path: its status read is not sent either, and nothing is written.
        before = len(simulator.report(events=True)["events"])
        report = migrator.reconcile_stale(row, clean_store.settings(), writer)
        assert report.outcome is StepOutcome.LEASE_AT_RISK
        assert len(simulator.report(events=True)["events"]) == before
