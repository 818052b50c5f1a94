"""The dedup gate's marker lease, against the real etcd: one lease per window, bounded life.

(The gate's slot semantics — 1,000 concurrent enters leave exactly P — are in
test_leases.py.)
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from leases import DedupGate, EtcdClient, EtcdNoSpace, Ticket
from tests.leases.test_leases import NOSPACE, failing


def _lease_of(client: EtcdClient, ticket: Ticket) -> int:
    marker = client.get(ticket.key)
    assert marker is not None, f"marker {ticket.key} is gone"
    return marker.lease_id


def test_enters_within_a_window_share_one_lease(client: EtcdClient, prefix: str) -> None:
    # Eight threads share the gate, as the worker threads of one process do.
    gate = DedupGate(client, f"{prefix}/gate", slots=40, ttl=30)
    with ThreadPoolExecutor(max_workers=8) as pool:
        tickets = list(pool.map(lambda _: gate.enter(), range(40)))
    entered = [t for t in tickets if t is not None]
    assert len(entered) == 40
    leases = {kv.lease_id for kv in client.get_prefix(f"{prefix}/gate/")}
    assert len(leases) == 1, f"{len(leases)} leases granted for 40 markers"
    assert 0 < client.time_to_live(leases.pop()) <= 30


def test_a_new_lease_once_half_the_ttl_is_gone(client: EtcdClient, prefix: str) -> None:
    ttl = 6
    gate = DedupGate(client, f"{prefix}/gate", slots=2, ttl=ttl)
    first = gate.enter()
    assert first is not None
    second = gate.enter()  # at once: the same lease
    assert second is not None
    assert _lease_of(client, first) == _lease_of(client, second)
    assert gate.leave(first)
    # Past half of the TTL: the next marker goes on a fresh lease. A sleep only ever runs
    # long, and the second marker's lease lives 2.8 s more: room for a loaded machine.
    time.sleep(ttl / 2 + 0.2)
    third = gate.enter()
    assert third is not None
    assert _lease_of(client, third) != _lease_of(client, second)
    assert client.time_to_live(_lease_of(client, third)) > ttl / 2


def test_a_lost_marker_on_a_reused_lease_frees_its_slot_within_the_ttl(
    client: EtcdClient, prefix: str
) -> None:
    ttl = 8
    gate = DedupGate(client, f"{prefix}/gate", slots=1, ttl=ttl)
    granted = time.monotonic()
    opened = gate.enter()
    assert opened is not None
    shared = _lease_of(client, opened)
    assert gate.leave(opened)
    # The lease is still reused: it has more than half its TTL left (2.5 s of room for a
    # sleep that runs long on a loaded machine).
    time.sleep(1.5)
    lost = gate.enter()  # its message is never started: nobody leaves it
    created = time.monotonic()
    assert lost is not None
    assert created - granted < ttl / 2, "too slow to test a reused lease"
    assert _lease_of(client, lost) == shared, "the lease was not reused"
    assert gate.enter() is None
    while gate.enter() is None:
        assert time.monotonic() - created < ttl + 1, "a lost marker outlived its TTL"
        time.sleep(0.1)
    # It went with the lease it shared, earlier than a fresh lease's TTL.
    assert time.monotonic() - created < ttl


def test_enter_recovers_when_its_lease_was_revoked(client: EtcdClient, prefix: str) -> None:
    gate = DedupGate(client, f"{prefix}/gate", slots=2, ttl=30)
    first = gate.enter()
    assert first is not None
    lease_id = _lease_of(client, first)
    client.revoke(lease_id)  # e.g. an operator's cleanup: the marker goes with it
    assert gate.pending() == 0
    second = gate.enter()
    assert second is not None
    assert _lease_of(client, second) != lease_id
    assert gate.pending() == 1


def test_a_marker_created_but_answered_nospace_does_not_fill_its_slot(
    client: EtcdClient, prefix: str
) -> None:
    # etcd applies the write that crosses its quota and answers NOSPACE: such a marker,
    # left there, would hold its slot for the TTL with no message behind it.
    gate = DedupGate(client, f"{prefix}/gate", slots=1, ttl=60)
    with failing(client, "create", NOSPACE, after_the_call=True), pytest.raises(EtcdNoSpace):
        gate.enter()
    assert gate.pending() == 0
    assert gate.enter() is not None, "the slot stayed taken"
