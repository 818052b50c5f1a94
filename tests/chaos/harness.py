"""The chaos test's own machinery: a worker supervisor and a seeded fault injector.

``WorkerSupervisor`` plays the part of Kubernetes for the workers of a
:class:`~devtools.launcher.LocalMigration`: a worker that died is started again.
``FaultInjector`` runs two threads while the migration runs: one SIGKILLs a random worker
every few seconds; the other injects the heavy faults once each, in a random order at
random times (SIGSTOP a worker past its lease TTL then SIGCONT, restart RabbitMQ, kill the
etcd leader then restart it, restart PostgreSQL) mixed with the registry's faults (the
simulator stopped then started again, 503 on every start, every answer slower than the
client's timeout, 401 on every call ended by an automated ``registry-migrator resume``)
and, when the workers talk through cuttable links (``tests/partition/links.py``, the
``--long`` run), with issue 13's zombies: a lease holder cut from etcd (its PostgreSQL link
slowed, so that its late writes land after its lease expired), and a worker SIGSTOPped
inside its registry start call past its TTL. Every fault is logged with its time, wall
clock included (stalls are measured from its end).
"""

from __future__ import annotations

import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from devtools.launcher import LaunchError, LocalMigration
from tests.partition.links import ProcessLinks, SeenRequest
from tests.servers import EtcdCluster

#: Seconds a zombie stays cut off or paused past its lease TTL: long enough for the next
#: holder to step its repositories first (tests/partition's (e) saw the next step 6 s after
#: the pause at TTL 3), so that the zombie's late writes meet the fence.
ZOMBIE_EXTRA_S = 6.0


@dataclass(frozen=True)
class Fault:
    """One injected fault.

    :param kind: worker_kill, worker_pause, rabbitmq_restart, etcd_leader_kill,
        postgres_restart, registry_down, registry_5xx, registry_slow, registry_401.
    :param at_s: seconds after the run started.
    :param took_s: how long the fault lasted (outage, pause), seconds.
    :param detail: which worker or member.
    :param began: when it began, wall clock (UTC).
    :param ended: when it was over (the service back, the pause lifted), wall clock (UTC).
    """

    kind: str
    at_s: float
    took_s: float
    detail: str
    began: datetime
    ended: datetime


@dataclass
class FaultLog:
    """The faults injected, thread-safe; printed at the end."""

    started: float = field(default_factory=time.monotonic)
    faults: list[Fault] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, kind: str, began: float, detail: str) -> None:
        took = time.monotonic() - began
        ended = datetime.now(UTC)
        fault = Fault(
            kind,
            round(began - self.started, 2),
            round(took, 2),
            detail,
            began=datetime.fromtimestamp(ended.timestamp() - took, UTC),
            ended=ended,
        )
        with self._lock:
            self.faults.append(fault)
        print(
            f"  fault t={fault.at_s:7.2f}s {kind:<18} {detail} ({fault.took_s:.2f} s)", flush=True
        )

    def error(self, text: str) -> None:
        with self._lock:
            self.errors.append(text)
        print(f"  harness error: {text}", flush=True)

    def counts(self) -> Counter[str]:
        return Counter(f.kind for f in self.faults)

    def windows(self) -> list[tuple[datetime, datetime]]:
        """``(began, ended)`` of every fault, wall clock."""
        with self._lock:
            return [(f.began, f.ended) for f in self.faults]


class WorkerSupervisor(threading.Thread):
    """Restarts dead workers of ``run``, checking every ``interval`` seconds.

    Workers it restarts are children of this thread (``PR_SET_PDEATHSIG``): call
    :meth:`finish` only after the run is stopped.

    :param run: the local migration.
    :param locks: one lock per worker; held while a worker is restarted, killed or paused.
    :param log: where restarts and failures are recorded.
    """

    def __init__(
        self,
        run: LocalMigration,
        locks: list[threading.Lock],
        log: FaultLog,
        *,
        interval: float = 0.3,
    ) -> None:
        super().__init__(name="worker-supervisor", daemon=True)
        self.run_ = run
        self.locks = locks
        self.log = log
        self.interval = interval
        self.restarts = 0
        self._restarting = threading.Event()
        self._restarting.set()
        self._exit = threading.Event()

    def run(self) -> None:
        while self._restarting.is_set():
            for index, lock in enumerate(self.locks):
                with lock:
                    if not self._restarting.is_set():
                        break
                    if self.run_.alive()[f"worker-{index}"]:
                        continue
                    try:
                        self.run_.restart_worker(index, timeout=120)
                        self.restarts += 1
                    except LaunchError as error:
                        self.log.error(f"worker-{index} restart: {str(error)[:300]}")
            time.sleep(self.interval)
        self._exit.wait()  # keep the restarted workers' parent thread alive until stopped

    def stop_restarting(self) -> None:
        """No more restarts (before the run is stopped); waits for one in progress.

        A restart still waiting for its worker to be ready when the run is stopped saw the
        worker exit with SIGTERM and logged it as a failed restart (the --long run failed
        so, with every invariant holding).
        """
        self._restarting.clear()
        for lock in self.locks:
            with lock:
                pass

    def finish(self) -> None:
        """Let the thread end (after the run is stopped)."""
        self._restarting.clear()
        self._exit.set()
        self.join(timeout=30)


class FaultInjector:
    """Injects the chaos run's faults from two threads until :meth:`stop`.

    :param run: the local migration (workers to kill and pause).
    :param locks: the supervisor's per-worker locks.
    :param etcd: the private etcd cluster (its leader is killed, then restarted).
    :param restart_service: restarts ``postgres`` or ``rabbitmq`` of the private stack.
    :param log: where each fault is recorded.
    :param seed: seed of every random choice (times, order, victims).
    :param lease_ttl: the workers' lease TTL; a paused worker stays paused TTL + 2 s.
    :param kill_every: (min, max) seconds between worker kills.
    :param heavy_gap: (min, max) seconds between heavy faults; the first after ``heavy_gap[0]``.
    :param etcd_down_s: seconds the killed etcd leader stays down.
    :param lease_holder: the index of a worker holding a repository lease now, if any: the
        pause goes to it (a holder paused mid-step writes with a stale token on resuming).
    :param resume: runs ``registry-migrator resume`` (after the 401 fault); returns what it
        did, raises when it failed.
    :param registry_fault_s: seconds each registry fault lasts at least; longer until the
        migrator has seen it (a fault that falls in the breaker's window of the previous one
        is never met by any call), at most ``registry_fault_max_s``.
    :param registry_fault_max_s: the longest a registry fault waits to be seen.
    :param registry_seen: a mark that changes whenever the migrator meets a registry fault
        (claims undone for one, the shared breaker opened), and whether the migration is
        paused.
    :param slow_s: the delay of every answer during the slow fault (longer than the
        workers' registry client timeout).
    :param links: each worker's links (etcd, PostgreSQL, registry through proxies): given,
        the zombie faults are injected once each too (:attr:`ZOMBIE`).
    :param holder_tokens: the tokens (lease create revisions) of the repository leases
        worker ``i`` holds now: a zombie's, whose late writes the fence must refuse.
    """

    HEAVY = ("worker_pause", "rabbitmq_restart", "etcd_leader_kill", "postgres_restart")
    REGISTRY = ("registry_down", "registry_5xx", "registry_slow", "registry_401")
    #: Zombie holders (issue 13): alive, lease lost, writes refused by the fence.
    ZOMBIE = ("zombie_etcd_cut", "zombie_pause_in_start")
    #: Every fault injected once per run (and :attr:`ZOMBIE` with ``links``).
    ONCE = HEAVY + REGISTRY

    def __init__(
        self,
        *,
        run: LocalMigration,
        locks: list[threading.Lock],
        etcd: EtcdCluster,
        restart_service: Callable[[str], None],
        log: FaultLog,
        seed: int,
        lease_ttl: float,
        kill_every: tuple[float, float] = (2.0, 5.0),
        heavy_gap: tuple[float, float] = (6.0, 10.0),
        etcd_down_s: float = 3.0,
        lease_holder: Callable[[], int | None] = lambda: None,
        resume: Callable[[], str],
        registry_fault_s: float = 4.0,
        registry_fault_max_s: float = 20.0,
        registry_seen: Callable[[], tuple[float, bool]] = lambda: (0, False),
        slow_s: float = 6.0,
        links: list[ProcessLinks] | None = None,
        holder_tokens: Callable[[int], set[int]] = lambda _index: set(),
    ) -> None:
        self.links = links or []
        self.holder_tokens = holder_tokens
        #: The faults of this run, once each.
        self.once = self.ONCE + (self.ZOMBIE if self.links else ())
        #: The tokens each zombie held when its fault began (its writes with them after the
        #: next holder's are refused): what the chaos report counts as fenced by zombies.
        self.zombie_tokens: set[int] = set()
        self.registry_fault_max_s = registry_fault_max_s
        self.registry_seen = registry_seen
        self.lease_holder = lease_holder
        self.resume = resume
        self.registry_fault_s = registry_fault_s
        self.slow_s = slow_s
        self.run = run
        self.locks = locks
        self.etcd = etcd
        self.restart_service = restart_service
        self.log = log
        self.lease_ttl = lease_ttl
        self.kill_every = kill_every
        self.heavy_gap = heavy_gap
        self.etcd_down_s = etcd_down_s
        self._kill_random = random.Random(seed)
        self._heavy_random = random.Random(seed + 1)
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(
                target=self._guarded(self._kill_loop), name="chaos-kills", daemon=True
            ),
            threading.Thread(target=self._heavy_thread, name="chaos-heavy", daemon=True),
        ]
        self.heavy_done = threading.Event()
        self._exit = threading.Event()

    def _guarded(self, loop: Callable[[], None]) -> Callable[[], None]:
        def guarded() -> None:
            try:
                loop()
            except Exception as error:  # recorded, and the test fails on it
                self.log.error(f"{loop.__name__}: {type(error).__name__}: {error}")

        return guarded

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop injecting; wait for a fault in progress to be undone (member restarted...)."""
        self._stop.set()
        kills, heavy = self._threads
        if kills.ident is not None:  # started
            kills.join(timeout=240)
        if heavy.ident is not None:
            self.heavy_done.wait(timeout=240)

    def finish(self) -> None:
        """Let the heavy thread end: only after the run is stopped (see :meth:`_heavy_thread`)."""
        self._stop.set()
        self._exit.set()
        if self._threads[1].ident is not None:
            self._threads[1].join(timeout=30)

    def _heavy_thread(self) -> None:
        # A simulator started again here is this thread's child (PR_SET_PDEATHSIG, as the
        # supervisor's workers are): it would be SIGKILLed when the thread ends, so the
        # thread outlives the faults until finish(), after the run is stopped.
        try:
            self._guarded(self._heavy_loop)()
        finally:
            self.heavy_done.set()
            self._exit.wait()

    def _kill_loop(self) -> None:
        rng = self._kill_random
        while not self._stop.wait(rng.uniform(*self.kill_every)):
            alive = self.run.alive()
            running = [i for i in range(len(self.locks)) if alive[f"worker-{i}"]]
            if not running:
                continue
            index = rng.choice(running)
            lock = self.locks[index]
            if not lock.acquire(blocking=False):
                continue  # being restarted or paused: another time
            try:
                if not self.run.alive()[f"worker-{index}"]:
                    continue
                began = time.monotonic()
                self.run.kill_worker(index, signal.SIGKILL)
                self.log.record("worker_kill", began, f"worker-{index}")
            finally:
                lock.release()

    def _heavy_loop(self) -> None:
        rng = self._heavy_random
        order = list(self.once)
        rng.shuffle(order)
        for kind in order:
            if self._stop.wait(rng.uniform(*self.heavy_gap)):
                break
            began = time.monotonic()
            detail = getattr(self, f"_{kind}")(rng)
            self.log.record(kind, began, detail)

    def _worker_pause(self, rng: random.Random) -> str:
        deadline = time.monotonic() + 10
        holder = self.lease_holder()
        while holder is None and time.monotonic() < deadline:
            time.sleep(0.02)
            holder = self.lease_holder()
        index = holder if holder is not None else rng.randrange(len(self.locks))
        with self.locks[index]:
            self.run.pause_worker(index)
            try:
                time.sleep(self.lease_ttl + 2)  # past the TTL: its leases expire meanwhile
            finally:
                self.run.resume_worker(index)
        what = "a lease holder" if holder is not None else "no lease held"
        return f"worker-{index} ({what}) SIGSTOP {self.lease_ttl + 2:g} s, SIGCONT"

    # -- zombies: a holder alive but without its lease -----------------------------------

    def _a_holder(self, rng: random.Random) -> tuple[int, bool]:
        """A worker behind links that holds a repository lease now (waiting up to 20 s),
        else any of them: (its index, whether it holds one)."""
        deadline = time.monotonic() + 20
        while True:
            for index in range(len(self.links)):
                if self.holder_tokens(index):
                    return index, True
            if time.monotonic() > deadline:
                return rng.randrange(len(self.links)), False
            time.sleep(0.05)

    def _zombie_etcd_cut(self, rng: random.Random) -> str:
        """Scenario (a) of tests/partition: a holder loses etcd for TTL + 6 s; its
        PostgreSQL link is 4 s slow each way meanwhile (the node's network in trouble), so
        the writes it still makes land after its lease expired and the next holder wrote.
        (Cut for TTL + 2 s with 2 s of delay, the 600-repository --long run refused none:
        the zombie's writes landed before any next holder's.)"""
        index, held = self._a_holder(rng)
        links = self.links[index]
        assert links.etcd is not None
        with self.locks[index]:
            tokens = self.holder_tokens(index)
            self.zombie_tokens |= tokens
            links.etcd.cut()
            links["postgres"].degrade(delay=4.0)
            try:
                time.sleep(self.lease_ttl + ZOMBIE_EXTRA_S)
            finally:
                links.restore()
        what = f"holding {len(tokens)} leases" if held else "no lease held"
        return (
            f"worker-{index} ({what}) cut from etcd, PostgreSQL +4 s,"
            f" {self.lease_ttl + ZOMBIE_EXTRA_S:g} s"
        )

    def _zombie_pause_in_start(self, _rng: random.Random) -> str:
        """Scenario (e): SIGSTOP the first worker seen sending a registry start (by its
        registry proxy, before the request is forwarded) for TTL + 6 s, then SIGCONT: its
        call's answer and its writes come after its lease expired and (the pre-import's
        notification retried once the lease is free) after the next holder's."""
        fired = threading.Event()
        paused: list[int] = []

        def hook(index: int) -> Callable[[SeenRequest], None]:
            def seen(request: SeenRequest) -> None:
                if fired.is_set() or request.method != "PUT" or "/import/" not in request.target:
                    return
                if not self.locks[index].acquire(blocking=False):
                    return  # being restarted or killed: the next start
                if fired.is_set():
                    self.locks[index].release()
                    return
                self.run.pause_worker(index)
                paused.append(index)
                fired.set()

            return seen

        for index, links in enumerate(self.links):
            links["registry"].on_request = hook(index)
        fired.wait(60)
        for links in self.links:
            links["registry"].on_request = None
        if not fired.is_set():
            return "no start seen in 60 s: nothing paused"
        index = paused[0]
        try:
            tokens = self.holder_tokens(index)
            self.zombie_tokens |= tokens
            time.sleep(self.lease_ttl + ZOMBIE_EXTRA_S)
        finally:
            self.run.resume_worker(index)
            self.locks[index].release()
        return (
            f"worker-{index} (holding {len(tokens)} leases) SIGSTOP inside its start call"
            f" {self.lease_ttl + ZOMBIE_EXTRA_S:g} s, SIGCONT"
        )

    def _rabbitmq_restart(self, _rng: random.Random) -> str:
        self.restart_service("rabbitmq")
        return "stack restart-service rabbitmq"

    def _postgres_restart(self, _rng: random.Random) -> str:
        self.restart_service("postgres")
        return "stack restart-service postgres"

    def _etcd_leader_kill(self, _rng: random.Random) -> str:
        leader = self.etcd.leader_index(timeout=15)
        self.etcd.kill(leader)
        try:
            new_leader = self.etcd.leader_index(timeout=15)
        except Exception:
            new_leader = -1
        time.sleep(self.etcd_down_s)
        try:
            self.etcd.restart(leader)
        except Exception as error:
            self.log.error(f"etcd m{leader} restart: {error}")
        return (
            f"m{leader} SIGKILL (new leader m{new_leader}), restarted after {self.etcd_down_s:g} s"
        )

    # -- the registry's faults: the migration must stall, charge nothing, and go on --------

    def _hold_until_seen(self, *, paused: bool = False) -> str:
        """Wait ``registry_fault_s``, and on until the migrator met the fault (a claim
        undone for it or the breaker opened; with ``paused``, the migration paused), at
        most the max."""
        began = time.monotonic()
        before, _ = self._seen()
        while True:
            elapsed = time.monotonic() - began
            mark, is_paused = self._seen()
            seen = is_paused if paused else mark != before
            if (seen and elapsed >= self.registry_fault_s) or elapsed >= self.registry_fault_max_s:
                what = "paused" if paused else "met"
                return f"held {elapsed:.1f} s, {what if seen else 'not met by any call'}"
            time.sleep(0.2)

    def _seen(self) -> tuple[float, bool]:
        try:
            return self.registry_seen()
        except Exception:  # PostgreSQL between two answers: ask again
            return 0, False

    def _registry_down(self, _rng: random.Random) -> str:
        code = self.run.stop_simulator()
        held = self._hold_until_seen()
        self.run.start_simulator()
        return f"simulator stopped (exit {code}), {held}, started again"

    def _registry_5xx(self, _rng: random.Random) -> str:
        self.run.configure_simulator(fault="status:503", fault_calls="start", fault_seconds=0)
        held = self._hold_until_seen()
        self.run.configure_simulator(fault=None)
        return f"503 on every start, {held}"

    def _registry_slow(self, _rng: random.Random) -> str:
        self.run.configure_simulator(fault=f"slow:{self.slow_s:g}", fault_calls="all")
        held = self._hold_until_seen()
        self.run.configure_simulator(fault=None)
        time.sleep(self.slow_s)  # over when the last slow answer has come
        return f"every answer {self.slow_s:g} s late, {held}"

    def _registry_401(self, _rng: random.Random) -> str:
        self.run.configure_simulator(fault="status:401", fault_calls="all")
        held = self._hold_until_seen(paused=True)
        self.run.configure_simulator(fault=None)
        # The operator fixed the token: resume (the migration paused itself on the 401).
        return f"401 on every call, {held}; {self.resume()}"
