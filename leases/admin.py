"""Operator actions: list, take for a while and release held keys; etcd's space.

A long migration writes history to etcd with every hold, release and gate marker. etcd
keeps it until compacted; a database that reaches ``--quota-backend-bytes`` raises the
NOSPACE alarm and refuses every write (:class:`~leases.errors.EtcdNoSpace`).
:func:`space_report` shows where each member stands; :func:`recover_space` is the recovery
(compact, defragment each member, disarm)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from leases.errors import LeaseError
from leases.etcd import EtcdClient, EtcdStatus
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


@dataclass(frozen=True)
class MemberSpace:
    """One member's database: its endpoint (``host:port``) and status."""

    endpoint: str
    status: EtcdStatus


@dataclass(frozen=True)
class SpaceReport:
    """Every member's database and the raised alarms (``(member_id, name)``)."""

    members: list[MemberSpace]
    alarms: list[tuple[int, str]]

    @property
    def nospace(self) -> bool:
        return any(name == "NOSPACE" for _, name in self.alarms)


def space_report(client: EtcdClient) -> SpaceReport:
    """Status of each of ``client``'s members, and the alarms.

    :raises EtcdUnavailable: a member does not answer.
    """
    members = client.per_member()
    try:
        statuses = [
            MemberSpace(f"{host}:{port}", member.status())
            for member, (host, port) in zip(members, client.endpoints, strict=True)
        ]
    finally:
        for member in members:
            member.close()
    return SpaceReport(statuses, client.alarms())


@dataclass(frozen=True)
class SpaceRecovery:
    """What :func:`recover_space` did: compacted at ``revision``, the reports around it,
    and how many NOSPACE alarms it disarmed."""

    revision: int
    before: SpaceReport
    after: SpaceReport
    disarmed: int


def recover_space(client: EtcdClient) -> SpaceRecovery:
    """Give etcd its space back after a NOSPACE alarm (or before one), in etcd's order:

    1. compact the history at the current revision (only the newest version of each key
       stays; live keys keep their create revision, so no fencing token changes),
    2. defragment each member, one after the other (each blocks for its duration),
    3. disarm the NOSPACE alarms, now that the database is below the quota.

    Safe while the migration runs. Nothing here watches keys, so no watcher loses history.

    :raises EtcdUnavailable: a member did not answer; run it again once it does.
    """
    before = space_report(client)
    revision = max(member.status.revision for member in before.members)
    client.compact(revision)
    members = client.per_member()
    try:
        for member in members:
            member.defragment()
    finally:
        for member in members:
            member.close()
    disarmed = client.disarm_nospace()
    return SpaceRecovery(revision, before, space_report(client), disarmed)
