"""acquire_within: wait out a holder, or give up after the timeout, on the real etcd."""

from __future__ import annotations

import threading
import time

from leases import EtcdClient, HolderInfo, Session, acquire_within, try_acquire


def test_takes_the_key_soon_after_the_holder_lets_go(client: EtcdClient, prefix: str) -> None:
    key = f"{prefix}/repo/1"
    with Session(client, ttl=10) as first, Session(client, ttl=10) as second:
        hold = try_acquire(first, key, holder=HolderInfo(actor="first")).hold
        assert hold is not None
        threading.Timer(0.6, hold.release).start()
        began = time.monotonic()
        acquisition = acquire_within(second, key, timeout=5, poll=0.05)
        waited = time.monotonic() - began
        assert acquisition.hold is not None
        assert acquisition.hold.token > hold.token
        assert 0.5 < waited < 3.0, waited  # after the release, long before the timeout
        acquisition.hold.release()


def test_gives_up_after_the_timeout_with_the_holder(client: EtcdClient, prefix: str) -> None:
    key = f"{prefix}/repo/2"
    with Session(client, ttl=10) as first, Session(client, ttl=10) as second:
        hold = try_acquire(first, key, holder=HolderInfo(actor="first")).hold
        assert hold is not None
        began = time.monotonic()
        acquisition = acquire_within(second, key, timeout=0.5, poll=0.1)
        waited = time.monotonic() - began
        assert acquisition.hold is None
        assert acquisition.holder is not None and acquisition.holder.actor == "first"
        assert 0.3 < waited < 2.5, waited
        hold.release()
