"""Per-key etcd leases with fencing tokens: a small library usable on its own.

- :class:`Session`: one TTL lease per process, kept alive on one stream in the background.
- :func:`try_acquire` / :func:`acquired` / :func:`acquire_within`: hold a key on the
  session; the key's create_revision is the fencing token.
- :class:`Election`: one leader among replicas.
- :class:`DedupGate`: at most P pending markers per name, each on a TTL lease.
- :class:`SharedBreaker`: a circuit breaker shared by every process (open on a TTL lease).
- :mod:`leases.admin`: list, take for a while, release; etcd's space (report, recover).

Only :mod:`leases.etcd` talks to the etcd client library.
"""

from leases.admin import (
    HeldKey,
    SpaceRecovery,
    SpaceReport,
    list_held,
    recover_space,
    release,
    space_report,
    take,
)
from leases.breaker import BreakerState, SharedBreaker
from leases.election import Election
from leases.errors import EtcdNoSpace, EtcdUnavailable, LeaseError, SessionLost
from leases.etcd import EtcdClient, EtcdStatus
from leases.gate import DedupGate, Ticket
from leases.hold import Acquisition, Hold, HolderInfo, acquire_within, acquired, try_acquire
from leases.session import Session

__all__ = [
    "Acquisition",
    "BreakerState",
    "DedupGate",
    "Election",
    "EtcdClient",
    "EtcdNoSpace",
    "EtcdStatus",
    "EtcdUnavailable",
    "HeldKey",
    "Hold",
    "HolderInfo",
    "LeaseError",
    "Session",
    "SessionLost",
    "SharedBreaker",
    "SpaceRecovery",
    "SpaceReport",
    "Ticket",
    "acquire_within",
    "acquired",
    "list_held",
    "recover_space",
    "release",
    "space_report",
    "take",
    "try_acquire",
]
