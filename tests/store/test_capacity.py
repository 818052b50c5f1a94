"""Capacity is a hard bound: 32 threads claiming at once never exceed it.

Checked two ways: a sampler counts the active repositories all along, and afterwards the
events table is replayed in order.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections import defaultdict

import psycopg
import pytest

from migration.states import ACTIVE_STATES, Event, State, allowed_retry
from migration.store import Outcome, Store, schema_files
from tests.fixtures import temporary_database

THREADS = 32
CAPACITY = 4


def _worker(store: Store, *, tokens: itertools.count[int], deadline: float, seed: int,
            outcomes: dict[Outcome, int], lock: threading.Lock) -> None:  # fmt: skip
    rng = random.Random(seed)
    counted: dict[Outcome, int] = defaultdict(int)
    while time.monotonic() < deadline:
        settings = store.settings()
        candidates = store.candidates(settings, limit=10)
        if not candidates:
            break
        repo = rng.choice(candidates)
        token = next(tokens)
        if repo.migration_state is State.DEFAULT:
            event = Event.START_PRE_IMPORT
        else:
            event = allowed_retry(repo.migration_aborted_in_state)
        result = store.claim(repo.id, expected_state=repo.migration_state, event=event,
                             token=token, actor="hammer", message_id=f"m{token}")  # fmt: skip
        counted[result.outcome] += 1
        if not result.ok:
            continue
        state = result.repository.migration_state
        kw = {"token": token, "actor": "hammer", "message_id": f"m{token}"}
        time.sleep(rng.random() * 0.002)  # hold the slot a little, as a real step would
        action = rng.random()
        if action < 0.2:
            assert result.transition is not None
            store.undo_claim(repo.id, expected_state=state,
                             claimed_from=result.transition.from_state, **kw)  # fmt: skip
        elif action < 0.5:
            store.step(repo.id, expected_state=state, event=Event.ABORT_IMPORT, **kw)
        else:
            if state is State.PRE_IMPORTING:
                store.step(repo.id, expected_state=state, event=Event.FINISH_PRE_IMPORT, **kw)
                store.step(repo.id, expected_state=State.PRE_IMPORT_DONE,
                           event=Event.START_IMPORT, **kw)  # fmt: skip
            store.step(repo.id, expected_state=State.IMPORTING, event=Event.FINISH_IMPORT, **kw)
    with lock:
        for outcome, n in counted.items():
            outcomes[outcome] += n


def _hammer(store: Store, *, duration: float) -> tuple[dict[Outcome, int], list[int]]:
    """THREADS threads claiming and stepping for ``duration`` seconds, a sampler counting the
    active repositories all along: the outcomes, and the samples."""
    tokens = itertools.count(1)
    deadline = time.monotonic() + duration
    outcomes: dict[Outcome, int] = defaultdict(int)
    lock = threading.Lock()
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(store.in_flight())

    sampler = threading.Thread(target=sample)
    workers = [
        threading.Thread(
            target=_worker,
            args=(store,),
            kwargs={
                "tokens": tokens,
                "deadline": deadline,
                "seed": i,
                "outcomes": outcomes,
                "lock": lock,
            },
        )
        for i in range(THREADS)
    ]
    sampler.start()
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=duration + 60)
    stop.set()
    sampler.join()
    assert not any(w.is_alive() for w in workers)
    return outcomes, samples


def _replay_peak(database_url: str) -> tuple[int, set[int]]:
    """Replay the accepted events in order: the most repositories active at once, and the
    ones active at the end. Every accepted write must chain and carry no stale token.

    (Event ids are taken inside the writing transaction; a claim that saw an exit already
    committed has a larger id than that exit, so the replay never over-counts.)
    """
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT repository_id, from_state, to_state, event, token FROM migration_events"
            " WHERE accepted ORDER BY id"
        ).fetchall()
    assert rows
    active: set[int] = set()
    state_of: dict[int, str] = {}
    last_token: dict[int, int] = {}
    peak = 0
    for rid, from_state, to_state, _event, token in rows:
        assert state_of.get(rid, "default") == from_state  # every accepted write chains
        assert token >= last_token.get(rid, 0)  # no write with a stale token accepted
        state_of[rid], last_token[rid] = to_state, token
        if State(to_state) in ACTIVE_STATES:
            active.add(rid)
        else:
            active.discard(rid)
        peak = max(peak, len(active))
    return peak, active


def test_capacity_is_never_exceeded(
    clean_store: Store, database_url: str, request: pytest.FixtureRequest
) -> None:
    store = clean_store
    duration = 10.0 if request.config.getoption("--long", default=False) else 3.0
    store.update_settings(capacity=CAPACITY, max_retries=1_000)
    store.seed(20_000, rng_seed=3)
    outcomes, samples = _hammer(store, duration=duration)

    # The bound was actually pressed on, and never passed while running.
    assert outcomes[Outcome.CLAIMED] > 50, dict(outcomes)
    assert outcomes[Outcome.AT_CAPACITY] > 0, dict(outcomes)
    assert len(samples) > 50
    assert max(samples) <= CAPACITY
    assert max(samples) == CAPACITY  # it was reached, so the check above means something

    # Replayed in order, the accepted events never had more than CAPACITY active.
    peak, active = _replay_peak(database_url)
    assert peak == CAPACITY
    assert len(active) == store.in_flight()
    with psycopg.connect(database_url) as conn:
        refused_stale = conn.execute(
            "SELECT token, (detail->>'row_token')::bigint FROM migration_events"
            " WHERE NOT accepted AND detail->>'reason' = 'stale_token'"
        ).fetchall()
    # A thread that drew its token before another thread claimed, aborted and finished the
    # same repository is refused as stale: each such refusal is recorded, once, and only
    # when the row's token was newer. (Steps after a thread's own claim are never stale:
    # nobody else can claim an active repository.)
    assert len(refused_stale) == outcomes[Outcome.STALE_TOKEN], dict(outcomes)
    assert all(token < row_token for token, row_token in refused_stale), refused_stale


def _function_without_the_settings_lock() -> str:
    """Schema 0005's function as CREATE OR REPLACE, its claims no longer taking the
    settings-row lock; a short sleep after the count widens the race that lock closes."""
    text = dict(schema_files())["0005_one_fenced_write"]
    body = text[text.index("CREATE FUNCTION") :]
    locked = "FROM migration_settings WHERE id = 1 FOR UPDATE;"
    counted = "WHERE migration_state IN ('pre_importing', 'pre_import_done', 'importing');"
    assert body.count(locked) == 1 and body.count(counted) == 1
    body = body.replace(locked, "FROM migration_settings WHERE id = 1;")
    body = body.replace(counted, counted + "\n        PERFORM pg_sleep(0.002);")
    return body.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)


def test_the_hammer_finds_the_capacity_passed_without_the_settings_lock(
    database_url: str,
) -> None:
    # The check above can fail: in a throwaway database whose function claims without
    # the settings-row lock, the same hammer finds more than CAPACITY active.
    with temporary_database(database_url, prefix="test_nolock") as url:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(_function_without_the_settings_lock().encode())
        with Store(url, max_size=40) as store:
            store.update_settings(capacity=CAPACITY, max_retries=1_000)
            store.seed(5_000, rng_seed=3)
            outcomes, samples = _hammer(store, duration=3.0)
            peak, _active = _replay_peak(url)
    assert outcomes[Outcome.CLAIMED] > 50, dict(outcomes)
    assert peak > CAPACITY or max(samples) > CAPACITY, (peak, max(samples))
