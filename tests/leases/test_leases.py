"""The leases library against a real etcd (the local stack's, or the test's own)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pytest

from leases import (
    DedupGate,
    Election,
    EtcdClient,
    EtcdNoSpace,
    EtcdUnavailable,
    HolderInfo,
    Session,
    SessionLost,
    acquired,
    list_held,
    release,
    take,
    try_acquire,
)

TTL = 2


def wait_acquire(session: Session, key: str, *, timeout: float) -> tuple[Any, float]:
    """Try to take ``key`` every 50 ms; the acquisition and the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        acquisition = try_acquire(session, key)
        if acquisition:
            return acquisition, time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"{key} not acquired within {timeout} s")


def test_session_ttl_below_two_is_refused(client: EtcdClient) -> None:
    with pytest.raises(ValueError, match="at least 2"):
        Session(client, ttl=1)


def test_acquire_busy_names_holder_and_release_frees(client: EtcdClient, prefix: str) -> None:
    key = f"{prefix}/k"
    with Session(client, ttl=TTL) as first, Session(client, ttl=TTL) as second:
        holder = HolderInfo(actor="enqueue_next_migration", message_id="m-1")
        with acquired(first, key, holder=holder) as mine:
            assert mine.hold is not None
            assert mine.hold.is_current()
            busy = try_acquire(second, key)
            assert not busy
            assert busy.holder is not None
            assert busy.holder.actor == "enqueue_next_migration"
            assert busy.holder.message_id == "m-1"
            assert busy.holder.pid == os.getpid()
            assert busy.holder_token == mine.hold.token
        theirs = try_acquire(second, key)
        assert theirs.hold is not None
        assert theirs.hold.token > busy.holder_token


def test_release_leaves_a_newer_incarnation_alone(client: EtcdClient, prefix: str) -> None:
    key = f"{prefix}/k"
    # Asking etcd every time: the stale and the new hold are this session's, and within
    # trust_own_holds_for the session would answer for its old hold itself (test_held_here).
    with Session(client, ttl=TTL, trust_own_holds_for=0) as session:
        old = try_acquire(session, key).hold
        assert old is not None
        assert release(client, key)  # an operator frees it
        new = try_acquire(session, key).hold
        assert new is not None and new.token > old.token
        assert not old.release()  # the stale hold must not delete the new one
        assert not old.is_current()
        assert not old.fenced_put(f"{prefix}/resource", b"stale")
        assert new.is_current()
        assert new.fenced_put(f"{prefix}/resource", b"fresh")
        assert client.get(f"{prefix}/resource").value == b"fresh"


def test_graceful_close_revokes_at_once(client: EtcdClient, prefix: str) -> None:
    session = Session(client, ttl=10)
    keys = [f"{prefix}/k{i}" for i in range(3)]
    for key in keys:
        assert try_acquire(session, key)
    session.close()
    assert all(client.get(key) is None for key in keys)
    with pytest.raises(SessionLost):
        try_acquire(session, keys[0])


def test_two_processes_race_1000_rounds(spawn: Any, prefix: str) -> None:
    key = f"{prefix}/race"
    rounds = 1000
    racers = [spawn("race", key, str(rounds)) for _ in range(2)]
    for racer in racers:
        racer.expect("session")
    last_token = 0
    for round_number in range(rounds):
        for racer in racers:
            racer.send()
        results = [racer.expect("round") for racer in racers]
        assert all(r["round"] == round_number for r in results)
        winners = [r for r in results if r["won"]]
        assert len(winners) == 1, f"round {round_number}: {results}"
        assert winners[0]["token"] > last_token
        last_token = winners[0]["token"]
        for racer in racers:
            racer.send()
        for racer in racers:
            racer.expect("released")


@pytest.mark.parametrize("ttl", [2, 3])
def test_killed_holder_never_lapses_while_alive_and_expires_within_ttl(
    spawn: Any, client: EtcdClient, prefix: str, ttl: int
) -> None:
    key = f"{prefix}/held"
    holder = spawn("hold", key, ttl=ttl)
    token = holder.expect("acquired")["token"]
    with Session(client, ttl=ttl) as session:
        # While the holder lives (3 × TTL), the key never lapses.
        until = time.monotonic() + 3 * ttl
        while time.monotonic() < until:
            assert not try_acquire(session, key), "the key lapsed while its holder was alive"
            time.sleep(0.1)
        current = client.get(key)
        assert current is not None and current.create_revision == token
        holder.proc.send_signal(signal.SIGKILL)
        acquisition, waited = wait_acquire(session, key, timeout=ttl + 5)
        assert waited <= ttl + 1, f"reacquired after {waited:.2f} s, TTL {ttl}"
        assert acquisition.hold.token > token


def test_paused_holder_is_fenced_and_reports_lost(
    spawn: Any, client: EtcdClient, prefix: str
) -> None:
    key = f"{prefix}/paused"
    holder = spawn("hold", key, ttl=TTL)
    holder.expect("acquired")
    first = holder.expect("write")
    assert first["accepted"] is True and first["lost"] is False
    holder.proc.send_signal(signal.SIGSTOP)
    try:
        with Session(client, ttl=TTL) as session:
            acquisition, _ = wait_acquire(session, key, timeout=TTL + 5)
            assert acquisition.hold.fenced_put(f"{key}/resource", b"written by the new holder")
            holder.drain()
            holder.proc.send_signal(signal.SIGCONT)
            # Every write after the pause is refused, and the session reports lost.
            writes = [holder.expect("write") for _ in range(5)]
            assert all(w["accepted"] is False for w in writes), writes
            assert writes[-1]["lost"] is True
            assert client.get(f"{key}/resource").value == b"written by the new holder"
    finally:
        holder.proc.send_signal(signal.SIGCONT)


def test_dedup_gate_1000_concurrent_enters_leave_exactly_p(client: EtcdClient, prefix: str) -> None:
    slots = 4
    gate = DedupGate(client, f"{prefix}/gate", slots=slots, ttl=30)
    with ThreadPoolExecutor(max_workers=16) as pool:
        tickets = list(pool.map(lambda _: gate.enter(), range(1000)))
    entered = [t for t in tickets if t is not None]
    assert len(entered) == slots
    assert gate.pending() == slots
    assert gate.leave(entered[0])
    assert not gate.leave(entered[0])
    assert gate.pending() == slots - 1
    assert gate.enter() is not None
    assert gate.enter() is None


def test_dedup_gate_marker_expires_when_message_is_lost(client: EtcdClient, prefix: str) -> None:
    gate = DedupGate(client, f"{prefix}/gate", slots=1, ttl=2)
    assert gate.enter() is not None
    assert gate.enter() is None
    deadline = time.monotonic() + 2 + 2
    while gate.enter() is None:
        assert time.monotonic() < deadline, "a lost message blocked the gate past its TTL"
        time.sleep(0.1)


def test_election_one_leader_and_failover_within_ttl(
    spawn: Any, client: EtcdClient, prefix: str
) -> None:
    name = f"{prefix}/election"
    first = spawn("elect", name, ttl=TTL)
    first.expect("leader")
    second = spawn("elect", name, ttl=TTL)
    second.expect("session")
    # The second campaigns once its candidacy key stands behind the first's; from then on
    # it watches for the first's key to go. Watch for a second leader while the first says,
    # ten times over (about a second), that it still leads.
    deadline = time.monotonic() + 10
    while len(client.get_prefix(f"{name}/")) < 2:
        assert time.monotonic() < deadline, "the second never entered the election"
        time.sleep(0.05)
    for _ in range(10):
        assert first.expect("still_leader")["leader"] is True
    assert not any(line.get("event") == "leader" for line in second.drain()), "two leaders"
    with Session(client, ttl=TTL) as observer:
        leader = Election(observer, name).leader()
        assert leader is not None and leader.pid == first.proc.pid
    killed_at = time.time()
    first.proc.send_signal(signal.SIGKILL)
    took_over = second.expect("leader", timeout=TTL + 5)
    assert took_over["t"] - killed_at <= TTL + 1


def test_operator_take_blocks_until_released(client: EtcdClient, prefix: str) -> None:
    key = f"{prefix}/leases/container_repository/7"
    taken = take(client, key, ttl=1800, holder=HolderInfo(actor="operator"))
    assert taken.hold is not None
    held = {h.key: h for h in list_held(client, f"{prefix}/leases/")}
    assert held[key].holder.actor == "operator"
    assert 1700 < held[key].ttl_remaining <= 1800
    with Session(client, ttl=TTL) as session:
        busy = try_acquire(session, key)
        assert not busy and busy.holder is not None and busy.holder.actor == "operator"
        assert release(client, key)
        assert try_acquire(session, key)


def test_many_keys_on_one_session_survive_many_ttls(client: EtcdClient, prefix: str) -> None:
    with Session(client, ttl=TTL) as session:
        holds = [try_acquire(session, f"{prefix}/k{i}").hold for i in range(20)]
        time.sleep(3 * TTL)
        assert not session.lost
        assert all(hold is not None and hold.is_current() for hold in holds)


def test_concurrent_holds_from_threads(client: EtcdClient, prefix: str) -> None:
    """Eight threads on one session, many keys: each key has one holder at a time."""
    inside: dict[int, int] = {}
    overlaps = []
    lock = threading.Lock()
    with Session(client, ttl=TTL) as session:

        def work(n: int) -> int:
            wins = 0
            for i in range(50):
                repo = (n + i) % 5
                with acquired(session, f"{prefix}/repo/{repo}") as acquisition:
                    if not acquisition:
                        continue
                    wins += 1
                    with lock:
                        inside[repo] = inside.get(repo, 0) + 1
                        if inside[repo] > 1:
                            overlaps.append(repo)
                    time.sleep(0.001)
                    with lock:
                        inside[repo] -= 1
            return wins

        with ThreadPoolExecutor(max_workers=8) as pool:
            wins = sum(pool.map(work, range(8)))
    assert overlaps == []
    assert wins > 0


def test_unreachable_etcd_raises_typed_error_within_timeout() -> None:
    with EtcdClient([("127.0.0.1", 1)], timeout=1) as dead:
        start = time.monotonic()
        with pytest.raises(EtcdUnavailable):
            dead.get("/anything")
        # Within the 1 s timeout; the extra second is for a loaded 2-core machine (a retry
        # loop without a deadline would hang far longer).
        assert time.monotonic() - start < 1 + 1


@contextmanager
def failing(
    client: EtcdClient,
    method: str,
    error: Exception,
    *,
    times: int = 1,
    after_the_call: bool = False,
) -> Iterator[list[str]]:
    """Make the next ``times`` calls of the client's ``method`` raise ``error``: before they
    reach etcd, or ``after_the_call`` (the write landed and the answer is the error, as etcd
    answers the write that crosses its quota). Yields the key of every call made."""
    real = getattr(client, method)
    calls: list[str] = []

    def call(key: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(key)
        fails = len(calls) <= times
        if fails and not after_the_call:
            raise error
        result = real(key, *args, **kwargs)
        if fails:
            assert getattr(result, "created", True), "the injected write did not land"
            raise error
        return result

    setattr(client, method, call)
    try:
        yield calls
    finally:
        delattr(client, method)  # the class's method again


NOSPACE = EtcdNoSpace("etcd create failed: database space exceeded (injected)")


def test_a_failed_release_is_done_in_the_background_while_the_session_lives(
    client: EtcdClient, prefix: str
) -> None:
    # Without it the key would outlive the failed release for as long as keep-alive keeps
    # the session's lease: its repository taken until the process ends.
    key = f"{prefix}/unreleased"
    with Session(client, ttl=TTL) as first, Session(client, ttl=TTL) as second:
        hold = try_acquire(first, key).hold
        assert hold is not None
        # The release, then the first retry in the background, fail.
        unavailable = EtcdUnavailable("etcd delete failed: injected")
        with failing(client, "delete_if_created_at", unavailable, times=2) as deletes:
            with pytest.raises(EtcdUnavailable):
                hold.release()
            acquisition, waited = wait_acquire(second, key, timeout=5 * TTL)
        assert not first.lost, "the key went with the release, not with a lost session"
        assert first.unreleased() == []
        assert len(deletes) == 3, deletes
        assert waited <= TTL + 1.5, waited
        assert acquisition.hold is not None and acquisition.hold.token > hold.token
        acquisition.hold.release()


def test_a_create_answered_nospace_that_landed_is_undone(client: EtcdClient, prefix: str) -> None:
    # Seen in CI: the repository's key stayed on the worker's live session for good, and
    # every run after the recovery found its only candidate "busy".
    key = f"{prefix}/landed"
    with Session(client, ttl=TTL) as first, Session(client, ttl=TTL) as second:
        with failing(client, "create", NOSPACE, after_the_call=True), pytest.raises(EtcdNoSpace):
            try_acquire(first, key)
        assert client.get(key) is None, "the create that landed was left on the live session"
        assert first.unreleased() == []
        taken = try_acquire(second, key)
        assert taken.hold is not None
        taken.hold.release()


def _taken_once_undone_in_the_background(first: Session, second: Session, key: str) -> None:
    """``second`` takes ``key`` within about a keep-alive interval of the background undo
    (TTL / 3 apart, well before ``first``'s lease could expire), ``first`` still alive."""
    acquisition, waited = wait_acquire(second, key, timeout=5 * TTL)
    assert not first.lost
    assert first.unreleased() == []
    assert waited <= TTL + 1.5, waited
    assert acquisition.hold is not None
    acquisition.hold.release()


def test_a_landed_create_etcd_cannot_confirm_is_undone_in_the_background(
    client: EtcdClient, prefix: str
) -> None:
    key = f"{prefix}/landed-unconfirmed"
    with Session(client, ttl=TTL) as first, Session(client, ttl=TTL) as second:
        # The undo's read, then the first one in the background, fail.
        unavailable = EtcdUnavailable("etcd get failed: injected")
        with (
            failing(client, "create", NOSPACE, after_the_call=True),
            failing(client, "get", unavailable, times=2) as gets,
        ):
            with pytest.raises(EtcdNoSpace):
                try_acquire(first, key)
            _taken_once_undone_in_the_background(first, second, key)
        assert len(gets) == 3, gets


def test_a_landed_create_whose_answer_timed_out_is_undone_in_the_background(
    client: EtcdClient, prefix: str
) -> None:
    # A timeout: the caller does not wait for a read too; the session looks afterwards.
    key = f"{prefix}/landed-timed-out"
    with Session(client, ttl=TTL) as first, Session(client, ttl=TTL) as second:
        timed_out = EtcdUnavailable("etcd create failed: DEADLINE_EXCEEDED (injected)")
        with (
            failing(client, "create", timed_out, after_the_call=True),
            pytest.raises(EtcdUnavailable),
        ):
            try_acquire(first, key)
        _taken_once_undone_in_the_background(first, second, key)
