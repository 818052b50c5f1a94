"""What every partition scenario shares: a migration whose workers talk through
:class:`~tests.partition.links.ProcessLinks`, a victim repository caught inside its registry
start call, and the measurements and invariant checks of issue 13.

The victim's path contains ``slow-start``: the simulator begins its pre-import at once and
answers the start 30 s later (``slow_start_seconds``), so the holder is inside its start
call, lease held, for as long as its fenced call timeout lets it wait (TTL - 0.5 s at most).
The simulator runs with its double-start guard off: a second start of a running import
would be accepted and reported as an overlap, never hidden by a 409/425.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg

from devtools.launcher import LocalMigration
from leases import EtcdClient, HolderInfo
from migration.config import Config
from migration.keys import leases_prefix, repository_lease_key
from migration.registry import import_url_path
from migration.states import State
from migration.store import Store
from tests.fixtures import seed_spread, wait_until
from tests.invariants import accepted_events, all_terminal, replay_in_flight, stale_accepted_writes
from tests.partition.links import ProcessLinks, SeenRequest

CAPACITY = 4
VICTIM = "zombie/victim/slow-start-app"
#: Seconds the simulator holds the answer to the victim's start: far past any fenced timeout.
SLOW_START = 30.0


def expected_end(path: str) -> tuple[State, str | None]:
    """The state (and skip reason) ``path`` must end in, by the simulator's markers."""
    if "native" in path:
        return State.IMPORT_DONE, "native_import"
    if "missing" in path:
        return State.IMPORT_DONE, "not_found"
    if "fail-always" in path:
        return State.IMPORT_SKIPPED, "too_many_retries"
    return State.IMPORT_DONE, None


def _ts(line: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(line["timestamp"]).replace("Z", "+00:00")).timestamp()


@dataclass
class Figures:
    """What the report needs of one scenario (seconds from the fault)."""

    scenario: str
    fenced_refusals: int = 0
    zombie_refusals: int = 0
    session_lost_s: float | None = None
    lease_gone_s: float | None = None
    next_step_s: float | None = None
    zombie_calls_after_loss: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        def fmt(value: float | None) -> str:
            return "-" if value is None else f"{value:.2f}s"

        return (
            f"SCENARIO {self.scenario}: fenced_refusals={self.fenced_refusals}"
            f" (zombie's {self.zombie_refusals}) session_lost={fmt(self.session_lost_s)}"
            f" lease_gone={fmt(self.lease_gone_s)} next_holder_step={fmt(self.next_step_s)}"
            f" zombie_registry_calls_after_loss={self.zombie_calls_after_loss}"
            f" {json.dumps(self.extra, sort_keys=True)}"
        )


class PartitionRun:
    """A local migration with two workers, each behind its own links.

    :param run: the (not yet started) local migration.
    :param store: the run's store.
    :param database_url: its database.
    :param workers: the run's worker count.
    :param broker_heartbeat: the AMQP heartbeat the workers (and the API) ask for.
    :param api_links: put the API's RabbitMQ link behind a proxy too.
    """

    def __init__(self, run: LocalMigration, store: Store, database_url: str, *,
                 workers: int = 2, broker_heartbeat: int = 4,
                 api_links: bool = False) -> None:  # fmt: skip
        self.run = run
        self.store = store
        self.database_url = database_url
        self.links = [
            ProcessLinks(run.env, name=f"worker-{i}", broker_heartbeat=broker_heartbeat)
            for i in range(workers)
        ]
        for index, links in enumerate(self.links):
            run.set_env(f"worker-{index}", links.env())
        self.api_links: ProcessLinks | None = None
        if api_links:
            self.api_links = ProcessLinks(run.env, name="api", broker_heartbeat=broker_heartbeat)
            run.set_env("api", {"MIGRATOR_BROKER_URL": self.api_links.env()["MIGRATOR_BROKER_URL"]})
        self.etcd: EtcdClient = Config.from_env(run.env).etcd_client()
        self.prefix = run.env["MIGRATOR_ETCD_PREFIX"]
        self.ids: list[int] = []
        self.victim_id = 0
        self.victim = VICTIM
        self._faulted = threading.Event()
        self._fault: tuple[int, float] = (-1, 0.0)

    def close(self) -> None:
        for links in self.links:
            links.close()
        if self.api_links is not None:
            self.api_links.close()
        self.etcd.close()

    # -- set-up ---------------------------------------------------------------------------

    def start(self, *, plain: int = 3, seed: int = 13, victim: str = VICTIM,
              **settings: Any) -> None:  # fmt: skip
        """Seed the victim (oldest: first candidate) and ``plain`` others, start paused,
        make the victim's start slow, then enable the migration.

        :param victim: the victim's path: ``slow-start`` (the registry starts at once and
            answers late) or ``slow-decide`` (it waits, and starts nothing for a caller
            that has gone).
        """
        self.victim = victim
        self.store.update_settings(
            enabled=False, capacity=CAPACITY, enqueue_interval=0.5, guard_interval=1,
            max_step_duration=6, **settings,
        )  # fmt: skip
        self.victim_id = self.store.add_repository(
            victim, created_at=datetime.now(UTC) - timedelta(days=30), tags_count=3
        )
        self.ids = [self.victim_id, *seed_spread(self.store, plain, seed=seed)]
        self.run.start()
        self.configure_simulator(slow_start_seconds=SLOW_START)
        self.store.update_settings(enabled=True)

    def configure_simulator(self, **changes: Any) -> None:
        httpx.post(f"{self.run.simulator_url}/simulator/config", json=changes, timeout=10)

    # -- the victim ------------------------------------------------------------------------

    def holder(self, repository_id: int) -> tuple[HolderInfo, int] | None:
        """Who holds ``repository_id``'s lease now, with the token (its create_revision)."""
        kv = self.etcd.get(repository_lease_key(self.prefix, repository_id))
        if kv is None:
            return None
        return HolderInfo.from_json(kv.value), kv.create_revision

    def on_victim_start(self, fault: Callable[[int], None]) -> None:
        """Inject ``fault(worker index)`` the moment the victim's first start request leaves
        a worker (seen by its registry proxy, before it is forwarded): the worker is then
        inside its start call for sure, whatever the load of the machine. Call before
        :meth:`start`; :meth:`victim_in_start_call` waits for it."""
        fired = threading.Lock()

        def hook(index: int) -> Callable[[SeenRequest], None]:
            def seen(request: SeenRequest) -> None:
                if request.method != "PUT" or f"/import/{self.victim}/" not in request.target:
                    return
                if fired.acquire(blocking=False):
                    fault(index)
                    self._fault = (index, time.time())
                    self._faulted.set()

            return seen

        for index, links in enumerate(self.links):
            links["registry"].on_request = hook(index)

    def victim_in_start_call(self, timeout: float = 60) -> tuple[int, int, float]:
        """Wait for the fault of :meth:`on_victim_start`: (the worker's index, its token,
        when the fault was injected)."""
        assert self._faulted.wait(timeout), "the victim's start never left a worker"
        index, at = self._fault
        held = self.holder(self.victim_id)
        assert held is not None, "nobody holds the victim's lease"
        assert self.run.worker_index_of(held[0].pid) == index, "another worker holds it"
        return index, held[1], at

    def starts(self, path: str) -> list[dict[str, Any]]:
        events = self.run.report(events=True)["events"]
        return [e for e in events if e.get("action") == "start" and e.get("path") == path]

    def wait_lease_gone(self, token: int, *, timeout: float) -> float:
        """Wait until the victim's key is no longer the one created at ``token``: when."""

        def gone() -> bool:
            held = self.holder(self.victim_id)
            return held is None or held[1] != token

        wait_until(gone, timeout=timeout, interval=0.05, what="the zombie's lease to go")
        return time.time()

    def next_holder_step(self, token: int, *, timeout: float) -> float:
        """Wait for an accepted write of the victim with a newer token: its time."""

        def newer() -> float | None:
            with psycopg.connect(self.database_url) as conn:
                row = conn.execute(
                    "SELECT min(at) FROM migration_events WHERE repository_id = %s"
                    " AND accepted AND token > %s",
                    (self.victim_id, token),
                ).fetchone()
            return row[0].timestamp() if row and row[0] is not None else None

        at: float = wait_until(newer, timeout=timeout, interval=0.1, what="the next holder's step")
        return at

    def refusals(self, token: int | None = None) -> list[tuple[Any, ...]]:
        """Refused (fenced) writes: all, or those of ``token``."""
        query = (
            "SELECT repository_id, token, event, detail, at FROM migration_events"
            " WHERE NOT accepted"
        )
        params: tuple[Any, ...] = ()
        if token is not None:
            query += " AND token = %s"
            params = (token,)
        with psycopg.connect(self.database_url) as conn:
            return conn.execute(query, params).fetchall()

    def log_times(self, name: str, event: str, *, after: float) -> list[float]:
        return [t for t in map(_ts, self.run.log_events(name, event)) if t >= after]

    def registry_calls(
        self, index: int, *, between: tuple[float, float], paths: set[str] | None = None
    ) -> list[Any]:
        """Registry requests worker ``index`` sent (seen by its proxy) within ``between``;
        with ``paths``, only those on these repositories' import resources."""
        low, high = between
        targets = None if paths is None else [import_url_path(path) for path in paths]
        return [
            r for r in self.links[index]["registry"].requests
            if low <= r.at <= high
            and (targets is None or any(r.target.startswith(t) for t in targets))
        ]  # fmt: skip

    def paths_held_by(self, index: int) -> set[str]:
        """The paths of the repositories whose lease worker ``index`` holds now."""
        paths = set()
        for kv in self.etcd.get_prefix(leases_prefix(self.prefix)):
            scope, _, repository_id = kv.key.rpartition("/")
            if not scope.endswith("/container_repository"):
                continue
            if self.run.worker_index_of(HolderInfo.from_json(kv.value).pid) != index:
                continue
            repository = self.store.get(int(repository_id))
            if repository is not None:
                paths.add(repository.path)
        return paths

    # -- the end ---------------------------------------------------------------------------

    def finish_and_check(self, *, timeout: float = 120) -> dict[str, Any]:
        """Wait until every repository is terminal, then check issue 13's invariants.

        The victim's later starts are answered at once (the fault is over): each slow one
        would only cost another fenced timeout.
        """
        self.configure_simulator(slow_start_seconds=0)
        wait_until(lambda: all_terminal(self.store), timeout=timeout, interval=0.5,
                   what="every repository terminal")  # fmt: skip
        report = self.run.report()
        replay = replay_in_flight(accepted_events(self.database_url), capacity=CAPACITY)
        wrong = []
        for repository_id in self.ids:
            repository = self.store.get(repository_id)
            assert repository is not None
            state, reason = expected_end(repository.path)
            if repository.migration_state is not state or (
                reason is not None and repository.migration_skipped_reason != reason
            ):
                wrong.append((repository.path, repository.migration_state.value,
                              repository.migration_skipped_reason))  # fmt: skip
        assert report["overlapping_repositories"] == [], report["overlapping_starts"]
        assert report["max_concurrent_imports"] <= CAPACITY, report["max_concurrent_imports"]
        assert replay.over_capacity == [], replay.over_capacity[:3]
        assert stale_accepted_writes(self.database_url) == []
        assert wrong == [], wrong
        return {
            "max_in_flight": replay.most,
            "max_concurrent_imports": report["max_concurrent_imports"],
        }


def until(condition: Callable[[], Any], *, timeout: float, what: str) -> Any:
    return wait_until(condition, timeout=timeout, interval=0.1, what=what)
