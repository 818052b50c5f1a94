"""actors.enqueuer.try_order: runs in parallel spread over the free slots' candidates, and
the store's order stands wherever it matters."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from actors.enqueuer import try_order
from migration.states import State

A, D = State.IMPORT_ABORTED, State.DEFAULT


def candidates(*states: State) -> list[Any]:
    return [SimpleNamespace(id=i, migration_state=s) for i, s in enumerate(states)]


def ids(repositories: list[Any]) -> list[int]:
    return [r.id for r in repositories]


def test_one_free_slot_takes_the_candidates_in_order() -> None:
    listed = candidates(D, D, D, D)
    assert ids(try_order(listed, free=1, pick=lambda n: n - 1)) == [0, 1, 2, 3]
    assert ids(try_order(listed, free=0, pick=lambda n: n - 1)) == [0, 1, 2, 3]


@pytest.mark.parametrize("first", [0, 1, 2])
def test_the_free_slots_candidates_are_tried_from_the_picked_one_round(first: int) -> None:
    listed = candidates(D, D, D, D, D)
    windows: list[int] = []

    def pick(n: int) -> int:
        windows.append(n)
        return first

    order = ids(try_order(listed, free=3, pick=pick))
    assert windows == [3]
    assert order == [*range(first, 3), *range(first), 3, 4]


def test_aborted_ones_still_come_before_ready_ones() -> None:
    listed = candidates(A, A, D, D, D)
    order = ids(try_order(listed, free=5, pick=lambda n: n - 1))
    # The window is the two aborted ones, whatever the free slots.
    assert order == [1, 0, 2, 3, 4]


def test_every_candidate_is_tried_once() -> None:
    listed = candidates(D, D, D, D, D, D)
    for first in range(6):
        order = ids(try_order(listed, free=10, pick=lambda n, f=first: f))
        assert sorted(order) == [0, 1, 2, 3, 4, 5]
    assert try_order([], free=4) == []
