"""Operator actions on held keys: list, take for a while, release."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from leases.errors import LeaseError
from leases.etcd import EtcdClient
from leases.hold import Acquisition, HolderInfo, _create


@dataclass(frozen=True)
class HeldKey:
    """A key under a prefix, its holder and the seconds its lease has left."""

    key: str
    token: int
    lease_id: int
    ttl_remaining: int
    holder: HolderInfo


def list_held(client: EtcdClient, prefix: str) -> list[HeldKey]:
    """Every key under ``prefix`` with its holder and remaining TTL (-1: no lease)."""
    held = []
    for kv in client.get_prefix(prefix):
        ttl = client.time_to_live(kv.lease_id) if kv.lease_id else -1
        held.append(
            HeldKey(kv.key, kv.create_revision, kv.lease_id, ttl, HolderInfo.from_json(kv.value))
        )
    return held


def take(
    client: EtcdClient, key: str, *, ttl: int, holder: HolderInfo | None = None
) -> Acquisition:
    """Take ``key`` on a standalone lease of ``ttl`` seconds that nobody keeps alive.

    The reference's "take the lease for 30 minutes": the key blocks its work until it is
    released or the TTL runs out, even after this process exits.
    """
    lease_id, _ = client.grant(ttl)
    try:
        acquisition = _create(client, None, lease_id, key, holder or HolderInfo(actor="operator"))
    except LeaseError:
        # The create may have been applied with its answer lost: revoking takes the key
        # with it, so a take that failed never leaves the key blocking its work for ``ttl``.
        with contextlib.suppress(LeaseError):
            client.revoke(lease_id)
        raise
    if not acquisition:
        client.revoke(lease_id)
    return acquisition


def release(client: EtcdClient, key: str) -> bool:
    """Delete ``key`` whoever holds it (the holder's next fenced write is refused)."""
    return client.delete(key)
