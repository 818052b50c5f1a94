"""One registry outage against a running local migration, measured (invariant 7).

Shared by ``tests/actors/test_registry_faults.py`` (short outages, asserted) and
``bench/outage.py`` (a 30 s outage per fault class, printed). The scenario:

1. the migration runs with ``enabled = false`` (nothing claimed yet) and its repositories
   seeded by :func:`devtools.seeding.seed_spread` (plain, native, missing, fail-once,
   fail-always paths);
2. the fault begins (:data:`FAULTS`), then the migration is enabled: every run meets the
   fault;
3. once the migrator has seen it (a claim undone for a registry fault, or the migration
   paused on 401), the fault is held for the rest of its time;
4. at the fault's end: no repository may be skipped, no retry charged;
5. the fault ends (the simulator started again, the fault switch cleared; after the 401,
   ``registry-migrator resume`` as an operator would): the seconds until the registry
   accepts the first start are the resume delay;
6. then every repository must end as its path says (``devtools.invariants.END_BY_MARKER``),
   and every accepted abort must carry a cause of the repository's own.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from devtools.invariants import (
    TERMINAL,
    ChargedAbort,
    WrongEnd,
    aborts_without_a_repository_cause,
    all_terminal,
    registry_fault_undos,
    wrong_end_states,
)
from devtools.launcher import LocalMigration
from devtools.waiting import wait_until
from migration.store import Store

BIN = Path(sys.executable).parent
#: The breaker's longest window during these runs (``registry_breaker_max_window``) and
#: the longest backoff of one repository (``registry_backoff_max``): short, so that the
#: bound "the breaker's cap + 5 s" is seconds.
BREAKER_CAP = 4.0
BACKOFF_MAX = 4.0
#: The workers' registry client timeout (``MIGRATOR_REGISTRY_TIMEOUT``) and how late the
#: slow fault answers (longer).
CLIENT_TIMEOUT = 1.0
SLOW_ANSWER_S = 2.5
#: The resume delay allowed after a fault ends (issue 11).
RESUME_BOUND_S = BREAKER_CAP + 5


@dataclass(frozen=True)
class Fault:
    """A fault class: how it begins, how it ends.

    :param name: as printed and parametrized.
    :param what: one line saying what the registry does meanwhile.
    :param begin: starts it on the run.
    :param end: ends it on the run (the 401's end also resumes the migration); returns when
        it was over (Unix time): the registry listening again, the switch cleared; for the
        401, the moment the write of the operator's ``resume`` landed (the command's own
        start-up is slow on a loaded machine, and the migration goes on from that write).
    """

    name: str
    what: str
    begin: Callable[[LocalMigration], None]
    end: Callable[[LocalMigration], float]


def resume(run: LocalMigration) -> float:
    """``registry-migrator resume``, as the operator does once the token is fixed.

    :returns: when its write landed (Unix time): the migration goes on from there, while
        the command itself may take seconds more to exit on a loaded machine.
    """
    command = subprocess.Popen(
        [str(BIN / "registry-migrator"), "resume"],
        env={**os.environ, **run.env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    landed: float | None = None
    with psycopg.connect(run.env["MIGRATOR_DATABASE_URL"], autocommit=True) as conn:
        while landed is None and command.poll() is None:
            row = conn.execute("SELECT enabled FROM migration_settings WHERE id = 1").fetchone()
            if row is not None and row[0]:
                landed = time.time()
            else:
                time.sleep(0.05)
    _, stderr = command.communicate(timeout=60)
    if command.returncode != 0:
        raise RuntimeError(f"registry-migrator resume failed: {stderr.strip()}")
    return time.time() if landed is None else landed


def _switch(**fault: Any) -> Callable[[LocalMigration], None]:
    def switch(run: LocalMigration) -> None:
        run.configure_simulator(**fault)

    return switch


def _cleared(run: LocalMigration) -> float:
    run.configure_simulator(fault=None)
    return time.time()


def _stop(run: LocalMigration) -> None:
    run.stop_simulator()


def _started(run: LocalMigration) -> float:
    run.start_simulator()
    return time.time()


def _token_fixed(run: LocalMigration) -> float:
    run.configure_simulator(token=None)
    return resume(run)


FAULTS: dict[str, Fault] = {
    fault.name: fault
    for fault in (
        Fault(
            "down",
            "the registry's process is stopped (connections refused)",
            _stop,
            _started,
        ),
        Fault(
            "503_on_start",
            "every start call is answered 503",
            _switch(fault="status:503", fault_calls="start"),
            _cleared,
        ),
        Fault(
            # Not "slow": a parametrize id is a pytest keyword, and "slow" means --long.
            "slow_answers",
            f"every call is answered {SLOW_ANSWER_S:g} s late (client timeout"
            f" {CLIENT_TIMEOUT:g} s); the calls still act",
            _switch(fault=f"slow:{SLOW_ANSWER_S:g}", fault_calls="all"),
            _cleared,
        ),
        Fault(
            "401",
            "the registry's token was rotated: every call is answered 401; then fixed and"
            " `registry-migrator resume`",
            _switch(token="rotated-token"),  # noqa: S106 (the fault: a wrong token)
            _token_fixed,
        ),
        Fault(
            "reset",
            "every connection is closed mid-answer",
            _switch(fault="reset", fault_calls="all"),
            _cleared,
        ),
        Fault(
            "garbage",
            "every call is answered 200 with an HTML page",
            _switch(fault="garbage", fault_calls="all"),
            _cleared,
        ),
    )
}


def migration_options() -> dict[str, Any]:
    """``LocalMigration`` options of an outage run (with its ``env`` additions)."""
    return {
        "workers": 2,
        "threads": 4,
        "schedulers": 1,
        "lease_ttl": 3,
        "env": {"MIGRATOR_REGISTRY_TIMEOUT": f"{CLIENT_TIMEOUT:g}"},
        "simulator_args": ["--pre-import-seconds", "0.05", "0.2", "--import-seconds", "0.05",
                           "0.2"],
    }  # fmt: skip


def prepare(store: Store) -> None:
    """The settings of an outage run: paused until the fault begins, short breaker windows."""
    store.update_settings(
        enabled=False,
        capacity=5,
        enqueue_interval=1,
        guard_interval=2,
        max_step_duration=60,
        registry_breaker_max_window=BREAKER_CAP,
        registry_backoff_max=BACKOFF_MAX,
    )


@dataclass
class Outage:
    """What one outage cost.

    :param fault: the fault class.
    :param held_s: how long the fault lasted, seconds.
    :param seen_after_s: seconds from enabling the migration until the migrator saw it.
    :param skipped: repositories skipped while it lasted.
    :param charged: retries charged while it lasted (sum of ``migration_retries_count``).
    :param undone: claims undone for a registry fault while it lasted.
    :param paused_reason: the migration's pause reason at the fault's end.
    :param resume_s: seconds from the fault's end to the first start the registry accepted.
    :param terminal: repositories terminal at the end, of ``total``.
    :param total: repositories.
    :param wrong_ends: repositories that ended other than their path says.
    :param charged_aborts: accepted aborts without a cause of the repository's own.
    """

    fault: str
    held_s: float = 0.0
    seen_after_s: float = 0.0
    skipped: int = 0
    charged: int = 0
    undone: int = 0
    paused_reason: str | None = None
    resume_s: float | None = None
    terminal: int = 0
    total: int = 0
    wrong_ends: list[WrongEnd] = field(default_factory=list)
    charged_aborts: list[ChargedAbort] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        """The figures as one flat JSON-able row."""
        return {
            "fault": self.fault,
            "held_s": round(self.held_s, 2),
            "seen_after_s": round(self.seen_after_s, 2),
            "skipped_during": self.skipped,
            "retries_charged_during": self.charged,
            "claims_undone_during": self.undone,
            "paused_reason": self.paused_reason,
            "resume_s": None if self.resume_s is None else round(self.resume_s, 2),
            "terminal": self.terminal,
            "total": self.total,
            "wrong_end_state": [w.path for w in self.wrong_ends],
            "charged_aborts": len(self.charged_aborts),
        }


def _skipped_and_charged(database_url: str) -> tuple[int, int]:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE migration_state = 'import_skipped'),"
            " coalesce(sum(migration_retries_count), 0) FROM container_repositories"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def _first_start_after(run: LocalMigration, since: float) -> float | None:
    """Unix time of the first start the registry accepted (202) at or after ``since``."""
    times = [
        e["at"]
        for e in run.report(events=True)["events"]
        if e["action"] == "start" and e["answer"] == 202 and e["at"] >= since
    ]
    return min(times) if times else None


def run_outage(
    run: LocalMigration,
    store: Store,
    database_url: str,
    fault: Fault,
    *,
    hold_s: float,
    finish_timeout: float = 180,
    on_fault_end: Callable[[Outage], None] | None = None,
) -> Outage:
    """Steps 2 to 6 of the module's scenario on a started, paused ``run``.

    :param hold_s: how long the fault lasts from the moment the migration is enabled
        (longer when the migrator has not seen it by then).
    :param finish_timeout: seconds for every repository to end after the fault.
    :param on_fault_end: called with the figures at the fault's end, before it is ended
        (a test asserts there, while the fault still holds).
    """
    outage = Outage(fault.name)
    began = time.monotonic()
    fault.begin(run)
    store.update_settings(enabled=True)
    enabled_at = time.monotonic()

    def seen() -> bool:
        return registry_fault_undos(database_url) > 0 or store.settings().paused_reason is not None

    wait_until(seen, timeout=60, interval=0.1, what=f"the migrator to see the {fault.name} fault")
    outage.seen_after_s = time.monotonic() - enabled_at
    time.sleep(max(0.0, enabled_at + hold_s - time.monotonic()))
    outage.skipped, outage.charged = _skipped_and_charged(database_url)
    outage.undone = registry_fault_undos(database_url)
    outage.paused_reason = store.settings().paused_reason
    if on_fault_end is not None:
        on_fault_end(outage)
    ended_at = fault.end(run)
    outage.held_s = time.monotonic() - began
    outage.total = sum(store.counts_by_state().values())

    first = wait_until(
        lambda: _first_start_after(run, ended_at),
        timeout=RESUME_BOUND_S + 60,
        interval=0.1,
        what="a start accepted after the fault",
    )
    outage.resume_s = first - ended_at
    wait_until(
        lambda: all_terminal(store),
        timeout=finish_timeout,
        interval=0.1,
        what="every repository terminal",
    )
    counts = store.counts_by_state()
    outage.terminal = sum(n for state, n in counts.items() if state in TERMINAL)
    outage.wrong_ends = wrong_end_states(database_url)
    outage.charged_aborts = aborts_without_a_repository_cause(database_url)
    return outage
