"""The steps of one repository's migration: store transitions plus registry calls.

Each method does one step for a repository whose lease the caller holds, naming the
lease's fencing token in every write, so the store refuses the write of a holder whose
lease has since passed to someone else. No leases or messages here: the actors wrap these
steps in a lease and a Dramatiq message; tests can drive them directly.

The outcome mapping follows the reference (GitLab's ContainerRepository, 2022): a start
that the registry accepted waits for its notification; "already imported" means the
repository is native and is skipped as ``native_import``; not found is skipped; "too many
imports" undoes the claim without counting a retry; anything else aborts (retried later).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import structlog

from migration import metrics
from migration.registry import (
    ImportOutcome,
    ImportResult,
    RegistryClient,
    RegistryImportStatus,
    StatusOutcome,
)
from migration.settings import Settings
from migration.states import ACTIVE_STATES, Event, SkipReason, State, allowed_retry
from migration.store import Outcome, Repository, StepResult, Store

log = structlog.get_logger(__name__)


_MATCHING_STATES: dict[RegistryImportStatus, frozenset[State]] = {
    RegistryImportStatus.PRE_IMPORT_COMPLETE: frozenset(
        {State.PRE_IMPORTING, State.PRE_IMPORT_DONE}
    ),
    RegistryImportStatus.PRE_IMPORT_FAILED: frozenset({State.PRE_IMPORTING}),
    RegistryImportStatus.PRE_IMPORT_CANCELED: frozenset({State.PRE_IMPORTING}),
    RegistryImportStatus.IMPORT_COMPLETE: frozenset({State.IMPORTING}),
    RegistryImportStatus.IMPORT_FAILED: frozenset({State.IMPORTING}),
    RegistryImportStatus.IMPORT_CANCELED: frozenset({State.IMPORTING}),
}


def status_matches_state(status: RegistryImportStatus, state: State) -> bool:
    """Whether a registry notification of ``status`` applies to a repository in ``state``."""
    return state in _MATCHING_STATES.get(status, frozenset())


class RegistryUnavailable(Exception):
    """The registry could not confirm a status before acting on it; try again later."""


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
    """Who writes: the fencing token and what the events log records about the writer."""

    token: int
    actor: str
    message_id: str | None = None


class Migrator:
    """One repository's steps against the store and the registry.

    :param store: the PostgreSQL store.
    :param registry: the registry import API client.
    """

    def __init__(self, store: Store, registry: RegistryClient) -> None:
        self.store = store
        self.registry = registry

    # -- helpers ------------------------------------------------------------------------

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
                expected_state=repository.migration_state,
                event=event,
                token=writer.token,
                actor=writer.actor,
                message_id=writer.message_id,
                skip_reason=skip_reason,
                detail=detail,
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
                repository.id,
                expected_state=repository.migration_state,
                event=event,
                token=writer.token,
                actor=writer.actor,
                message_id=writer.message_id,
                detail=detail,
            )
        )

    def _report(self, result: StepResult, outcome: StepOutcome, **fields: Any) -> StepReport:
        if not result.ok:
            return StepReport(
                StepOutcome.REFUSED, result.repository, {"refused": result.outcome.value}
            )
        return StepReport(outcome, result.repository, fields)

    def _abort(self, repository: Repository, writer: Writer, why: str) -> StepReport:
        result = self._step(repository, Event.ABORT_IMPORT, writer, detail={"why": why})
        return self._report(result, StepOutcome.ABORTED, abort_reason=why)

    def _skip(
        self, repository: Repository, writer: Writer, reason: SkipReason, why: str = ""
    ) -> StepReport:
        result = self._step(
            repository, Event.SKIP_IMPORT, writer, skip_reason=reason, detail={"why": why}
        )
        return self._report(result, StepOutcome.SKIPPED, skip_reason=reason.value)

    def _after_start(
        self, claimed: StepResult, claimed_from: State, answer: ImportResult, writer: Writer
    ) -> StepReport:
        """Map the registry's answer to a start that followed a successful claim."""
        repository = claimed.repository
        fields = {
            "registry_outcome": answer.outcome.value,
            "registry_http_status": answer.http_status,
        }
        match answer.outcome:
            case ImportOutcome.STARTED:
                return StepReport(StepOutcome.STARTED, repository, fields)
            case ImportOutcome.ALREADY_IMPORTED:
                report = self._skip(repository, writer, SkipReason.NATIVE_IMPORT, answer.detail)
            case ImportOutcome.NOT_FOUND:
                report = self._skip(repository, writer, SkipReason.NOT_FOUND, answer.detail)
            case ImportOutcome.TOO_MANY_IMPORTS:
                undone = _counted(
                    self.store.undo_claim(
                        repository.id,
                        expected_state=repository.migration_state,
                        claimed_from=claimed_from,
                        token=writer.token,
                        actor=writer.actor,
                        message_id=writer.message_id,
                        detail={"why": "registry: too many imports"},
                    )
                )
                report = self._report(undone, StepOutcome.UNDONE)
            case _:
                report = self._abort(
                    repository, writer, f"registry: {answer.outcome}: {answer.detail}"
                )
        report.fields.update(fields)
        return report

    # -- the steps ----------------------------------------------------------------------

    def start(self, repository: Repository, settings: Settings, writer: Writer) -> StepReport:
        """Start a ready repository (state ``default``): tags check, claim, pre-import."""
        if settings.max_tags_count and repository.tags_count > settings.max_tags_count:
            report = self._skip(
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
        answer = self.registry.start_pre_import(repository.path)
        return self._after_start(claimed, State.DEFAULT, answer, writer)

    def retry(self, repository: Repository, writer: Writer) -> StepReport:
        """Retry an aborted repository, reconciling with the registry's status first.

        Native or already complete at the registry: finish without another import.
        Otherwise claim the retry the state machine allows (by the state it was aborted in)
        and start that phase again.
        """
        status = self.registry.status(repository.path)
        if status.outcome is StatusOutcome.FOUND:
            if status.status is RegistryImportStatus.NATIVE:
                return self._skip(repository, writer, SkipReason.NATIVE_IMPORT, "registry: native")
            if status.status is RegistryImportStatus.IMPORT_COMPLETE:
                result = self._step(
                    repository,
                    Event.ALREADY_MIGRATED,
                    writer,
                    detail={"why": "registry: import_complete"},
                )
                return self._report(result, StepOutcome.FINISHED)
        event = allowed_retry(repository.migration_aborted_in_state)
        registry_status = status.status.value if status.status else status.outcome.value
        claimed = self._claim(
            repository, event, writer, detail={"registry_status": registry_status}
        )
        if not claimed.ok:
            return StepReport(_CLAIM_REFUSALS[claimed.outcome], claimed.repository)
        if event is Event.RETRY_PRE_IMPORT:
            answer = self.registry.start_pre_import(repository.path)
        else:
            answer = self.registry.start_import(repository.path)
        return self._after_start(claimed, State.IMPORT_ABORTED, answer, writer)

    def start_final_import(self, repository: Repository, writer: Writer) -> StepReport:
        """pre_import_done → importing, and ask the registry for the final import."""
        stepped = self._step(repository, Event.START_IMPORT, writer)
        if not stepped.ok:
            return self._report(stepped, StepOutcome.REFUSED)
        answer = self.registry.start_import(repository.path)
        return self._after_start(stepped, State.PRE_IMPORT_DONE, answer, writer)

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

        :param verify: ask the registry first whether ``status`` is still its current one.
            A notification may arrive late or twice (the registry retries until one is
            accepted), after a retry has already started the next attempt: acting on an old
            ``pre_import_failed`` would abort the running attempt and start a second import
            of the same repository. A notification whose status the registry no longer
            reports is IGNORED. The guard, which has just read the status, passes False.
        :raises RegistryUnavailable: ``verify`` and the registry's status could not be read
            (the caller retries the notification later rather than act on it unchecked).
        """
        state = repository.migration_state
        if not status_matches_state(status, state):
            return StepReport(
                StepOutcome.IGNORED,
                repository,
                {"ignored_status": status.value, "state": state.value},
            )
        if verify:
            current = self.registry.status(repository.path)
            if current.outcome in (StatusOutcome.ERROR, StatusOutcome.UNAUTHORIZED):
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
            if state is State.PRE_IMPORTING:
                stepped = self._step(
                    repository, Event.FINISH_PRE_IMPORT, writer, detail={"registry": detail}
                )
                if not stepped.ok:
                    return self._report(stepped, StepOutcome.REFUSED)
                repository = stepped.repository
            return self.start_final_import(repository, writer)
        if status is RegistryImportStatus.IMPORT_COMPLETE:
            result = self._step(
                repository, Event.FINISH_IMPORT, writer, detail={"registry": detail}
            )
            return self._report(result, StepOutcome.FINISHED)
        return self._abort(repository, writer, f"registry: {status.value} {detail}".strip())

    def reconcile_stale(
        self, repository: Repository, settings: Settings, writer: Writer
    ) -> StepReport:
        """The guard's step for an active repository that has not moved for too long.

        Ask the registry: an ended phase is applied as its notification would have been; a
        phase still running past its timeout is canceled, then aborted (or skipped as
        ``migration_canceled`` when this abort would use the last retry); a registry state
        that does not match ours aborts. A registry that cannot be asked changes nothing.
        """
        state = repository.migration_state
        status = self.registry.status(repository.path)
        fields: dict[str, Any] = {
            "registry_status": status.status.value if status.status else status.outcome.value
        }
        if status.outcome is StatusOutcome.ERROR or status.outcome is StatusOutcome.UNAUTHORIZED:
            return StepReport(
                StepOutcome.IGNORED, repository, {**fields, "why": "registry unreachable"}
            )
        registry_status = status.status
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
        running = {
            State.PRE_IMPORTING: (
                RegistryImportStatus.PRE_IMPORT_IN_PROGRESS,
                repository.migration_pre_import_started_at,
                settings.pre_import_timeout,
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
            cancel = self.registry.cancel(repository.path)
            fields.update(canceled=cancel.outcome.value, running_s=round(age, 1))
            if repository.migration_retries_count + 1 >= settings.max_retries:
                report = self._skip(
                    repository,
                    writer,
                    SkipReason.MIGRATION_CANCELED,
                    f"ran {age:.0f} s > {timeout:.0f} s",
                )
            else:
                report = self._abort(
                    repository, writer, f"ran {age:.0f} s > timeout {timeout:.0f} s; canceled"
                )
            report.fields.update(fields)
            return report
        report = self._abort(
            repository, writer, f"registry reports {fields['registry_status']} while {state.value}"
        )
        report.fields.update(fields)
        return report
