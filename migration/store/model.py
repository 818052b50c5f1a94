"""The store's values and errors: rows as dataclasses, outcomes, path validation."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from enum import StrEnum
from typing import Any, NamedTuple, Protocol

from migration.states import SkipReason, State, Transition

# A registry repository path: lower-case components joined by '/', at least two of them
# (root namespace and name), as the distribution spec names repositories.
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_PATH = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})+$")
_MAX_PATH = 255


class StoreError(Exception):
    """Base of the store's own errors."""


class StoreUnavailable(StoreError):
    """PostgreSQL cannot be reached. ``str(error)`` is one line naming where."""


class InvalidRepository(StoreError, ValueError):
    """A repository to add is malformed or exists already. One line."""


class RepositoryNotFound(StoreError, KeyError):
    """No repository has that id."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "repository not found"


class Outcome(StrEnum):
    """What became of a claim or a step."""

    CLAIMED = "claimed"  # claim written
    STEPPED = "stepped"  # step or undo written
    DISABLED = "disabled"  # claim refused: the migration is paused
    AT_CAPACITY = "at_capacity"  # claim refused: capacity repositories are in flight
    STATE_CHANGED = "state_changed"  # refused (recorded): the state is not the expected one
    STALE_TOKEN = "stale_token"  # noqa: S105 - refused (recorded): a newer token wrote the row


def _value(member: StrEnum | None) -> str | None:
    """An optional enum member as the text stored in its column."""
    return member.value if member is not None else None


def _json_values(row: dict[str, Any]) -> dict[str, object]:
    """A row's values with timestamps as ISO 8601 text."""
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items()}


@dataclass(frozen=True, kw_only=True)
class Repository:
    """A ``container_repositories`` row."""

    id: int
    path: str
    root_namespace: str
    created_at: datetime
    tags_count: int
    migration_state: State
    migration_pre_import_started_at: datetime | None
    migration_pre_import_done_at: datetime | None
    migration_import_started_at: datetime | None
    migration_import_done_at: datetime | None
    migration_aborted_at: datetime | None
    migration_skipped_at: datetime | None
    migration_aborted_in_state: State | None
    migration_retries_count: int
    migration_skipped_reason: SkipReason | None
    fencing_token: int
    last_step_at: datetime | None
    registry_failures: int = 0
    registry_not_before: datetime | None = None
    registry_last_error: str | None = None
    # How many times the row arrived in pre_importing / importing (claims, alignments);
    # never reset (schema 0006, migration.migrator.started_once).
    migration_pre_import_starts: int = 0
    migration_import_starts: int = 0

    @classmethod
    def from_row(cls, **row: Any) -> Repository:
        """Build from a row, turning the text columns into their enums."""
        return cls(**_with_enums(row))

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly values keyed by column."""
        return _json_values(self.__dict__)


class Candidate(NamedTuple):
    """A repository as the candidates' list shows it: what a run needs to order it, to try
    its lease and to claim it, not the whole row.

    A tuple, not a :class:`Repository`: a run reads 20 of them and starts one, and the
    whole rows cost about a third more of the read's CPU, client and server (nine
    timestamps formatted and parsed per row; bench/README, issue 16's eleventh measurement).
    """

    id: int
    migration_state: State
    migration_retries_count: int
    migration_aborted_in_state: State | None
    fencing_token: int
    #: Named in the run's log line before its claim (a claim that raises still says what).
    path: str
    #: What the list is ordered by: ``migration_aborted_at`` for an aborted repository,
    #: ``created_at`` for a ready one.
    order_at: datetime


class WriteBasis(Protocol):
    """The fields of a row a fenced write is computed from and checked against: a
    :class:`Repository` or a :class:`Candidate`."""

    @property
    def migration_state(self) -> State: ...
    @property
    def migration_retries_count(self) -> int: ...
    @property
    def migration_aborted_in_state(self) -> State | None: ...
    @property
    def fencing_token(self) -> int: ...


@dataclass(frozen=True, kw_only=True)
class MigrationEvent:
    """A ``migration_events`` row: one accepted or refused write."""

    id: int
    repository_id: int
    from_state: str | None
    to_state: str | None
    event: str
    token: int
    actor: str
    message_id: str | None
    at: datetime
    detail: dict[str, Any]
    accepted: bool

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly values keyed by column."""
        return _json_values(self.__dict__)


@dataclass(frozen=True, kw_only=True)
class StepResult:
    """The outcome of :meth:`Store.claim`, :meth:`Store.step` or :meth:`Store.undo_claim`.

    :param outcome: what happened.
    :param repository: the row after the write, or as it is when the write was refused.
    :param transition: the transition written, or None when refused.
    """

    outcome: Outcome
    repository: Repository
    transition: Transition | None = None

    @property
    def ok(self) -> bool:
        """True when the write was made."""
        return self.outcome in (Outcome.CLAIMED, Outcome.STEPPED)


@dataclass(frozen=True)
class WrittenAsSeen:
    """What writes sent with the read that checks them did (:meth:`Store.claim_as_listed`,
    :meth:`Store.steps_as_seen`).

    :param repository: the row as read, or as the writes left it; None: no such row.
    :param results: the writes' results in order, up to the first one not written; empty
        when the row was not as the caller saw it (nothing written or recorded: the caller
        decides again on ``repository``).
    """

    repository: Repository | None
    results: list[StepResult]


class Seen(NamedTuple):
    """A row's columns as the API read them for a notification, carried in its message
    (``seen``): what the worker's step is computed from and checked against, so that it
    can be written in the round trip that reads the row under the lease."""

    migration_state: State
    migration_retries_count: int
    migration_aborted_in_state: State | None
    fencing_token: int
    migration_pre_import_starts: int
    migration_import_starts: int

    @classmethod
    def of(cls, repository: Repository) -> Seen:
        """The columns of ``repository``."""
        return cls(*(getattr(repository, name) for name in cls._fields))

    def as_message(self) -> dict[str, object]:
        """JSON values by column (states as their text)."""
        return {
            name: (value.value if isinstance(value, State) else value)
            for name, value in zip(self._fields, self, strict=True)
        }

    @classmethod
    def from_message(cls, value: object) -> Seen | None:
        """The columns from a message's ``seen``; None when it is not exactly that (the
        worker then reads the row, as for a message without it)."""
        if not isinstance(value, dict) or set(value) != set(cls._fields):
            return None
        try:
            aborted_in = value["migration_aborted_in_state"]
            states = ("migration_state", "migration_aborted_in_state")
            if not all(type(value[n]) is int for n in cls._fields if n not in states):
                return None
            return cls(
                migration_state=State(value["migration_state"]),
                migration_retries_count=value["migration_retries_count"],
                migration_aborted_in_state=None if aborted_in is None else State(aborted_in),
                fencing_token=value["fencing_token"],
                migration_pre_import_starts=value["migration_pre_import_starts"],
                migration_import_starts=value["migration_import_starts"],
            )
        except (ValueError, TypeError):
            return None


def validate_path(path: str) -> str:
    """Return ``path`` when it is a valid repository path, else raise :class:`InvalidRepository`."""
    if not isinstance(path, str) or len(path) > _MAX_PATH or not _PATH.match(path):
        raise InvalidRepository(
            f"invalid repository path {path!r}: expected root-namespace/.../name, lower-case "
            f"letters and digits separated by . _ __ or -, at most {_MAX_PATH} characters"
        )
    return path


_REPOSITORY_FIELDS = frozenset(f.name for f in fields(Repository))
_STATES = State._value2member_map_
_SKIP_REASONS = SkipReason._value2member_map_


def _state_of(text: str) -> State:
    """A state column's text as its enum: a lookup in the value map first (calling the enum
    is several times slower); an unknown text still raises ValueError."""
    return _STATES.get(text) or State(text)  # type: ignore[return-value]


def _with_enums(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with its text columns turned into their enums, in place (see
    :func:`_state_of`)."""
    row["migration_state"] = _state_of(row["migration_state"])
    aborted_in = row["migration_aborted_in_state"]
    if aborted_in is not None:
        row["migration_aborted_in_state"] = _state_of(aborted_in)
    reason = row["migration_skipped_reason"]
    if reason is not None:
        row["migration_skipped_reason"] = _SKIP_REASONS.get(reason) or SkipReason(reason)
    return row


#: Column names by the result's raw names (bytes): our queries have a handful of layouts.
_NAMES_BY_RAW: dict[tuple[bytes, ...], tuple[str, ...]] = {}
_NAMES_CACHED = 64


def _column_names(cursor: Any) -> tuple[str, ...]:
    """The result's column names. ``cursor.description`` builds a Column object per column
    on every call (a fifth of a worker's psycopg time in bench/pipeline.py's profile), so
    the names are kept by the raw names libpq gives, decoded once per layout."""
    result = cursor.pgresult
    if result is None:
        return ()
    raw = tuple(result.fname(i) or b"" for i in range(result.nfields))
    names = _NAMES_BY_RAW.get(raw)
    if names is None:
        description = cursor.description
        names = tuple(column.name for column in description) if description else ()
        if len(_NAMES_BY_RAW) < _NAMES_CACHED:
            _NAMES_BY_RAW[raw] = names
    return names


def repository_rows(cursor: Any) -> Callable[[Sequence[Any]], Repository]:
    """A psycopg row factory making :class:`Repository` objects, about twice as fast as
    ``kwargs_row(Repository.from_row)`` (~11 us a row here; the candidates of every run are
    20 rows): the column names are read once per result, the enums looked up in their value
    maps, and the frozen dataclass filled without its generated ``__init__``.

    Only when the columns are exactly the dataclass's fields; any other result goes through
    :meth:`Repository.from_row`, which raises on a missing or unknown column as before.
    An unknown state text raises ValueError either way.
    """
    names = _column_names(cursor)
    if frozenset(names) != _REPOSITORY_FIELDS or len(names) != len(_REPOSITORY_FIELDS):

        def checked(values: Sequence[Any]) -> Repository:
            return Repository.from_row(**dict(zip(names, values, strict=True)))

        return checked
    new = object.__new__

    def make(values: Sequence[Any]) -> Repository:
        row = _with_enums(dict(zip(names, values, strict=True)))
        repository: Repository = new(Repository)
        repository.__dict__.update(row)  # frozen: no __setattr__, but the same attributes
        return repository

    return make


def candidate_rows(cursor: Any) -> Callable[[Sequence[Any]], Candidate]:
    """A psycopg row factory making :class:`Candidate` tuples from the candidates' query
    (its columns in the tuple's order: :data:`migration.store.sql.CANDIDATE_COLUMNS`)."""
    new = tuple.__new__

    def make(values: Sequence[Any]) -> Candidate:
        aborted_in = values[3]
        return new(Candidate, (
            values[0], _state_of(values[1]), values[2],
            None if aborted_in is None else _state_of(aborted_in), values[4], values[5],
            values[6],
        ))  # fmt: skip

    return make
