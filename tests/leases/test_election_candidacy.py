"""Election: a candidacy key the session already made (answer lost) is the candidacy."""

from __future__ import annotations

from leases import Election, EtcdClient, Session, try_acquire

TTL = 2


def test_election_adopts_the_candidacy_key_its_session_already_made(
    client: EtcdClient, prefix: str
) -> None:
    name = f"{prefix}/election"
    with Session(client, ttl=TTL) as session, Session(client, ttl=TTL) as other:
        candidate = Election(session, name)
        # An earlier entry's create was applied by etcd but its answer never came back
        # (or a resign's delete failed): the key is there, on this session's lease.
        assert try_acquire(session, candidate.key)
        follower = Election(other, name)
        assert not follower.is_leader()
        assert candidate.is_leader(), "its own key, first in line, must make it lead"
        assert not follower.is_leader()
        candidate.resign()  # deletes the adopted key: its token is the key's
        assert follower.is_leader()
