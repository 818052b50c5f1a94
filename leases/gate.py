"""A gate that lets at most P messages wait for the same work.

Enqueue sources (a scheduler, the actor itself, notifications) may fire in bursts; the
gate collapses them: a trigger that finds P markers already pending enqueues nothing,
since a pending run will do the work anyway. A marker is entered when a message is
enqueued and left when its execution starts. Markers sit on a TTL lease that is not kept
alive, so a message lost between enqueue and start frees its slot within the TTL.

One lease serves every marker a gate instance creates for half a TTL (then the next is
granted): a marker costs a range read and a create, not a lease grant (a raft write) each.
A marker therefore lives between TTL / 2 and TTL when its message is lost.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from leases.errors import LeaseError
from leases.etcd import EtcdClient
from leases.hold import HolderInfo, undo_uncertain_create


@dataclass(frozen=True)
class Ticket:
    """A pending marker: carry ``key`` and ``token`` in the message, leave with them."""

    key: str
    token: int


class MarkerLease:
    """The etcd lease new markers go on: granted with the TTL, reused while it has at
    least half of it left, then replaced by a fresh one (thread-safe).

    The lease is never revoked: other markers may still sit on it, and it expires on its
    own. Its remaining life is counted from just before the grant was sent, so it is never
    overestimated: a marker created on it is gone within ``ttl`` of its creation.

    :param client: the etcd client.
    :param ttl: seconds a lease lives (at least 2).
    """

    def __init__(self, client: EtcdClient, *, ttl: int) -> None:
        self.client = client
        self.ttl = ttl
        self._lock = threading.Lock()
        self._lease_id = 0
        self._expires_at = 0.0  # time.monotonic() of the current lease's expiry

    def current(self) -> int:
        """The lease id to put a new marker on, granting one when needed.

        :raises EtcdUnavailable: etcd cannot grant a lease.
        """
        with self._lock:
            # Threads that need a new lease at once wait for the one grant here.
            if self._expires_at - time.monotonic() < self.ttl / 2:
                asked_at = time.monotonic()
                lease_id, granted = self.client.grant(self.ttl)
                self._lease_id = lease_id
                self._expires_at = asked_at + min(granted, self.ttl)
            return self._lease_id

    def forget(self, lease_id: int) -> None:
        """Stop using ``lease_id`` (a create on it failed: it may be gone); the next
        :meth:`current` grants a new one."""
        with self._lock:
            if self._lease_id == lease_id:
                self._lease_id = 0
                self._expires_at = 0.0


class DedupGate:
    """At most ``slots`` pending markers under ``name``.

    Safe to share between threads: slots are taken with etcd transactions, and the marker
    lease with a lock.

    :param client: the etcd client.
    :param name: the gate's key prefix.
    :param slots: P, the most markers pending at once (at least 1).
    :param ttl: at most this many seconds a marker lives if its message never starts
        (at least TTL / 2).
    """

    def __init__(self, client: EtcdClient, name: str, *, slots: int, ttl: int = 60) -> None:
        if slots < 1:
            raise ValueError("a gate needs at least one slot")
        self.client = client
        self.prefix = name.rstrip("/") + "/"
        self.slots = slots
        self.ttl = max(2, int(ttl))
        self.lease = MarkerLease(client, ttl=self.ttl)

    def pending(self) -> int:
        """How many markers are pending now."""
        return self.client.count_prefix(self.prefix)

    def enter(self, *, holder: HolderInfo | None = None, slots: int | None = None) -> Ticket | None:
        """Take a free slot; None when all are pending (the trigger collapses).

        :param holder: stored as the marker's value.
        :param slots: overrides the gate's P for this call (P is a live setting).
        :raises EtcdUnavailable: etcd cannot be reached.
        """
        limit = self.slots if slots is None else max(1, slots)
        taken = {kv.key for kv in self.client.get_prefix(self.prefix)}
        free = [f"{self.prefix}{i}" for i in range(limit) if f"{self.prefix}{i}" not in taken]
        if not free:
            return None
        value = (holder or HolderInfo(actor="gate")).to_json()
        lease_id = self.lease.current()
        try:
            return self._create_first(free, value, lease_id)
        except LeaseError:
            self.lease.forget(lease_id)
            # The reused lease may be gone (revoked by someone, or lost with etcd's data):
            # etcd refuses every put on it. Only then is it certain that no marker was made,
            # and it is safe to try again on a fresh lease; any other failure (a timeout
            # whose create may have happened) is raised. If etcd is down, this read raises.
            if self.client.time_to_live(lease_id) >= 0:
                raise
            return self._create_first(free, value, self.lease.current())

    def _create_first(self, free: list[str], value: bytes, lease_id: int) -> Ticket | None:
        for key in free:
            try:
                result = self.client.create(key, value, lease_id=lease_id)
            except LeaseError:
                # A marker that landed all the same would fill its slot for up to the TTL.
                undo_uncertain_create(self.client, None, lease_id, key, value)
                raise
            if result.created and result.current is not None:
                return Ticket(key, result.current.create_revision)
        return None  # every free slot was taken by a racing enter

    def leave(self, ticket: Ticket) -> bool:
        """Free the ticket's slot if it is still that marker (its lease may have expired)."""
        return self.client.delete_if_created_at(ticket.key, ticket.token)
