"""A key its own session holds is answered busy without asking etcd, on the real etcd.

Runs in parallel read the same candidates, and in a worker process many of them share one
session: a run that tries a key another run of its process holds is told so by the session
(no create, which etcd would put through a write's round to refuse). The answer must stay
exact: busy only while the key is ours in etcd, and etcd asked again once it is deleted,
also when the delete first failed and was made later in the background; and only for a
while (``trust_own_holds_for``), since an operator may delete the key of a stuck holder.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from leases import (
    EtcdClient,
    EtcdUnavailable,
    HolderInfo,
    Session,
    acquire_within,
    release,
    try_acquire,
)

TTL = 3


@pytest.fixture
def other_client(etcd_endpoints: list[tuple[str, int]]) -> Iterator[EtcdClient]:
    """Another process's client, in effect: its own connection and session."""
    with EtcdClient(etcd_endpoints, timeout=3) as etcd:
        yield etcd


def count_creates(monkeypatch: pytest.MonkeyPatch, client: EtcdClient) -> list[str]:
    """The keys of every create ``client`` sends (each still goes to etcd)."""
    keys: list[str] = []
    real = client.create

    def counted(key: str, *args: Any, **kwargs: Any) -> Any:
        keys.append(key)
        return real(key, *args, **kwargs)

    monkeypatch.setattr(client, "create", counted)
    return keys


def test_a_key_held_by_another_thread_of_the_session_is_busy_without_a_create(
    client: EtcdClient,
    other_client: EtcdClient,
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = f"{prefix}/repo/1"
    with Session(client, ttl=TTL) as session, Session(other_client, ttl=TTL) as other:
        first = try_acquire(session, key, holder=HolderInfo(actor="first")).hold
        assert first is not None
        creates = count_creates(monkeypatch, client)
        answers: list[Any] = []
        thread = threading.Thread(
            target=lambda: answers.append(
                try_acquire(session, key, holder=HolderInfo(actor="second"))
            )
        )
        thread.start()
        thread.join()
        [here] = answers
        assert here.hold is None and here.held_here
        assert (here.holder.actor, here.holder_token) == ("first", first.token)
        assert here.holder_lease_id == session.lease_id
        assert creates == []
        # Another session is told the same by etcd.
        there = try_acquire(other, key, holder=HolderInfo(actor="other"))
        assert there.hold is None and not there.held_here
        assert (there.holder and there.holder.actor, there.holder_token) == ("first", first.token)
        # Released: the session asks etcd again, and a newer incarnation is ours.
        assert first.release()
        again = try_acquire(session, key, holder=HolderInfo(actor="second"))
        assert again.hold is not None and again.hold.token > first.token
        assert creates == [key]
        again.hold.release()


def test_a_release_that_failed_keeps_the_key_busy_here_until_its_late_delete(
    client: EtcdClient, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = f"{prefix}/repo/2"
    with Session(client, ttl=TTL) as session:
        hold = try_acquire(session, key, holder=HolderInfo(actor="first")).hold
        assert hold is not None
        real_delete = client.delete_if_created_at
        etcd_away = threading.Event()
        etcd_away.set()

        def delete_failing_while_away(*args: Any, **kwargs: Any) -> bool:
            if etcd_away.is_set():
                raise EtcdUnavailable("injected: the delete's answer was lost")
            return real_delete(*args, **kwargs)

        monkeypatch.setattr(client, "delete_if_created_at", delete_failing_while_away)
        with pytest.raises(EtcdUnavailable):
            hold.release()
        # Still on our lease in etcd: busy here, with the hold's token.
        busy = try_acquire(session, key)
        assert busy.held_here and busy.holder_token == hold.token
        assert client.get(key) is not None
        assert session.unreleased() == [(key, hold.token)]
        etcd_away.clear()
        # The session deletes it in the background (every TTL / 3); then etcd is asked.
        deadline = time.monotonic() + 5 * TTL
        while session.unreleased() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert session.unreleased() == []
        assert client.get(key) is None
        taken = try_acquire(session, key)
        assert taken.hold is not None and not taken.held_here
        taken.hold.release()


def test_acquire_within_waits_for_a_hold_of_its_own_session(
    client: EtcdClient, prefix: str
) -> None:
    # The wait watches etcd from the revision its create read: it never takes the
    # session's word, so it still gets the key when the other thread lets go.
    key = f"{prefix}/repo/3"
    with Session(client, ttl=TTL) as session:
        first = try_acquire(session, key, holder=HolderInfo(actor="first")).hold
        assert first is not None
        threading.Timer(0.5, first.release).start()
        acquisition = acquire_within(session, key, timeout=TTL, holder=HolderInfo(actor="next"))
        assert acquisition.hold is not None and acquisition.hold.token > first.token
        assert not acquisition.held_here
        acquisition.hold.release()


def test_an_operators_release_reaches_the_session_once_the_hold_is_no_longer_fresh(
    client: EtcdClient, prefix: str
) -> None:
    # An operator frees the key of a holder that is stuck in its step. The session's own
    # word is trusted only for trust_own_holds_for after the take; then etcd is asked, and
    # the key is taken by another thread of the same process.
    key = f"{prefix}/repo/4"
    trusted = 0.5
    with Session(client, ttl=TTL, trust_own_holds_for=trusted) as session:
        stuck = try_acquire(session, key, holder=HolderInfo(actor="stuck")).hold
        assert stuck is not None
        assert release(client, key)
        assert try_acquire(session, key).held_here  # still fresh: the session's word
        time.sleep(trusted)
        taken = try_acquire(session, key, holder=HolderInfo(actor="next"))
        assert taken.hold is not None and taken.hold.token > stuck.token
        assert not stuck.release()  # the stuck hold, let go at last, leaves the new one
        assert taken.hold.is_current()
        taken.hold.release()
