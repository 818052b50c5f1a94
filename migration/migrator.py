"""The steps of one repository's migration: store transitions plus registry calls.

Each method does one step for a repository whose lease the caller holds, naming the
lease's fencing token in every write, so the store refuses the write of a holder whose
lease has since passed to someone else. No leases or messages here: the actors wrap these
steps in a lease and a Dramatiq message; tests can drive them directly.

The outcome mapping follows the reference (GitLab's ContainerRepository, 2022), by the fault
class of each answer (``migration/registry.py`` has the table; invariant 7): a start that
the registry accepted waits for its notification; "already imported" (native) and "not
found" need no more work: done, with the reason recorded (``finish_import_as``); a failed pre-import
aborts (a retry is charged); "too many imports" and "already running" are not failures; a
fault of the registry (unreachable, timeout, 5xx, 401/403, an answer that is not the API's)
undoes the claim, charges nothing and backs the repository off. A start whose outcome is
unknown (a timeout, a reset, a 5xx) is reconciled with a status read first: the registry
may have started it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import structlog

from leases import Hold
from migration import metrics
from migration.registry import (
    CancelResult,
    FaultClass,
    ImportOutcome,
    ImportResult,
    ImportType,
    RegistryClient,
    RegistryImportStatus,
    StatusOutcome,
    StatusResult,
)
from migration.settings import Settings
from migration.states import (
    ACTIVE_STATES,
    Event,
    SkipReason,
    State,
    allowed_retry,
    can_undo,
    is_last_retry,
)
from migration.store import Candidate, Outcome, Repository, Seen, StepResult, Store

log = structlog.get_logger(__name__)


_MATCHING_STATES: dict[RegistryImportStatus, frozenset[State]] = {
    RegistryImportStatus.PRE_IMPORT_COMPLETE: frozenset(
        {State.PRE_IMPORTING, State.PRE_IMPORT_DONE}
    ),
    RegistryImportStatus.PRE_IMPORT_FAILED: frozenset({State.PRE_IMPORTING}),
    RegistryImportStatus.PRE_IMPORT_CANCELED: frozenset({State.PRE_IMPORTING}),
    # pre_import_done too: a final start whose answer was lost had its claim undone, and
    # the registry went on and finished it.
    RegistryImportStatus.IMPORT_COMPLETE: frozenset({State.IMPORTING, State.PRE_IMPORT_DONE}),
    RegistryImportStatus.IMPORT_FAILED: frozenset({State.IMPORTING}),
    RegistryImportStatus.IMPORT_CANCELED: frozenset({State.IMPORTING}),
}


def status_matches_state(status: RegistryImportStatus, state: State) -> bool:
    """Whether a registry notification of ``status`` applies to a repository in ``state``."""
    return state in _MATCHING_STATES.get(status, frozenset())


_APPLIED_AS: dict[RegistryImportStatus, tuple[frozenset[State], State | None]] = {
    RegistryImportStatus.PRE_IMPORT_COMPLETE: (
        frozenset({State.IMPORTING, State.IMPORT_DONE}),
        None,
    ),
    RegistryImportStatus.IMPORT_COMPLETE: (frozenset({State.IMPORT_DONE}), None),
}
for _status, _phase in (
    (RegistryImportStatus.PRE_IMPORT_FAILED, State.PRE_IMPORTING),
    (RegistryImportStatus.PRE_IMPORT_CANCELED, State.PRE_IMPORTING),
    (RegistryImportStatus.IMPORT_FAILED, State.IMPORTING),
    (RegistryImportStatus.IMPORT_CANCELED, State.IMPORTING),
):
    _APPLIED_AS[_status] = (frozenset({State.IMPORT_ABORTED, State.IMPORT_SKIPPED}), _phase)


def already_applied(status: RegistryImportStatus, repository: Repository) -> bool:
    """Whether a notification of ``status`` has already had its effect on ``repository``:
    a repeated delivery (the registry retries until a 2xx), an idempotent no-op."""
    states, aborted_in = _APPLIED_AS.get(status, (frozenset(), None))
    return repository.migration_state in states and (
        aborted_in is None or repository.migration_aborted_in_state is aborted_in
    )


# The phase a notification reports on, and the state a repository is in while that phase runs.
_PHASE_OF: dict[RegistryImportStatus, State] = {
    RegistryImportStatus.PRE_IMPORT_COMPLETE: State.PRE_IMPORTING,
    RegistryImportStatus.PRE_IMPORT_FAILED: State.PRE_IMPORTING,
    RegistryImportStatus.PRE_IMPORT_CANCELED: State.PRE_IMPORTING,
    RegistryImportStatus.IMPORT_COMPLETE: State.IMPORTING,
    RegistryImportStatus.IMPORT_FAILED: State.IMPORTING,
    RegistryImportStatus.IMPORT_CANCELED: State.IMPORTING,
}


def started_once(status: RegistryImportStatus, repository: Repository | Seen) -> bool:
    """Whether a notification of ``status`` can only be about the attempt now running.

    True when the repository is in the phase ``status`` reports on and that phase has been
    started exactly once (schema 0006's counts, never reset): no earlier attempt exists
    whose late notification this could be. False otherwise, including a count of 0 (a row
    written outside the fenced write: not known) and a status reported in another state
    (``import_complete`` in pre_import_done, after a start whose answer was lost).
    """
    phase = _PHASE_OF.get(status)
    if phase is None or repository.migration_state is not phase:
        return False
    starts = (
        repository.migration_pre_import_starts
        if phase is State.PRE_IMPORTING
        else repository.migration_import_starts
    )
    return starts == 1


#: The steps of a notification that completes the phase its repository is in.
_AS_NOTIFIED: dict[tuple[RegistryImportStatus, State], tuple[Event, ...]] = {
    (RegistryImportStatus.PRE_IMPORT_COMPLETE, State.PRE_IMPORTING): (
        Event.FINISH_PRE_IMPORT, Event.START_IMPORT,
    ),
    (RegistryImportStatus.IMPORT_COMPLETE, State.IMPORTING): (Event.FINISH_IMPORT,),
}  # fmt: skip


class RegistryUnavailable(Exception):
    """The registry could not confirm a status before acting on it; try again later."""


class LeaseAtRisk(Exception):
    """The holder's lease might be gone before a registry call could end: no call is made
    (invariant 8). The repository is left to the next holder."""


#: Seconds kept between a registry call's end and the lease's: etcd expires leases by its
#: own clock, and a keep-alive's answer is dated from its send.
LEASE_SLACK = 0.5
#: The shortest timeout worth a registry call; with less lease left, no call.
MIN_CALL_TIMEOUT = 0.5


class AbortCause(StrEnum):
    """Why an abort was charged: always something the registry said about *this*
    repository (invariant 7). Recorded as ``detail.cause`` of every ``abort_import`` event."""

    PRE_IMPORT_FAILED = "pre_import_failed"  # 424, or the pre_import_failed notification
    IMPORT_FAILED = "import_failed"  # the import_failed notification
    CANCELED = "canceled"  # a *_canceled notification
    TIMEOUT = "timeout"  # the guard canceled a phase running past its timeout
    REGISTRY_STATE_MISMATCH = "registry_state_mismatch"  # the registry's status contradicts ours
    INVALID_PATH = "invalid_path"  # our path cannot be sent to the registry
    OPERATOR = "operator"  # an operator aborted it
    #: its worker died between the claim and the start; found by the redelivered message
    #: (the registry never heard of it). Not the repository's fault either: a chaos run
    #: excuses these retries.
    INTERRUPTED = "interrupted"


_NOTIFIED_CAUSES = {
    RegistryImportStatus.PRE_IMPORT_FAILED: AbortCause.PRE_IMPORT_FAILED,
    RegistryImportStatus.IMPORT_FAILED: AbortCause.IMPORT_FAILED,
    RegistryImportStatus.PRE_IMPORT_CANCELED: AbortCause.CANCELED,
    RegistryImportStatus.IMPORT_CANCELED: AbortCause.CANCELED,
}
# What the registry reports when the phase a start asked for is under way (or already over).
_PHASE_UNDER_WAY = {
    ImportType.PRE: frozenset(
        {RegistryImportStatus.PRE_IMPORT_IN_PROGRESS, RegistryImportStatus.PRE_IMPORT_COMPLETE}
    ),
    ImportType.FINAL: frozenset(
        {RegistryImportStatus.IMPORT_IN_PROGRESS, RegistryImportStatus.IMPORT_COMPLETE}
    ),
}
# A 409 / 425 start answer: the phase the registry says is running.
_RUNNING_BY_CODE = {409: ImportType.FINAL, 425: ImportType.PRE}


class StepOutcome(StrEnum):
    """What one step did, for the run's log line and the caller's next move."""

    STARTED = "started"  # registry accepted a start; a notification will follow
    FINISHED = "finished"  # reached import_done
    SKIPPED = "skipped"  # reached import_skipped
    ABORTED = "aborted"  # aborted (retried later) or skipped for too many retries
    UNDONE = "undone"  # registry said 429: claim undone, no retry counted
    ADVANCED = "advanced"  # a state change with nothing more to do now
    AT_CAPACITY = "at_capacity"  # claim refused: capacity full
    DISABLED = "disabled"  # claim refused: migration paused
    REFUSED = "refused"  # fenced write refused (stale token or state changed)
    IGNORED = "ignored"  # nothing to do in this state
    ALIGNED = "aligned"  # the registry already runs the phase: taken over, no start sent
    REGISTRY_FAULT = "registry_fault"  # the registry failed: nothing (more) done or charged
    LEASE_AT_RISK = "lease_at_risk"  # our lease might end first: no registry call made


_CLAIM_REFUSALS = {
    Outcome.AT_CAPACITY: StepOutcome.AT_CAPACITY,
    Outcome.DISABLED: StepOutcome.DISABLED,
    Outcome.STATE_CHANGED: StepOutcome.REFUSED,
    Outcome.STALE_TOKEN: StepOutcome.REFUSED,
}


@dataclass
class StepReport:
    """The result of a step: what happened, the repository after it, and log fields."""

    outcome: StepOutcome
    repository: Repository
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def frees_capacity(self) -> bool:
        """Whether this step can let an enqueuer run start another repository.

        Only a repository that leaves the active states (done, skipped, aborted: an aborted
        one is also waiting for its retry) frees a slot of the capacity. A step that keeps
        it active (pre_import_complete -> final import started) changes nothing a run could
        act on: a trigger after it would only make an ``at_capacity`` or ``no_candidate``
        run. A refused step reports the row as it is now; when someone else has moved it
        out of the active states, it counts (rare, and cheap next to a lost trigger).
        """
        return (
            self.outcome is not StepOutcome.IGNORED
            and self.repository.migration_state not in ACTIVE_STATES
        )


def _counted(result: StepResult) -> StepResult:
    """Count an accepted write by the state it wrote (``registry_migrator_transitions``)."""
    if result.transition is not None:
        metrics.TRANSITIONS.labels(result.transition.to_state.value).inc()
    return result


@dataclass(frozen=True)
class Writer:
    """Who writes: the fencing token and what the events log records about the writer.

    :param token: the fencing token every write names.
    :param actor: who writes, for the events log.
    :param message_id: the message being processed, for the events log.
    :param lease: the hold the token comes from; every registry call asks it first
        (:meth:`fence`). None only where no lease is held (tests of the steps alone).
    """

    token: int
    actor: str
    message_id: str | None = None
    lease: Hold | None = None

    def fence(self, timeout: float) -> float:
        """The timeout a registry call may have so that it ends while the lease surely
        lives (invariant 8); :class:`LeaseAtRisk` when too little is left for any call.

        :param timeout: the client's own timeout.
        """
        if self.lease is None:
            return timeout
        left = self.lease.remaining() - LEASE_SLACK
        if left < MIN_CALL_TIMEOUT:
            lost = self.lease.lost
            raise LeaseAtRisk(
                f"lease of token {self.token} "
                + ("lost" if lost else f"has {left + LEASE_SLACK:.1f} s left")
                + ": no registry call"
            )
        return min(timeout, left)


def _fenced(step: Callable[..., StepReport]) -> Callable[..., StepReport]:
    """A step that stops, without a write, when the lease is at risk before a registry call
    (the calls that follow a claim undo it themselves, see ``Migrator._start_claimed``)."""

    @functools.wraps(step)
    def run(self: Migrator, repository: Repository, *args: Any, **kwargs: Any) -> StepReport:
        try:
            return step(self, repository, *args, **kwargs)
        except LeaseAtRisk as error:
            log.warning(
                "registry_call_not_made", container_repository_id=repository.id, why=str(error)
            )
            return StepReport(StepOutcome.LEASE_AT_RISK, repository, {"why": str(error)})

    return run


class Migrator:
    """One repository's steps against the store and the registry.

    :param store: the PostgreSQL store.
    :param registry: the registry import API client.
    """

    def __init__(self, store: Store, registry: RegistryClient) -> None:
        self.store = store
        self.registry = registry

    # -- helpers ------------------------------------------------------------------------

    @staticmethod
    def _written_by(repository: Repository, writer: Writer) -> dict[str, Any]:
        """The options of a fenced write that say who writes, on which row as seen."""
        return {
            "expected_state": repository.migration_state,
            "token": writer.token,
            "actor": writer.actor,
            "message_id": writer.message_id,
            "seen": repository,
        }

    def _step(
        self,
        repository: Repository,
        event: Event,
        writer: Writer,
        *,
        skip_reason: SkipReason | None = None,
        detail: dict[str, Any] | None = None,
    ) -> StepResult:
        return _counted(
            self.store.step(
                repository.id,
                event=event,
                skip_reason=skip_reason,
                detail=detail,
                **self._written_by(repository, writer),
            )
        )

    def _claim(
        self,
        repository: Repository,
        event: Event,
        writer: Writer,
        *,
        detail: dict[str, Any] | None = None,
    ) -> StepResult:
        return _counted(
            self.store.claim(
                repository.id, event=event, detail=detail, **self._written_by(repository, writer)
            )
        )

    def _report(self, result: StepResult, outcome: StepOutcome, **fields: Any) -> StepReport:
        if not result.ok:
            return StepReport(
                StepOutcome.REFUSED, result.repository, {"refused": result.outcome.value}
            )
        return StepReport(outcome, result.repository, fields)

    def abort(
        self, repository: Repository, writer: Writer, why: str, cause: AbortCause
    ) -> StepReport:
        """Abort an active repository (a retry is charged; at max_retries it is skipped).

        :param why: kept in the events log.
        :param cause: the repository-specific cause (invariant 7: never a registry fault).
        """
        result = self._step(
            repository, Event.ABORT_IMPORT, writer, detail={"why": why, "cause": cause.value}
        )
        return self._report(result, StepOutcome.ABORTED, abort_reason=why, abort_cause=cause.value)

    def _undo(
        self,
        repository: Repository,
        claimed_from: State,
        writer: Writer,
        why: str,
        **detail: Any,
    ) -> StepResult:
        return _counted(
            self.store.undo_claim(
                repository.id,
                claimed_from=claimed_from,
                detail={"why": why, **detail},
                **self._written_by(repository, writer),
            )
        )

    def _registry_fault(
        self,
        repository: Repository,
        writer: Writer,
        answer: ImportResult | StatusResult | CancelResult,
        *,
        claimed_from: State | None = None,
    ) -> StepReport:
        """The registry failed (invariant 7): undo the claim (when one was made), charge no
        retry, and back the repository off so that it does not hammer a failing registry."""
        kind = answer.error_kind.value if answer.error_kind else "error"
        why = f"registry: {kind}: {answer.detail}".strip()[:300]
        fields: dict[str, Any] = {"registry_unavailable": True, "registry_error": why}
        if claimed_from is not None:
            undone = self._undo(
                repository, claimed_from, writer, why, fault_class="registry", error_kind=kind
            )
            if not undone.ok:
                return self._report(undone, StepOutcome.REFUSED)
            repository = undone.repository
        backed_off = self.store.back_off(repository.id, token=writer.token, error=why)
        if backed_off is not None:
            repository = backed_off
            if backed_off.registry_not_before is not None:
                fields["backoff_until"] = backed_off.registry_not_before.isoformat()
        return StepReport(StepOutcome.REGISTRY_FAULT, repository, fields)

    def _registry_answered(self, repository: Repository) -> None:
        """A repository the registry answered for again leaves its backoff (a cheap no-op
        for one that never failed: the row read tells)."""
        if repository.registry_failures:
            self.store.clear_backoff(repository.id)

    def _retry_not_sent(self, repository: Repository) -> bool:
        """Whether ``repository`` was claimed by a retry (from import_aborted) and no step
        has been accepted since: what the registry reports may be the earlier attempt's."""
        return (
            repository.migration_retries_count > 0
            and self._claimed_from(repository) is State.IMPORT_ABORTED
            and can_undo(repository.migration_state, State.IMPORT_ABORTED)
        )

    def _claimed_from(self, repository: Repository) -> State | None:
        """The state the claim that put ``repository`` in its active state came from (the
        accepted event that arrived in it), or None when the log does not say."""
        for event in reversed(self.store.events(repository.id, limit=20)):
            if event.accepted and event.to_state == repository.migration_state.value:
                try:
                    return State(event.from_state) if event.from_state else None
                except ValueError:
                    return None
        return None

    def finish_as(
        self, repository: Repository, writer: Writer, reason: SkipReason, why: str = ""
    ) -> StepReport:
        """Done with a reason: native, or unknown to the registry (the reference's
        finish_import_as); nothing more to do for it."""
        result = self._step(
            repository, Event.FINISH_IMPORT_AS, writer, skip_reason=reason, detail={"why": why}
        )
        return self._report(result, StepOutcome.FINISHED, finish_reason=reason.value)

    def skip(
        self, repository: Repository, writer: Writer, reason: SkipReason, why: str = ""
    ) -> StepReport:
        """Skip a repository for good (any state but done and skipped)."""
        result = self._step(
            repository, Event.SKIP_IMPORT, writer, skip_reason=reason, detail={"why": why}
        )
        return self._report(result, StepOutcome.SKIPPED, skip_reason=reason.value)

    def _start_claimed(
        self, claimed: StepResult, claimed_from: State, writer: Writer, import_type: ImportType
    ) -> StepReport:
        """Send the start a claim was made for and map its answer. When the lease is at
        risk the start is not sent and the claim undone, charging nothing (invariant 8)."""
        repository = claimed.repository
        start = (
            self.registry.start_pre_import
            if import_type is ImportType.PRE
            else self.registry.start_import
        )
        try:
            answer = start(repository.path, fence=writer.fence)
            return self._after_start(claimed, claimed_from, answer, writer, import_type)
        except LeaseAtRisk as error:
            log.warning(
                "registry_call_not_made", container_repository_id=repository.id, why=str(error)
            )
            undone = self._undo(repository, claimed_from, writer, str(error), fault_class="lease")
            return StepReport(
                StepOutcome.LEASE_AT_RISK, undone.repository,
                {"why": str(error), "undone": undone.ok},
            )  # fmt: skip

    def _after_start(
        self,
        claimed: StepResult,
        claimed_from: State,
        answer: ImportResult,
        writer: Writer,
        import_type: ImportType,
    ) -> StepReport:
        """Map the registry's answer to a start that followed a successful claim."""
        repository = claimed.repository
        fields = {
            "registry_outcome": answer.outcome.value,
            "registry_http_status": answer.http_status,
            "registry_fault_class": answer.fault_class.value,
        }
        if answer.fault_class is FaultClass.REGISTRY and answer.error_kind is not None:
            if answer.error_kind.outcome_unknown:
                # The registry may have started it before the answer was lost: ask.
                status = self.registry.status(repository.path, fence=writer.fence)
                fields["registry_status_after"] = (
                    status.status.value if status.status else status.outcome.value
                )
                if status.status in _PHASE_UNDER_WAY[import_type]:
                    fields["why"] = "start answer lost; the registry reports it under way"
                    return StepReport(StepOutcome.STARTED, repository, fields)
            report = self._registry_fault(repository, writer, answer, claimed_from=claimed_from)
            report.fields.update(fields)
            return report
        if answer.fault_class is not FaultClass.REGISTRY:
            self._registry_answered(repository)
        match answer.outcome:
            case ImportOutcome.STARTED:
                return StepReport(StepOutcome.STARTED, repository, fields)
            case ImportOutcome.ALREADY_IMPORTED:
                report = self.finish_as(repository, writer, SkipReason.NATIVE_IMPORT, answer.detail)
            case ImportOutcome.NOT_FOUND:
                report = self.finish_as(repository, writer, SkipReason.NOT_FOUND, answer.detail)
            case ImportOutcome.TOO_MANY_IMPORTS:
                undone = self._undo(
                    repository, claimed_from, writer, "registry: too many imports",
                    fault_class="not_now",
                )  # fmt: skip
                report = self._report(undone, StepOutcome.UNDONE)
            case ImportOutcome.ALREADY_BEING_IMPORTED:
                running = _RUNNING_BY_CODE.get(answer.http_status or 0)
                if running is import_type:
                    # The registry already runs the very phase we claimed: wait for its
                    # notification, as after a 202.
                    fields["why"] = f"registry already runs the {import_type} phase"
                    return StepReport(StepOutcome.ALIGNED, repository, fields)
                # It runs the other phase: nothing to start now; a retry's status read
                # aligns the state once it is aborted, or the phase ends and the start works.
                undone = self._undo(
                    repository, claimed_from, writer,
                    f"registry: already importing ({answer.http_status}): {answer.detail}",
                    fault_class="not_now",
                )  # fmt: skip
                report = self._report(undone, StepOutcome.UNDONE)
            case ImportOutcome.PRE_IMPORT_FAILED:
                report = self.abort(
                    repository, writer, f"registry: {answer.detail}", AbortCause.PRE_IMPORT_FAILED
                )
            case _:  # an invalid path: ours, not the registry's
                report = self.abort(
                    repository, writer, f"registry: {answer.detail}", AbortCause.INVALID_PATH
                )
        report.fields.update(fields)
        return report

    # -- the steps ----------------------------------------------------------------------

    @_fenced
    def start(self, repository: Repository, settings: Settings, writer: Writer) -> StepReport:
        """Start a ready repository (state ``default``): tags check, claim, pre-import."""
        if settings.max_tags_count and repository.tags_count > settings.max_tags_count:
            report = self.skip(
                repository, writer, SkipReason.TOO_MANY_TAGS,
                f"{repository.tags_count} tags > max_tags_count {settings.max_tags_count}",
            )  # fmt: skip
            report.fields.update(
                tags_count_too_high=True, max_tags_count_setting=settings.max_tags_count
            )
            return report
        claimed = self._claim(repository, Event.START_PRE_IMPORT, writer)
        if not claimed.ok:
            return StepReport(_CLAIM_REFUSALS[claimed.outcome], claimed.repository)
        return self._start_claimed(claimed, State.DEFAULT, writer, ImportType.PRE)

    def start_listed(
        self, candidate: Candidate, settings: Settings, writer: Writer
    ) -> tuple[StepReport | None, Repository | None]:
        """:meth:`start` of a ready repository as the candidates' list showed it: its row is
        read and claimed in one round trip (:meth:`Store.claim_as_listed`) when it is still
        as listed and within ``max_tags_count``.

        :returns: the step's report, or ``(None, row)`` when no claim was made: the row as
            read is not as listed (or is to be skipped for its tags) and the caller decides
            on it, as after a read of its own (``(None, None)``: no such row).
        """
        listed = self.store.claim_as_listed(
            candidate, event=Event.START_PRE_IMPORT, max_tags_count=settings.max_tags_count,
            token=writer.token, actor=writer.actor, message_id=writer.message_id,
        )  # fmt: skip
        if not listed.results:
            return None, listed.repository
        claimed = _counted(listed.results[0])
        if not claimed.ok:
            return StepReport(_CLAIM_REFUSALS[claimed.outcome], claimed.repository), None
        return self._start_claimed(claimed, State.DEFAULT, writer, ImportType.PRE), None

    @_fenced
    def retry(self, repository: Repository, writer: Writer) -> StepReport:
        """Retry an aborted repository, reconciling with the registry's status first.

        Native or already complete at the registry: finish without another import. A phase
        the registry is still running: take it over (``align_*``) and send nothing; a new
        start would be refused (409 / 425) and charged. A registry that cannot be read:
        nothing is claimed or charged; the repository backs off. Otherwise claim the retry
        the state machine allows (by the state it was aborted in) and start that phase.
        """
        status = self.registry.status(repository.path, fence=writer.fence)
        if status.fault_class is FaultClass.REGISTRY:
            return self._registry_fault(repository, writer, status)
        self._registry_answered(repository)
        registry_status = status.status.value if status.status else status.outcome.value
        if status.outcome is StatusOutcome.FOUND:
            if status.status is RegistryImportStatus.NATIVE:
                return self.finish_as(
                    repository, writer, SkipReason.NATIVE_IMPORT, "registry: native"
                )
            if status.status is RegistryImportStatus.IMPORT_COMPLETE:
                result = self._step(
                    repository,
                    Event.ALREADY_MIGRATED,
                    writer,
                    detail={"why": "registry: import_complete"},
                )
                return self._report(result, StepOutcome.FINISHED)
            align = {
                RegistryImportStatus.PRE_IMPORT_IN_PROGRESS: Event.ALIGN_PRE_IMPORTING,
                RegistryImportStatus.IMPORT_IN_PROGRESS: Event.ALIGN_IMPORTING,
            }.get(status.status)  # type: ignore[arg-type]
            if align is not None:
                aligned = self._claim(
                    repository, align, writer,
                    detail={"registry_status": registry_status,
                            "why": "the registry already runs this phase"},
                )  # fmt: skip
                if not aligned.ok:
                    return StepReport(_CLAIM_REFUSALS[aligned.outcome], aligned.repository)
                return StepReport(
                    StepOutcome.ALIGNED, aligned.repository, {"registry_status": registry_status}
                )
        event = allowed_retry(repository.migration_aborted_in_state)
        claimed = self._claim(
            repository, event, writer, detail={"registry_status": registry_status}
        )
        if not claimed.ok:
            return StepReport(_CLAIM_REFUSALS[claimed.outcome], claimed.repository)
        import_type = ImportType.PRE if event is Event.RETRY_PRE_IMPORT else ImportType.FINAL
        return self._start_claimed(claimed, State.IMPORT_ABORTED, writer, import_type)

    @_fenced
    def start_final_import(self, repository: Repository, writer: Writer) -> StepReport:
        """pre_import_done → importing, and ask the registry for the final import."""
        stepped = self._step(repository, Event.START_IMPORT, writer)
        if not stepped.ok:
            return self._report(stepped, StepOutcome.REFUSED)
        return self._start_claimed(stepped, State.PRE_IMPORT_DONE, writer, ImportType.FINAL)

    @_fenced
    def on_registry_status(
        self,
        repository: Repository,
        status: RegistryImportStatus,
        writer: Writer,
        *,
        detail: str = "",
        verify: bool = True,
    ) -> StepReport:
        """Apply what the registry reports (a notification, or the guard's status query).

        ``pre_import_complete`` → pre_import_done, then the final import starts;
        ``import_complete`` → import_done; ``*_failed`` / ``*_canceled`` → abort. A status
        that does not fit the repository's state changes nothing (IGNORED).

        :param verify: ask the registry first whether ``status`` is still its current one,
            unless the phase was started only once (:func:`started_once`). A notification
            may arrive late or twice (the registry retries until one is accepted), after a
            retry has already started the next attempt: acting on an old
            ``pre_import_failed`` would abort the running attempt and start a second import
            of the same repository. A notification whose status the registry no longer
            reports is IGNORED. The guard, which has just read the status, passes False.
        :raises RegistryUnavailable: the status had to be checked and could not be read
            (the caller retries the notification later rather than act on it unchecked).
        """
        state = repository.migration_state
        if not status_matches_state(status, state):
            return StepReport(
                StepOutcome.IGNORED,
                repository,
                {"ignored_status": status.value, "state": state.value},
            )
        if verify and not started_once(status, repository):
            current = self.registry.status(repository.path, fence=writer.fence)
            if current.fault_class is FaultClass.REGISTRY:
                raise RegistryUnavailable(
                    f"cannot confirm {status.value} for {repository.path}: {current.outcome}"
                    f" {current.detail}".rstrip()
                )
            if current.status is not status:
                now = current.status.value if current.status else current.outcome.value
                return StepReport(
                    StepOutcome.IGNORED,
                    repository,
                    {"ignored_status": status.value, "state": state.value, "registry_status": now,
                     "why": "stale notification: the registry reports another status now"},
                )  # fmt: skip
        if status is RegistryImportStatus.PRE_IMPORT_COMPLETE:
            if state is not State.PRE_IMPORTING:
                return self.start_final_import(repository, writer)
            # pre_import_done, and the final import's step at once: one round trip.
            steps = self.store.step_twice(
                repository.id, first=Event.FINISH_PRE_IMPORT, then=Event.START_IMPORT,
                detail={"registry": detail}, **self._written_by(repository, writer),
            )  # fmt: skip
            return self._completed(status, steps, writer)
        if status is RegistryImportStatus.IMPORT_COMPLETE:
            event = Event.FINISH_IMPORT if state is State.IMPORTING else Event.ALREADY_MIGRATED
            result = self._step(repository, event, writer, detail={"registry": detail})
            return self._report(result, StepOutcome.FINISHED)
        return self.abort(
            repository, writer, f"registry: {status.value} {detail}".strip(),
            _NOTIFIED_CAUSES[status],
        )  # fmt: skip

    def on_registry_status_as_seen(
        self,
        repository_id: int,
        path: str,
        seen: Seen,
        status: RegistryImportStatus,
        writer: Writer,
        *,
        detail: str = "",
    ) -> tuple[StepReport | None, Repository | None]:
        """:meth:`on_registry_status` for a notification whose API read the row as ``seen``.
        A phase completed that was started once (nothing to confirm with the registry): its
        steps are written with the read that checks the row still has ``path`` and
        ``seen`` (:meth:`Store.steps_as_seen`), one round trip.

        :returns: the step's report; or ``(None, row)``, the row as read (None: no such
            row), when it is not as seen or the status needs more: the caller applies the
            status to it with :meth:`on_registry_status`.
        """
        events = _AS_NOTIFIED.get((status, seen.migration_state))
        if events is None or not started_once(status, seen):
            return None, self.store.get(repository_id)
        written = self.store.steps_as_seen(
            repository_id, path=path, seen=seen, events=events, detail={"registry": detail},
            token=writer.token, actor=writer.actor, message_id=writer.message_id,
        )  # fmt: skip
        if not written.results:
            return None, written.repository
        return self._completed(status, written.results, writer), None

    def _completed(
        self, status: RegistryImportStatus, steps: list[StepResult], writer: Writer
    ) -> StepReport:
        """The report of a completed phase's steps (``_AS_NOTIFIED``), written together: a
        refusal, import_done, or pre_import_done and the final import's start sent."""
        for result in steps:
            if not _counted(result).ok:
                return self._report(result, StepOutcome.REFUSED)
        if status is RegistryImportStatus.PRE_IMPORT_COMPLETE:
            return self._start_claimed(steps[-1], State.PRE_IMPORT_DONE, writer, ImportType.FINAL)
        return self._report(steps[-1], StepOutcome.FINISHED)

    @_fenced
    def reconcile_stale(
        self,
        repository: Repository,
        settings: Settings,
        writer: Writer,
        *,
        mismatch_cause: AbortCause = AbortCause.REGISTRY_STATE_MISMATCH,
    ) -> StepReport:
        """The guard's step for an active repository that has not moved for too long.

        Ask the registry: an ended phase is applied as its notification would have been; a
        phase still running past its timeout is canceled, then aborted (or skipped as
        ``migration_canceled`` when this abort would use the last retry); a registry state
        that does not match ours (or one outside the API's list) is canceled and aborted. A
        registry that cannot be read or cancelled changes nothing (``registry_fault``): the
        guard looks again on its next pass (invariant 7).
        """
        state = repository.migration_state
        status = self.registry.status(repository.path, fence=writer.fence)
        fields: dict[str, Any] = {
            "registry_status": status.status.value if status.status else status.outcome.value
        }
        if status.fault_class is FaultClass.REGISTRY:
            return StepReport(
                StepOutcome.REGISTRY_FAULT,
                repository,
                {**fields, "why": "registry unreachable", "registry_error": status.detail},
            )
        registry_status = status.status
        if (
            registry_status in _NOTIFIED_CAUSES
            and status_matches_state(registry_status, state)
            and self._retry_not_sent(repository)
        ):
            # A retry's claim, and the registry still shows the failure that was already
            # charged: the retry's start may never have reached it (its worker died in
            # between). Charging it again on that word would count one failure twice: undo
            # the claim; the next retry starts it, and a real new failure is charged then.
            why = f"registry still reports {registry_status.value}, already charged"
            undone = self._undo(
                repository, State.IMPORT_ABORTED, writer, why, fault_class="interrupted"
            )
            report = self._report(undone, StepOutcome.UNDONE, why=why)
            report.fields.update(fields)
            return report
        if (
            registry_status is not None
            and registry_status.ended
            and status_matches_state(registry_status, state)
        ):
            report = self.on_registry_status(
                repository, registry_status, writer, detail="found by the guard", verify=False
            )
            report.fields.update(fields)
            return report
        if registry_status is RegistryImportStatus.NATIVE:
            # The registry holds it natively: done, as a start answered 200 would have been.
            report = self.finish_as(
                repository, writer, SkipReason.NATIVE_IMPORT, "registry: native"
            )
            report.fields.update(fields)
            return report
        never_started = (
            state is State.PRE_IMPORTING and status.outcome is StatusOutcome.NOT_FOUND
        ) or (
            state is State.IMPORTING and registry_status is RegistryImportStatus.PRE_IMPORT_COMPLETE
        )
        claimed_from = self._claimed_from(repository) if never_started else None
        if claimed_from is not None and can_undo(state, claimed_from):
            # The registry never heard of the phase we claimed: the start never reached it
            # (its worker died or lost its lease between the claim and the call). Not the
            # repository's doing: undo the claim, charge nothing; the next run starts it
            # (and a repository the registry does not know then ends done, not_found).
            why = f"registry reports {fields['registry_status']} while {state.value}: never started"
            undone = self._undo(repository, claimed_from, writer, why, fault_class="interrupted")
            report = self._report(undone, StepOutcome.UNDONE, why=why)
            report.fields.update(fields)
            return report
        running = {
            State.PRE_IMPORTING: (
                RegistryImportStatus.PRE_IMPORT_IN_PROGRESS,
                repository.migration_pre_import_started_at,
                settings.pre_import_timeout_for(repository.tags_count),
            ),
            State.IMPORTING: (
                RegistryImportStatus.IMPORT_IN_PROGRESS,
                repository.migration_import_started_at,
                settings.import_timeout,
            ),
        }.get(state)
        if running is not None and registry_status is running[0]:
            _, started_at, timeout = running
            age = (datetime.now(UTC) - started_at).total_seconds() if started_at else 0.0
            if age <= timeout:
                return StepReport(
                    StepOutcome.IGNORED,
                    repository,
                    {**fields, "why": "still running within its timeout"},
                )
            cancel = self.registry.cancel(repository.path, fence=writer.fence)
            fields.update(canceled=cancel.outcome.value, running_s=round(age, 1))
            if cancel.fault_class is FaultClass.REGISTRY:
                return StepReport(
                    StepOutcome.REGISTRY_FAULT,
                    repository,
                    {**fields, "why": "cancel failed: registry unreachable",
                     "registry_error": cancel.detail},
                )  # fmt: skip
            if is_last_retry(repository.migration_retries_count, settings.max_retries):
                report = self.skip(
                    repository,
                    writer,
                    SkipReason.MIGRATION_CANCELED,
                    f"ran {age:.0f} s > {timeout:.0f} s",
                )
            else:
                report = self.abort(
                    repository,
                    writer,
                    f"ran {age:.0f} s > timeout {timeout:.0f} s; canceled",
                    AbortCause.TIMEOUT,
                )
            report.fields.update(fields)
            return report
        if (
            state is State.PRE_IMPORT_DONE
            and registry_status is RegistryImportStatus.IMPORT_IN_PROGRESS
        ):
            # A final start whose answer was lost (its claim undone) that the registry runs
            # after all: take it over, as a retry aligns; nothing is sent, nothing charged.
            stepped = self._step(
                repository, Event.START_IMPORT, writer,
                detail={"why": "the registry already runs the final import"},
            )  # fmt: skip
            report = self._report(stepped, StepOutcome.ALIGNED)
            report.fields.update(fields)
            return report
        if status.outcome is StatusOutcome.UNKNOWN_STATUS:
            # A status outside the API's list: whatever runs there, cancel it before the
            # abort frees its slot, as the reference does.
            cancel = self.registry.cancel(repository.path, fence=writer.fence)
            fields["canceled"] = cancel.outcome.value
            if cancel.fault_class is FaultClass.REGISTRY:
                return StepReport(
                    StepOutcome.REGISTRY_FAULT,
                    repository,
                    {**fields, "why": "cancel failed: registry unreachable",
                     "registry_error": cancel.detail},
                )  # fmt: skip
        report = self.abort(
            repository,
            writer,
            f"registry reports {fields['registry_status']} while {state.value}",
            mismatch_cause,
        )
        report.fields.update(fields)
        return report
