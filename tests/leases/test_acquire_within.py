"""acquire_within and Election.campaign: wait out a holder with a watch, or give up after
the timeout, on the real etcd."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from leases import Election, EtcdClient, HolderInfo, Session, acquire_within, try_acquire
from leases.etcd import CreateResult

TTL = 10


@pytest.fixture
def waiter_client(etcd_endpoints: list[tuple[str, int]]) -> Iterator[EtcdClient]:
    """A client of the waiter's own, so that what it sends can be counted apart."""
    with EtcdClient(etcd_endpoints, timeout=3) as etcd:
        yield etcd


def count_calls(monkeypatch: pytest.MonkeyPatch, client: EtcdClient, name: str) -> list[float]:
    """Record the time of every call of ``client.<name>`` (the call still goes to etcd)."""
    calls: list[float] = []
    real = getattr(client, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(time.monotonic())
        return real(*args, **kwargs)

    monkeypatch.setattr(client, name, counted)
    return calls


def test_takes_the_key_soon_after_the_holder_lets_go_without_polling(
    client: EtcdClient,
    waiter_client: EtcdClient,
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = f"{prefix}/repo/1"
    hold_for = 2.0
    with Session(client, ttl=TTL) as first, Session(waiter_client, ttl=TTL) as second:
        hold = try_acquire(first, key, holder=HolderInfo(actor="first")).hold
        assert hold is not None
        transactions = count_calls(monkeypatch, waiter_client, "create")
        # Dated when the release starts, not when its call returns: the waiter may see
        # etcd's delete and take the key before the releasing thread runs again.
        released_at: list[float] = []

        def release() -> None:
            released_at.append(time.monotonic())
            assert hold.release()

        threading.Timer(hold_for, release).start()
        began = time.monotonic()
        acquisition = acquire_within(second, key, timeout=TTL, holder=HolderInfo(actor="second"))
        acquired_at = time.monotonic()
        assert acquisition.hold is not None
        assert acquisition.hold.token > hold.token
        assert released_at, "acquired before the holder let go"
        delay = acquired_at - released_at[0]
        # Generous bound (the machine is shared): well within a TTL of the release.
        assert 0 <= delay < TTL / 2, delay
        # One failed try, one after the delete: not one per poll interval (a 0.2 s poll would
        # have made about ten in the two seconds held).
        assert len(transactions) == 2, transactions
        print(
            f"\nwaiter: waited {acquired_at - began:.3f} s, acquired {delay * 1000:.1f} ms"
            f" after the release, {len(transactions)} transactions"
        )
        acquisition.hold.release()


def test_gives_up_after_the_timeout_with_the_holder(
    client: EtcdClient, waiter_client: EtcdClient, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = f"{prefix}/repo/2"
    with Session(client, ttl=TTL) as first, Session(waiter_client, ttl=TTL) as second:
        hold = try_acquire(first, key, holder=HolderInfo(actor="first")).hold
        assert hold is not None
        transactions = count_calls(monkeypatch, waiter_client, "create")
        began = time.monotonic()
        acquisition = acquire_within(second, key, timeout=1.5)
        waited = time.monotonic() - began
        assert acquisition.hold is None
        assert acquisition.holder is not None and acquisition.holder.actor == "first"
        assert 1.3 < waited < 4.0, waited
        # The watch saw no delete: the try before it is the only one (the last answer).
        assert len(transactions) == 1, transactions
        hold.release()


def test_a_put_to_the_held_key_does_not_wake_the_waiter(
    client: EtcdClient, waiter_client: EtcdClient, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fenced write under the holder's key changes it without deleting it: no retry."""
    key = f"{prefix}/repo/3"
    with Session(client, ttl=TTL) as first, Session(waiter_client, ttl=TTL) as second:
        hold = try_acquire(first, key).hold
        assert hold is not None
        transactions = count_calls(monkeypatch, waiter_client, "create")
        threading.Timer(0.3, lambda: client.put(key, b"rewritten", lease_id=first.lease_id)).start()
        acquisition = acquire_within(second, key, timeout=1.5)
        assert acquisition.hold is None
        assert len(transactions) == 1, transactions
        hold.release()


def test_a_deleted_holder_that_comes_back_is_waited_for_again(
    client: EtcdClient, waiter_client: EtcdClient, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The delete wakes the waiter, but a third party took the key first: it waits again."""
    key = f"{prefix}/repo/4"
    with Session(client, ttl=TTL) as first, Session(waiter_client, ttl=TTL) as second:
        hold = try_acquire(first, key).hold
        assert hold is not None
        transactions = count_calls(monkeypatch, waiter_client, "create")
        results: list[CreateResult] = []

        def release_and_retake() -> None:
            assert hold.release()
            results.append(client.create(key, b"third", lease_id=first.lease_id))

        # Released and taken again at once: the waiter's retry may come before or after.
        threading.Timer(0.3, release_and_retake).start()
        acquisition = acquire_within(second, key, timeout=1.5)
        assert len(transactions) <= 3, transactions
        if results and results[0].created:
            assert acquisition.hold is None
            assert acquisition.holder is not None and acquisition.holder.actor == "third"
        else:
            assert acquisition.hold is not None
            acquisition.hold.release()


def test_campaign_leads_soon_after_the_leader_resigns_without_polling(
    client: EtcdClient, waiter_client: EtcdClient, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"{prefix}/election"
    with Session(client, ttl=TTL) as first, Session(waiter_client, ttl=TTL) as second:
        leader = Election(first, name)
        assert leader.is_leader()
        follower = Election(second, name)
        reads = count_calls(monkeypatch, waiter_client, "last_created_before")
        # Dated when the resign starts (see the test above for why).
        resigned_at: list[float] = []

        def resign() -> None:
            resigned_at.append(time.monotonic())
            leader.resign()

        threading.Timer(2.0, resign).start()
        assert follower.campaign()
        led_at = time.monotonic()
        assert resigned_at, "led before the leader resigned"
        assert led_at - resigned_at[0] < TTL / 2
        # One read finds the leader ahead, one after its delete finds nobody: not a read
        # every poll interval.
        assert len(reads) == 2, reads
        follower.resign()


def test_campaign_returns_false_when_stopped(
    client: EtcdClient, waiter_client: EtcdClient, prefix: str
) -> None:
    name = f"{prefix}/election"
    with Session(client, ttl=TTL) as first, Session(waiter_client, ttl=TTL) as second:
        leader = Election(first, name)
        assert leader.is_leader()
        stop = threading.Event()
        threading.Timer(0.3, stop.set).start()
        began = time.monotonic()
        assert not Election(second, name, wake_interval=0.5).campaign(stop)
        assert time.monotonic() - began < 3.0
        leader.resign()
