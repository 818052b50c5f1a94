"""``enqueue_next_migration``: the reference's EnqueuerWorker, with per-repository leases.

One run starts (or retries) at most one repository. Runs on different repositories go on
in parallel: each takes only its repository's lease, and a busy lease makes the run try
the next candidate instead of giving up. While capacity is free a run re-enqueues itself,
through the dedup gate, so the migration keeps moving without a burst of messages. A
notification that frees a slot does its run in place (:func:`run_in_place`) rather than
sending one.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import dramatiq
import structlog
from dramatiq.middleware import CurrentMessage

from actors.config import CONFIG
from actors.later import REGISTRY_RETRIES, TryLater
from actors.reconcile import Recovery, recover_interrupted_delivery
from actors.runtime import Runtime, get_runtime, note_etcd_failure
from leases import Hold, HolderInfo, LeaseError, Ticket, try_acquire
from migration import metrics
from migration.keys import global_lease_key, repository_lease_key
from migration.migrator import StepOutcome, StepReport, Writer
from migration.settings import Settings
from migration.states import ACTIVE_STATES, STARTABLE_STATES, State
from migration.store import Candidate, Repository

log = structlog.get_logger(__name__)

ACTOR = "enqueue_next_migration"
#: Candidates read per run, and tried at most, when their leases are busy.
CANDIDATES_PER_RUN = 20
#: Fresh reads of the in-flight count and the candidates a run makes at most after meeting
#: a moved-on candidate (see EnqueuerRun._work); after that it goes on down its list.
REREADS_PER_RUN = 3
#: Outcomes after which the run stops re-enqueueing itself. A registry fault: the breaker
#: decides when the next run comes (invariant 7), not a loop of runs against a failing registry.
_STOP = {
    StepOutcome.AT_CAPACITY,
    StepOutcome.DISABLED,
    StepOutcome.UNDONE,
    StepOutcome.REGISTRY_FAULT,
    StepOutcome.LEASE_AT_RISK,  # this process's session is in trouble: let others run
}
#: Seconds after the breaker's window that its wake-up run comes (the key's lease expiry
#: is etcd's to time, within about a second).
WAKE_UP_SLACK = 1.0


def trigger_enqueue(
    runtime: Runtime, *, source: str, settings: Settings | None = None, limit: int | None = None
) -> bool:
    """Send one ``enqueue_next_migration`` through the dedup gate.

    At most P runs wait in the queue (P = the ``pending_enqueues`` setting, default the
    capacity); a trigger that finds P waiting collapses into them.

    :param runtime: the process runtime (settings for P, etcd for the gate).
    :param source: what triggered it (scheduler, self, notification, operator), logged.
    :param settings: the settings the caller has just read, for P; None takes the
        process's live settings (at most a second old).
    :param limit: collapse when this many runs are pending already, if fewer than P (a
        run's re-enqueue passes the free slots it saw: more pending runs could only find
        the capacity full).
    :returns: True when a message was sent, False when the trigger collapsed.
    """
    # One line per trigger (triggered, collapsed or failed): the chaos test matches each
    # triggered message id with the run that consumed it.
    try:
        if settings is None:
            settings = runtime.live_settings.get()
        pending_limit = settings.effective_pending_enqueues
        if limit is not None:
            pending_limit = max(1, min(pending_limit, limit))
        ticket = runtime.gate.enter(
            holder=HolderInfo(actor=f"trigger:{source}"), slots=pending_limit
        )
        if ticket is None:
            log.info("enqueue_collapsed", source=source, pending_limit=pending_limit)
            return False
        try:
            message = enqueue_next_migration.send(ticket.key, ticket.token, source)
        except Exception:
            # Free the slot now; if etcd cannot be reached the marker expires with its TTL.
            with contextlib.suppress(LeaseError):
                runtime.gate.leave(ticket)
            raise
    except Exception as error:
        log.warning("enqueue_trigger_failed", source=source, error=str(error) or repr(error))
        note_etcd_failure(error, where=f"trigger:{source}")
        raise
    log.info(
        "enqueue_triggered",
        source=source,
        triggered_message_id=message.message_id,
        pending_limit=pending_limit,
    )
    return True


def wake_up_after(window: float) -> None:
    """Send one enqueuer run for when the registry breaker's window ends.

    Sent by the process that opened the breaker, once per opening, past the dedup gate: a
    trigger collapsed into runs pending now would run while the breaker is still open and
    stop, and the migration would wait for the scheduler's next period instead.
    """
    try:
        enqueue_next_migration.send_with_options(
            args=(None, None, "breaker"), delay=int((window + WAKE_UP_SLACK) * 1000)
        )
    except Exception as error:  # the scheduler's periodic trigger is the net under it
        log.warning("wake_up_not_sent", window_s=window, error=str(error) or repr(error))
        return
    log.info("wake_up_scheduled", in_s=window + WAKE_UP_SLACK)


def _message_id() -> str | None:
    message = CurrentMessage.get_current_message()
    return message.message_id if message is not None else None


def try_order(
    candidates: list[Candidate],
    *,
    free: int,
    pick: Callable[[int], int] = random.randrange,
) -> list[Candidate]:
    """The order a run tries ``candidates`` in: the first ``free`` of the leading kind
    (aborted, or ready) from a random one of them round, then the rest in order.

    Runs in parallel read the same list at about the same time. Tried in its order, every
    run would first meet the leases of the others and the repositories they have started
    since it read (bench/pipeline.py: 3 busy leases and 2.4 started repositories per
    repository migrated, each an etcd request or three). The first ``free`` are all to be
    started now, by one run or another, so which run takes which changes nothing but the
    collisions. Beyond them, and across kinds, the order stands: with one free slot a run
    takes the first candidate, and aborted ones still come before ready ones.

    :param candidates: in the store's order (aborted first, then ready by age).
    :param free: the free slots of the capacity the run saw.
    :param pick: ``pick(n)`` is an index below ``n`` (``random.randrange``).
    """
    kind = candidates[0].migration_state if candidates else None
    leading = next(
        (i for i, c in enumerate(candidates) if c.migration_state is not kind), len(candidates)
    )
    window = min(leading, free)
    if window <= 1:
        return candidates
    first = pick(window)
    return candidates[first:window] + candidates[:first] + candidates[window:]


class EnqueuerRun:
    """One run of the enqueuer; ``fields`` becomes its single JSON log line."""

    def __init__(self, runtime: Runtime, *, message_id: str | None) -> None:
        self.runtime = runtime
        self.message_id = message_id
        self.fields: dict[str, Any] = {}
        self.re_enqueue = False
        #: The settings this run read (None until it has), reused for its re-enqueue.
        self.settings: Settings | None = None
        #: Repositories in flight when this run looked (before its claim).
        self.in_flight = 0
        #: Free slots this run saw after its own claim: its re-enqueue collapses into as
        #: many pending runs (more could only find the capacity full).
        self.free_after = 0

    def execute(self) -> str:
        """Do the run; returns the job status for the log line."""
        store = self.runtime.store
        # At most a second old: a pause reaches the claim at once (it re-reads ``enabled``
        # and the capacity under the row lock), a resume reaches the runs within a second.
        settings = self.settings = self.runtime.live_settings.get()
        self.fields["migration_enabled"] = settings.enabled
        if not settings.enabled:
            if settings.paused_reason:
                self.fields["paused_reason"] = settings.paused_reason
            return "disabled"
        breaker = self.runtime.registry_health.admit(settings)
        if breaker is not None:
            # Neither claim nor re-enqueue: the wake-up run of whoever opened it comes when
            # the window ends, and its probe decides (invariant 7).
            self.fields.update(
                registry_unavailable=True,
                registry_breaker_reason=breaker.reason,
                registry_breaker_window_s=breaker.window,
            )
            return "registry_unavailable"

        # Per-repository leases: the candidates are read with the count, in one round trip
        # (an at-capacity run reads them for nothing, a cheaper miss than a round trip
        # more for every run that starts one). The global lease's run reads them under it.
        def reread() -> tuple[int, list[Candidate]]:
            return store.in_flight_and_candidates(settings, limit=CANDIDATES_PER_RUN)

        candidates: list[Candidate] | None = None
        if settings.lease_scope == "global":
            in_flight = store.in_flight()
        else:
            in_flight, candidates = reread()
        self.in_flight = in_flight
        below = in_flight < settings.capacity
        self.fields.update(
            below_capacity=below,
            max_capacity_setting=settings.capacity,
            in_flight=in_flight,
            current_waiting_time_setting=settings.enqueue_waiting_time,
        )
        if not below:
            return "at_capacity"
        waited = store.waiting_time_passed(settings)
        self.fields["waiting_time_passed"] = waited
        if not waited:
            return "waiting"
        session = self.runtime.session()
        prefix = self.runtime.config.etcd_prefix
        holder = HolderInfo(actor=ACTOR, message_id=self.message_id)
        if settings.lease_scope == "global":
            # The reference's behaviour, kept for comparison: one fixed key for every run.
            acquisition = try_acquire(session, global_lease_key(prefix), holder=holder)
            metrics.count_lease_acquisition(actor=ACTOR, taken=acquisition.hold is not None)
            if acquisition.hold is None:
                self.fields["lease_already_taken"] = True
                return "lease_taken"
            with acquisition.hold as hold:
                # Every candidate is worked under the one global hold, released here; one
                # run at a time, so the candidates are tried in their order.
                return self._work(
                    settings, lambda _repo: contextlib.nullcontext(hold), spread=False
                )

        busy_here = 0

        def take(candidate: Candidate) -> Hold | None:
            nonlocal busy_here
            key = repository_lease_key(prefix, candidate.id)
            acquisition = try_acquire(session, key, holder=holder)
            metrics.count_lease_acquisition(actor=ACTOR, taken=acquisition.hold is not None)
            if acquisition.held_here:
                # Another run of this process holds it: known busy without asking etcd.
                busy_here += 1
                self.fields["candidates_busy_here"] = busy_here
            return acquisition.hold

        return self._work(settings, take, spread=True, candidates=candidates, reread=reread)

    def _work(
        self,
        settings: Settings,
        take: Callable[[Candidate], AbstractContextManager[Hold] | None],
        *,
        spread: bool,
        candidates: list[Candidate] | None = None,
        reread: Callable[[], tuple[int, list[Candidate]]] | None = None,
    ) -> str:
        """Step the first candidate whose lease ``take`` gets (None: busy).

        :param spread: try the candidates in :func:`try_order` (runs in parallel), not
            strictly in their order.
        :param candidates: as read with the in-flight count; None: read them now.
        :param reread: reads the in-flight count and the candidates again. Called when a
            candidate has moved on (another run started it since this run's read), at most
            :data:`REREADS_PER_RUN` times: the rest of the list is then stale too. Going on
            down it, a run chased the others' starts from behind and lost. Other runs
            start the head of the fresh list faster than this run tries its old one, at an
            etcd create and release and a read each (bench/pipeline.py: a twelfth of the
            runs tried all 20, 16-19 of them moved on). None: go on down the list.
        """
        if candidates is None:
            candidates = self.runtime.store.candidates(settings, limit=CANDIDATES_PER_RUN)
        tried = busy = moved_on = rereads = 0
        while True:
            if not candidates:
                self.fields["no_container_repository_found"] = True
                return "no_candidate"
            if spread:
                candidates = try_order(candidates, free=settings.capacity - self.in_flight)
            stale = False
            for candidate in candidates:
                tried += 1
                self.fields["candidates_tried"] = tried
                lease = take(candidate)
                if lease is None:
                    busy += 1
                    self.fields.update(lease_already_taken=True, candidates_busy=busy)
                    log.debug("lease_already_taken", container_repository_id=candidate.id)
                    continue
                # Leaving the block releases the repository's lease; a release that fails
                # (etcd gone) is logged and the key expires with the session: the step is
                # done either way.
                with lease as hold:
                    # Read again under the lease: the candidate list may be stale by now.
                    report, repository = self._start_listed(candidate, settings, hold)
                    if report is None:
                        if repository is None or repository.migration_state not in STARTABLE_STATES:
                            moved_on += 1
                            self.fields["candidates_moved_on"] = moved_on
                            stale = reread is not None and rereads < REREADS_PER_RUN
                            if stale:
                                break
                            continue
                        # Named before the step: a step that raises still says what it worked on.
                        self._name(repository, hold.token)
                        report = self._step(repository, settings, hold)
                self._record(report, hold.token)
                if report.outcome is StepOutcome.REFUSED:
                    continue
                self.free_after = self._free_after(report, settings)
                self.re_enqueue = report.outcome not in _STOP and self.free_after > 0
                return report.outcome.value
            if not stale:
                # Every candidate was busy or moved on: another run is on them; let it
                # re-enqueue.
                return "all_candidates_busy"
            assert reread is not None
            rereads += 1
            self.in_flight, candidates = reread()
            self.fields.update(candidates_reread=rereads, in_flight=self.in_flight)
            if self.in_flight >= settings.capacity:
                # The slots this run saw were taken by the runs that moved its candidates on.
                self.fields["below_capacity"] = False
                return "at_capacity"

    def _free_after(self, report: StepReport, settings: Settings) -> int:
        """The free slots this run saw, less the one its start took. None left: its
        re-enqueue could only make an ``at_capacity`` run, and it sends none. Some left: it
        re-enqueues through the gate with that many as the limit of pending runs, so it
        collapses when a pending run is already coming for each of them (each such run
        does the same after its own claim, so the capacity still fills).

        Why no free slot is left without a run (invariant 6): capacity is freed only by a
        repository leaving the active states, and each such step (notification, guard)
        starts a run *after* its commit: a notification does it in place
        (:func:`run_in_place`), the others trigger one. A trigger either sends a message or
        collapses into a pending one whose run has not yet left the gate, so either way a
        run reads the in-flight count after the slot was freed. That holds for a completion between
        our in-flight read and our claim too: its run reads after it, whether or not we
        re-enqueue. Our own read being stale only errs the safe way (others' claims since
        then: our count is too low, we re-enqueue; the claim itself re-checks capacity
        under the settings row lock, invariant 3). A capacity raised by the operator comes
        without a trigger either way: the scheduler's periodic trigger picks it up, as it
        does after any ``at_capacity`` run. The collapse loses no slot either: the gate
        collapses only when markers fill the first ``limit`` of its slots, i.e. at least
        that many runs are pending, one for each free slot we saw; each of them, after its
        own claim, re-enqueues by the same rule from a fresher count.
        """
        taken = (
            report.outcome is StepOutcome.STARTED
            and report.repository.migration_state in ACTIVE_STATES
        )
        return settings.capacity - self.in_flight - int(taken)

    def _start_listed(
        self, candidate: Candidate, settings: Settings, hold: Hold
    ) -> tuple[StepReport | None, Repository | None]:
        """Start a ready candidate with the read that checks it, in one round trip
        (:meth:`Migrator.start_listed`); an aborted one is read (its retry asks the
        registry first). ``(None, row)``: nothing done, decide on the row as read."""
        if candidate.migration_state is not State.DEFAULT:
            return None, self.runtime.store.get(candidate.id)
        try:
            report, row = self.runtime.migrator.start_listed(
                candidate, settings, self._writer(hold)
            )
        except BaseException:
            self._name(candidate, hold.token)  # a step that raises says what it was on
            raise
        if report is not None:
            self._name(candidate, hold.token)  # the step's own fields come after
        return report, row

    def _writer(self, hold: Hold) -> Writer:
        return Writer(token=hold.token, actor=ACTOR, message_id=self.message_id, lease=hold)

    def _step(self, repository: Repository, settings: Settings, hold: Hold) -> StepReport:
        writer = self._writer(hold)
        migrator = self.runtime.migrator
        if repository.migration_state is State.IMPORT_ABORTED:
            return migrator.retry(repository, writer)
        return migrator.start(repository, settings, writer)

    def _name(self, repository: Repository | Candidate, token: int) -> None:
        """The repository this run works on, as the reference's log names it."""
        self.fields.update(
            container_repository_id=repository.id,
            container_repository_path=repository.path,
            container_repository_migration_state=repository.migration_state.value,
            # The reference's import_type: "retry" for an aborted repository, else "next".
            import_type="retry" if repository.migration_state is State.IMPORT_ABORTED else "next",
            fencing_token=token,
        )

    def _record(self, report: StepReport, token: int) -> None:
        repository = report.repository
        self.fields.update(
            container_repository_id=repository.id,
            container_repository_path=repository.path,
            container_repository_migration_state=repository.migration_state.value,
            fencing_token=token,
            step_outcome=report.outcome.value,
            **report.fields,
        )


def _retry_when(retries: int, exception: BaseException) -> bool:
    # A recovery the registry did not let finish: tried again as long as an outage may last
    # (invariant 7), as a notification's is. Anything else: three times.
    if isinstance(exception, TryLater):
        return retries < REGISTRY_RETRIES
    return retries < 3


@dramatiq.actor(
    actor_name=ACTOR,
    queue_name=CONFIG.queue_name,
    retry_when=_retry_when,
    min_backoff=1000,
    max_backoff=10_000,
)
def enqueue_next_migration(
    ticket_key: str | None = None, ticket_token: int | None = None, source: str = "unknown"
) -> None:
    """One enqueuer run (see :class:`EnqueuerRun`).

    :param ticket_key: the dedup gate marker this message holds; left as the run starts.
    :param ticket_token: the marker's token (only that marker is removed).
    :param source: what triggered it, for the log.
    """

    recovery = Recovery()

    def prepare() -> Runtime:
        nonlocal recovery
        runtime = get_runtime()
        if ticket_key is not None and ticket_token is not None:
            # Idempotent: a retry of this message leaves a marker that is gone already.
            runtime.gate.leave(Ticket(str(ticket_key), int(ticket_token)))
        # A redelivery (the worker of the first delivery died): what that delivery claimed
        # is reconciled first, an aborted one then comes first among this run's candidates.
        recovery = recover_interrupted_delivery(
            runtime, CurrentMessage.get_current_message(), actor=ACTOR
        )
        return runtime

    _logged_run(prepare, source=source)
    if recovery.unfinished:
        # The registry could not say what became of a claim the dead delivery left (the
        # repository stays claimed, nothing runs for it): try again soon rather than leave
        # it to the guard, max_step_duration later. The retry recovers first, then runs.
        log.info(
            "enqueue_retry_pending",
            why="interrupted delivery not reconciled",
            unreconciled=recovery.unfinished,
        )
        raise TryLater("the earlier delivery's claims are not reconciled yet", after=2.0)


def run_in_place(runtime: Runtime, *, source: str) -> None:
    """Do an enqueuer run now, in the current message, instead of triggering one.

    For a step that freed a slot of the capacity (a notification): the run it would
    trigger, less the trigger's gate entry, publish, delivery and gate exit. It reads the
    in-flight count after the step's commit, as a triggered run would (invariant 6). A
    run that fails is replaced by a trigger, so a run still comes; a trigger that fails
    too raises, and the caller's message is retried.

    :param runtime: the process runtime.
    :param source: what freed the slot, logged as the run's source.
    """
    try:
        _logged_run(lambda: runtime, source=source)
    except Exception:  # logged by the run's line; a triggered run tries again
        trigger_enqueue(runtime, source=source)


def _logged_run(prepare: Callable[[], Runtime], *, source: str) -> None:
    """One run with its single log line (also when ``prepare`` or the run fails: the
    attempt is retried, and the log shows each), then its re-enqueue."""
    started = time.monotonic()
    status = "error"
    fields: dict[str, Any] = {}
    try:
        runtime = prepare()
        run = EnqueuerRun(runtime, message_id=_message_id())
        fields = run.fields
        status = run.execute()
    except Exception as error:
        fields = {**fields, "error": f"{type(error).__name__}: {error}"[:300]}
        raise
    finally:
        metrics.ENQUEUER_RUNS.labels(status).inc()
        log.info(
            "enqueue_next_migration",
            job_status=status,
            source=source,
            duration_s=round(time.monotonic() - started, 4),
            **fields,
        )
    if run.re_enqueue:
        trigger_enqueue(runtime, source="self", settings=run.settings, limit=run.free_after)
