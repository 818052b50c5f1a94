"""actors.enqueuer.try_order: runs in parallel spread over the free slots' candidates, and
the store's order stands wherever it matters."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from actors.enqueuer import try_order
from migration.states import State

A, D = State.IMPORT_ABORTED, State.DEFAULT


def candidates(*states: State) -> list[Any]:
    return [SimpleNamespace(id=i, migration_state=s) for i, s in enumerate(states)]


def ids(repositories: list[Any]) -> list[int]:
    return [r.id for r in repositories]


def test_one_free_slot_takes_the_candidates_in_order() -> None:
    listed = candidates(D, D, D, D)
    assert ids(try_order(listed, free=1, shuffle=lambda c: c.reverse())) == [0, 1, 2, 3]
    assert ids(try_order(listed, free=0, shuffle=lambda c: c.reverse())) == [0, 1, 2, 3]


def test_the_free_slots_candidates_are_shuffled_the_rest_kept_in_order() -> None:
    listed = candidates(D, D, D, D, D)
    shuffled: list[list[int]] = []

    def shuffle(window: list[Any]) -> None:
        shuffled.append(ids(window))
        window.reverse()

    order = ids(try_order(listed, free=3, shuffle=shuffle))
    assert shuffled == [[0, 1, 2]]
    assert order == [2, 1, 0, 3, 4]


def test_aborted_ones_still_come_before_ready_ones() -> None:
    listed = candidates(A, A, D, D, D)
    order = ids(try_order(listed, free=5, shuffle=lambda c: c.reverse()))
    # The window is the two aborted ones, whatever the free slots.
    assert order == [1, 0, 2, 3, 4]


def test_every_candidate_is_tried_once_and_the_order_varies() -> None:
    listed = candidates(D, D, D, D, D, D)
    firsts = set()
    for _ in range(200):
        order = ids(try_order(listed, free=10))
        assert sorted(order) == [0, 1, 2, 3, 4, 5]
        firsts.add(order[0])
    assert firsts == {0, 1, 2, 3, 4, 5}  # missing one: p = 6 * (5/6)**200, about 1e-15
    assert try_order([], free=4) == []
