"""leases.admin.take: a take that fails leaves no lease (and so no key) behind."""

from __future__ import annotations

import etcd3
import etcd3.etcdrpc as rpc
import pytest

from leases import EtcdClient, EtcdUnavailable, HolderInfo, take

# A TTL no other test grants, to tell this test's lease from the shared etcd's others.
TAKE_TTL = 3517


def _leases_granted_with(endpoint: tuple[str, int], ttl: int) -> set[int]:
    raw = etcd3.client(host=endpoint[0], port=endpoint[1])
    try:
        ids = [lease.ID for lease in raw.leasestub.LeaseLeases(rpc.LeaseLeasesRequest()).leases]
        granted = set()
        for lease_id in ids:
            info = raw.leasestub.LeaseTimeToLive(rpc.LeaseTimeToLiveRequest(ID=lease_id))
            if info.grantedTTL == ttl and info.TTL > 0:
                granted.add(lease_id)
        return granted
    finally:
        raw.close()


def test_failed_take_revokes_its_lease(
    client: EtcdClient, prefix: str, etcd_endpoints: list[tuple[str, int]]
) -> None:
    before = _leases_granted_with(etcd_endpoints[0], TAKE_TTL)
    # etcd refuses a request over 1.5 MiB: the lease is granted, the create fails. (The
    # holder's value is capped, so the key itself is made too large.)
    too_large_key = f"{prefix}/leases/" + "k" * 2_000_000
    with pytest.raises(EtcdUnavailable):
        take(client, too_large_key, ttl=TAKE_TTL, holder=HolderInfo(actor="test"))
    left = _leases_granted_with(etcd_endpoints[0], TAKE_TTL) - before
    assert not left, f"the failed take left lease(s) {sorted(left)} for {TAKE_TTL} s"
