"""The shared view of the registry's health (invariant 7), against real etcd, PostgreSQL and
the simulator over HTTP: the breaker opens on a connection error and on soft faults in a
row, probes when its window has passed, closes on success and doubles its window on
failure; a refused token pauses the migration with a reason, and resume clears it."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest

from devtools.simulator import SimulatorServer
from leases import EtcdClient, SharedBreaker
from migration.config import Config
from migration.registry import RegistryClient
from migration.registry_health import RegistryHealth
from migration.store import Store


@pytest.fixture
def etcd(stack: dict[str, str]) -> Iterator[EtcdClient]:
    with Config.from_env().etcd_client() as client:
        yield client


@pytest.fixture
def breaker(etcd: EtcdClient) -> Iterator[SharedBreaker]:
    name = f"/test-{uuid.uuid4().hex[:8]}/breakers/registry"
    yield SharedBreaker(etcd, name, threshold=3)
    etcd.delete_prefix(name + "/")


def health_for(
    breaker: SharedBreaker, store: Store, url: str, opened: list[float], **options: object
) -> tuple[RegistryHealth, RegistryClient]:
    registry = RegistryClient(url, timeout=3, too_many_retries=0, **options)  # type: ignore[arg-type]
    health = RegistryHealth(breaker=breaker, store=store, registry=registry, on_open=opened.append)
    return health, registry


def wait_until(predicate, timeout: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def test_a_connection_error_opens_it_and_a_probe_closes_it(
    breaker: SharedBreaker, clean_store: Store
) -> None:
    clean_store.update_settings(registry_breaker_max_window=2)
    opened: list[float] = []
    with SimulatorServer() as simulator:
        port = simulator.url.rsplit(":", 1)[1]
    # The simulator is gone: its port refuses connections.
    health, registry = health_for(breaker, clean_store, f"http://127.0.0.1:{port}", opened)
    settings = clean_store.settings()
    assert health.admit(settings) is None  # closed: one read, go ahead
    registry.status("group/app")  # refused: opens at once
    health.flush(timeout=10)  # recorded by the health's own thread, not in the step
    assert opened == [2.0]  # the first window, capped by the setting
    state = health.admit(settings)
    assert state is not None and state.open
    assert "connect" in state.reason
    # Another process's client sees the same breaker.
    assert SharedBreaker(breaker.client, breaker.name).state().open
    # The window passes (etcd expires the lease): half-open; the probe fails: reopened,
    # window doubled (capped by the setting at 2 s here, so we raise the cap first).
    clean_store.update_settings(registry_breaker_max_window=10)
    wait_until(lambda: breaker.state().half_open, timeout=6)
    again = health.admit(clean_store.settings())
    assert again is not None and again.open and again.window == 4.0
    assert opened == [2.0, 4.0]
    registry.close()
    # The registry is back on the same port: after the window the probe closes it.
    with SimulatorServer(port=int(port)) as back:
        health, registry = health_for(breaker, clean_store, back.url, opened)
        wait_until(lambda: breaker.state().half_open, timeout=8)
        assert health.admit(clean_store.settings()) is None
        assert breaker.state().closed
        registry.close()


def test_soft_faults_open_it_only_in_a_row(breaker: SharedBreaker, clean_store: Store) -> None:
    opened: list[float] = []
    with SimulatorServer() as simulator:
        health, registry = health_for(breaker, clean_store, simulator.url, opened)
        health.admit(clean_store.settings())
        simulator.configure(start_error_rate=1.0)
        registry.start_pre_import("group/a")
        registry.start_pre_import("group/b")
        health.flush(timeout=10)
        assert breaker.state().failures == 2
        simulator.configure(start_error_rate=0.0)
        registry.start_pre_import("group/c")  # a success: the two are no longer in a row
        health.flush(timeout=10)
        assert breaker.state().failures == 0
        simulator.configure(start_error_rate=1.0)
        for name in ("d", "e"):
            registry.start_pre_import(f"group/{name}")
        health.flush(timeout=10)
        assert opened == []
        registry.start_pre_import("group/f")  # the third in a row
        health.flush(timeout=10)
        assert len(opened) == 1 and breaker.state().open
        registry.close()


def test_a_refused_token_pauses_the_migration_until_resume(
    breaker: SharedBreaker, clean_store: Store
) -> None:
    opened: list[float] = []
    with SimulatorServer() as simulator:
        simulator.configure(token="the-right-one")
        health, registry = health_for(breaker, clean_store, simulator.url, opened)
        registry.start_pre_import("group/a")
        health.flush(timeout=10)
        settings = clean_store.settings()
        assert settings.enabled is False
        assert settings.paused_reason is not None and "401" in settings.paused_reason
        assert opened == []  # a token is not an outage: no breaker
        registry.start_pre_import("group/b")  # still refused: paused once, not again
        assert clean_store.update_settings(enabled=True).paused_reason is None
        registry.close()


def test_a_closed_read_is_reused_until_a_fault_is_seen(
    breaker: SharedBreaker, clean_store: Store
) -> None:
    """A closed breaker is read once per ``closed_reuse`` (a long one here, so that no
    timing decides): another process's opening is not read meanwhile, a registry fault this
    process sees ends the reuse at once, and an open breaker is read every time."""
    opened: list[float] = []
    settings = clean_store.settings()
    with SimulatorServer() as simulator:
        registry = RegistryClient(simulator.url, timeout=3, too_many_retries=0)
        health = RegistryHealth(
            breaker=breaker, store=clean_store, registry=registry, on_open=opened.append,
            closed_reuse=3600,
        )  # fmt: skip
        assert health.admit(settings) is None  # read: closed
        SharedBreaker(breaker.client, breaker.name).trip("another process")
        assert health.admit(settings) is None  # the closed read is reused
        simulator.configure(start_error_rate=1.0)
        registry.start_pre_import("group/a")  # a registry fault seen here
        health.flush(timeout=10)
        state = health.admit(settings)  # read again: the other process's opening
        assert state is not None and state.open and state.reason == "another process"
        assert health.admit(settings) is not None  # open: read every time, still open
        registry.close()
        health.close()
