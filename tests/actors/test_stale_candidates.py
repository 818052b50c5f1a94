"""An enqueuer run whose candidate list went stale reads it again (EnqueuerRun._work).

In process, against the stack's PostgreSQL and etcd: a real Runtime, a real run. "Another
run" is played by the test: right after the run's read of the in-flight count and the
candidates, every listed repository is moved to ``pre_importing``, as the starts of runs in
parallel would. The registry is never called: fresh repositories have more tags than
``max_tags_count``, so a run that reaches one skips it (too_many_tags), under its lease.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import structlog

from actors.enqueuer import REREADS_PER_RUN, EnqueuerRun
from actors.runtime import Runtime
from migration.config import Config
from migration.settings import Settings
from migration.store import Candidate, Store


@pytest.fixture
def runtime(migration_env: dict[str, str], clean_store: Store) -> Iterator[Runtime]:
    clean_store.update_settings(enabled=True, capacity=10, enqueue_waiting_time=0, max_tags_count=1)
    env = {**migration_env, "MIGRATOR_ETCD_PREFIX": f"/test-stale-{uuid.uuid4().hex[:12]}"}
    # The run logs in this process. A module logger cached here would keep this moment's
    # processors, which a later configure() replaces: a later test's
    # structlog.testing.capture_logs would then not see that module's lines.
    caching = structlog.get_config()["cache_logger_on_first_use"]
    structlog.configure(cache_logger_on_first_use=False)
    made = Runtime(Config.from_env(env), pool_size=2)
    try:
        yield made
    finally:
        made.close()
        structlog.configure(cache_logger_on_first_use=caching)


def _started_elsewhere(database_url: str, ids: list[int]) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE container_repositories SET migration_state = 'pre_importing',"
            " migration_pre_import_started_at = now(), last_step_at = now()"
            " WHERE id = ANY(%s)",
            (ids,),
        )


def _stale_reads(
    runtime: Runtime, database_url: str, store: Store, *, stale_reads: int
) -> list[list[int]]:
    """Make the first ``stale_reads`` reads of the run go stale as soon as they are made: the
    listed repositories start elsewhere and a new one arrives. Returns the ids each read
    listed, in order."""
    real = runtime.store.in_flight_and_candidates
    reads: list[list[int]] = []

    def read(settings: Settings, *, limit: int) -> tuple[int, list[Candidate]]:
        in_flight, listed = real(settings, limit=limit)
        reads.append([r.id for r in listed])
        if len(reads) <= stale_reads:
            _started_elsewhere(database_url, reads[-1])
            store.add_repository(f"stale/arrived-{len(reads)}", tags_count=5)
        return in_flight, listed

    runtime.store.in_flight_and_candidates = read  # type: ignore[method-assign]
    return reads


def _state(store: Store, repository_id: int) -> tuple[str, str | None]:
    found = store.get(repository_id)
    assert found is not None
    reason = found.migration_skipped_reason
    return found.migration_state.value, (reason.value if reason is not None else None)


def _run(runtime: Runtime) -> tuple[str, dict[str, Any]]:
    run = EnqueuerRun(runtime, message_id=None)
    return run.execute(), run.fields


def test_a_moved_on_candidate_makes_the_run_read_again_and_start_a_fresh_one(
    runtime: Runtime, clean_store: Store, database_url: str
) -> None:
    listed = [clean_store.add_repository(f"stale/listed-{i}", tags_count=5) for i in range(3)]
    reads = _stale_reads(runtime, database_url, clean_store, stale_reads=1)

    status, fields = _run(runtime)

    assert status == "skipped"
    assert reads[0] == listed
    (arrived,) = reads[1]  # the second read lists only the repository that arrived since
    assert arrived not in listed
    assert _state(clean_store, arrived) == ("import_skipped", "too_many_tags")
    # One listed candidate tried (moved on), then the fresh list's only one.
    assert fields["candidates_tried"] == 2
    assert fields["candidates_moved_on"] == 1
    assert fields["candidates_reread"] == 1
    assert fields["in_flight"] == 3  # the count of the second read
    assert fields["container_repository_id"] == arrived
    # The run wrote nothing to the repositories the others started.
    assert [_state(clean_store, i) for i in listed] == [("pre_importing", None)] * 3


def test_a_read_again_that_finds_the_capacity_taken_ends_the_run_at_capacity(
    runtime: Runtime, clean_store: Store, database_url: str
) -> None:
    clean_store.update_settings(capacity=3)
    listed = [clean_store.add_repository(f"stale/full-{i}", tags_count=5) for i in range(3)]
    reads = _stale_reads(runtime, database_url, clean_store, stale_reads=1)

    status, fields = _run(runtime)

    assert status == "at_capacity"
    assert len(reads) == 2
    assert fields["in_flight"] == 3 and fields["below_capacity"] is False
    assert fields["candidates_tried"] == 1 and fields["candidates_moved_on"] == 1
    assert "container_repository_id" not in fields  # nothing was stepped
    assert _state(clean_store, reads[1][0]) == ("default", None)  # left for a later run
    assert [_state(clean_store, i) for i in listed] == [("pre_importing", None)] * 3


def test_reads_again_are_bounded_then_the_run_goes_on_down_its_list(
    runtime: Runtime, clean_store: Store, database_url: str
) -> None:
    clean_store.update_settings(capacity=20)
    for i in range(2):
        clean_store.add_repository(f"stale/bound-{i}", tags_count=5)
    # Every read goes stale, the last one too.
    reads = _stale_reads(runtime, database_url, clean_store, stale_reads=REREADS_PER_RUN + 1)

    status, fields = _run(runtime)

    assert status == "all_candidates_busy"
    assert len(reads) == REREADS_PER_RUN + 1
    assert fields["candidates_reread"] == REREADS_PER_RUN
    # One try per stale read, then every candidate of the last read.
    tried = REREADS_PER_RUN + len(reads[-1])
    assert fields["candidates_tried"] == tried
    assert fields["candidates_moved_on"] == tried
    # Only the repository that arrived after the last read is left to start.
    left = clean_store.candidates(runtime.live_settings.get(), limit=20)
    arrived = clean_store.get_by_path(f"stale/arrived-{REREADS_PER_RUN + 1}")
    assert arrived is not None and [c.id for c in left] == [arrived.id]


def test_without_a_read_again_a_run_goes_on_down_its_list(
    runtime: Runtime, clean_store: Store, database_url: str
) -> None:
    """The fixed key's run reads its candidates under its one hold, one run at a time: it
    has no re-read and tries a stale list to its end."""
    clean_store.update_settings(lease_scope="global")
    listed = [clean_store.add_repository(f"stale/global-{i}", tags_count=5) for i in range(3)]
    real: Callable[..., list[Candidate]] = runtime.store.candidates

    def stale(settings: Settings, *, limit: int) -> list[Candidate]:
        found = real(settings, limit=limit)
        _started_elsewhere(database_url, [r.id for r in found])
        return found

    runtime.store.candidates = stale  # type: ignore[method-assign]
    status, fields = _run(runtime)

    assert status == "all_candidates_busy"
    assert fields["candidates_tried"] == 3 and fields["candidates_moved_on"] == 3
    assert "candidates_reread" not in fields
    assert [_state(clean_store, i) for i in listed] == [("pre_importing", None)] * 3
