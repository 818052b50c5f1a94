"""Election: a candidacy key its session made but holds no more is deleted, not left first
in line leading nobody."""

from __future__ import annotations

import time

from leases import Election, EtcdClient, Session, try_acquire

TTL = 2


def test_a_candidacy_key_no_hold_has_is_deleted_and_the_candidate_stands_again(
    client: EtcdClient, prefix: str
) -> None:
    name = f"{prefix}/election"
    with Session(client, ttl=TTL) as session, Session(client, ttl=TTL) as other:
        candidate = Election(session, name)
        # An earlier entry's create was applied by etcd but its answer never came back
        # (or a resign's delete failed): the key is there, on this session's lease.
        leftover = try_acquire(session, candidate.key).hold
        assert leftover is not None
        follower = Election(other, name)
        assert not follower.is_leader(), "the leftover is first in line"
        assert not candidate.is_leader(), "a key no hold has must not make it lead"
        deadline = time.monotonic() + 3 * TTL
        while client.get(candidate.key) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get(candidate.key) is None, "the leftover was left first in line"
        assert not session.lost, "it went by a delete, not with the session's lease"
        assert follower.is_leader()
        assert not candidate.is_leader(), "it stands again, behind the follower"
        assert client.get(candidate.key) is not None
        follower.resign()
        assert candidate.is_leader()
        candidate.resign()
