"""EtcdClient's hand-encoded transactions (leases._wire) against the real etcd.

What each of create / delete_if_created_at / put_if_created_at returns must agree with what
etcd stores, as read back through the protobuf path (``get``).
"""

from __future__ import annotations

from leases import EtcdClient


def test_create_returns_the_key_as_etcd_stores_it(client: EtcdClient, prefix: str) -> None:
    lease_id, _ = client.grant(30)
    try:
        key = f"{prefix}/ünï/☃ repo"
        value = "holder ✓".encode() + bytes(range(256))
        mine = client.create(key, value, lease_id=lease_id)
        assert mine.created and mine.current is not None
        stored = client.get(key)
        assert stored == mine.current
        assert stored.lease_id == lease_id and stored.value == value

        # Busy: the failure branch's range answer is decoded into the holder's key as is.
        busy = client.create(key, b"someone else", lease_id=0)
        assert not busy.created
        assert busy.current == stored
    finally:
        client.revoke(lease_id)
    assert client.get(key) is None  # the put went on the lease


def test_create_with_an_empty_value_and_no_lease(client: EtcdClient, prefix: str) -> None:
    key = f"{prefix}/empty"
    result = client.create(key, b"")
    assert result.created and result.current is not None
    stored = client.get(key)
    assert stored == result.current
    assert stored.value == b"" and stored.lease_id == 0
    busy = client.create(key, b"x")
    assert not busy.created and busy.current == stored
    assert client.delete_if_created_at(key, stored.create_revision)


def test_delete_if_created_at_only_deletes_that_incarnation(
    client: EtcdClient, prefix: str
) -> None:
    key = f"{prefix}/k"
    first = client.create(key, b"1").current
    assert first is not None
    assert not client.delete_if_created_at(key, first.create_revision + 1_000_000)
    assert not client.delete_if_created_at(key, 0)
    assert client.get(key) == first
    assert client.delete_if_created_at(key, first.create_revision)
    assert client.get(key) is None
    assert not client.delete_if_created_at(key, first.create_revision)  # already gone


def test_put_if_created_at_writes_only_under_the_current_incarnation(
    client: EtcdClient, prefix: str
) -> None:
    guard, resource = f"{prefix}/guard", f"{prefix}/resource/é"
    token = client.create(guard, b"g").current
    assert token is not None
    assert client.put_if_created_at(guard, token.create_revision, resource, "fresh ✓".encode())
    written = client.get(resource)
    assert written is not None and written.value == "fresh ✓".encode()
    assert written.lease_id == 0 and written.mod_revision > token.create_revision

    assert client.delete_if_created_at(guard, token.create_revision)
    assert client.create(guard, b"g2").created
    assert not client.put_if_created_at(guard, token.create_revision, resource, b"stale")
    assert client.get(resource) == written
    client.delete(resource)
    client.delete(guard)
