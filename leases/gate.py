"""A gate that lets at most P messages wait for the same work.

Enqueue sources (a scheduler, the actor itself, notifications) may fire in bursts; the
gate collapses them: a trigger that finds P markers already pending enqueues nothing,
since a pending run will do the work anyway. A marker is entered when a message is
enqueued and left when its execution starts; each sits on its own TTL lease that is not
kept alive, so a message lost between enqueue and start frees its slot after the TTL.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from leases.errors import LeaseError
from leases.etcd import EtcdClient
from leases.hold import HolderInfo


@dataclass(frozen=True)
class Ticket:
    """A pending marker: carry ``key`` and ``token`` in the message, leave with them."""

    key: str
    token: int


class DedupGate:
    """At most ``slots`` pending markers under ``name``.

    :param client: the etcd client.
    :param name: the gate's key prefix.
    :param slots: P, the most markers pending at once (at least 1).
    :param ttl: seconds a marker lives if its message never starts.
    """

    def __init__(self, client: EtcdClient, name: str, *, slots: int, ttl: int = 60) -> None:
        if slots < 1:
            raise ValueError("a gate needs at least one slot")
        self.client = client
        self.prefix = name.rstrip("/") + "/"
        self.slots = slots
        self.ttl = max(2, int(ttl))

    def pending(self) -> int:
        """How many markers are pending now."""
        return self.client.count_prefix(self.prefix)

    def enter(self, *, holder: HolderInfo | None = None, slots: int | None = None) -> Ticket | None:
        """Take a free slot; None when all are pending (the trigger collapses).

        :param holder: stored as the marker's value.
        :param slots: overrides the gate's P for this call (P is a live setting).
        """
        limit = self.slots if slots is None else max(1, slots)
        taken = {kv.key for kv in self.client.get_prefix(self.prefix)}
        free = [f"{self.prefix}{i}" for i in range(limit) if f"{self.prefix}{i}" not in taken]
        if not free:
            return None
        lease_id, _ = self.client.grant(self.ttl)
        value = (holder or HolderInfo(actor="gate")).to_json()
        try:
            for key in free:
                result = self.client.create(key, value, lease_id=lease_id)
                if result.created and result.current is not None:
                    return Ticket(key, result.current.create_revision)
        except LeaseError:
            self._revoke_quietly(lease_id)
            raise
        self._revoke_quietly(lease_id)  # every free slot was taken by a racing enter
        return None

    def leave(self, ticket: Ticket) -> bool:
        """Free the ticket's slot if it is still that marker (its lease may have expired)."""
        return self.client.delete_if_created_at(ticket.key, ticket.token)

    def _revoke_quietly(self, lease_id: int) -> None:
        with contextlib.suppress(LeaseError):  # an unused lease expires on its own
            self.client.revoke(lease_id)
