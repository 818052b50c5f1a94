"""The live migration settings: one row in PostgreSQL. Claims re-read ``enabled`` and
``capacity`` under the row lock; runs and triggers use a per-process copy at most a second
old (actors.live_settings), the guard and the CLI read the row each time.

:class:`Settings` is that row. :func:`validate` turns requested changes (typed values, or the
strings a command line gives) into checked column values, or raises :class:`SettingsError`
with one line naming the key; nothing is written unless every change is valid.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from datetime import datetime

LEASE_SCOPES = ("repository", "global")
# A root namespace (a GitLab top-level group path, lower-cased like registry paths).
_NAMESPACE = re.compile(r"^[a-z0-9](?:[a-z0-9._-]*[a-z0-9])?$")
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


class SettingsError(ValueError):
    """A settings change is invalid. ``str(error)`` is one line naming the key."""


@dataclass(frozen=True, kw_only=True)
class Settings:
    """The migration-tunable settings (the ``migration_settings`` row).

    :param enabled: runs start new work only when true (``pause``/``resume``).
    :param capacity: at most this many repositories in pre_importing, pre_import_done and
        importing together.
    :param enqueue_waiting_time: seconds that must pass after the last finished step before
        a run starts another repository (0 = no wait).
    :param created_before: only repositories created before this are migrated (None = all).
    :param max_tags_count: repositories with more tags are skipped (0 = no check).
    :param max_retries: the abort that brings a repository's retries to this skips it.
    :param pre_import_timeout: seconds a pre-import may run before the guard aborts it (the
        base, with the two below: see :meth:`pre_import_timeout_for`).
    :param pre_import_timeout_per_tag: seconds more per tag of the repository (0: fixed).
    :param pre_import_timeout_max: the most the grown timeout may be (None: no cap).
    :param import_timeout: seconds a final import may run before the guard aborts it.
    :param max_step_duration: seconds without a step after which an active repository is stale.
    :param root_namespace_deny_list: root namespaces that are never migrated.
    :param lease_scope: ``repository`` (one lease per repository) or ``global`` (one lease
        for every run, the reference's behaviour, kept for comparison).
    :param pending_enqueues: the bound P of the enqueue dedup gate (None = capacity).
    :param enqueue_interval: seconds between the scheduler's periodic enqueues.
    :param guard_interval: seconds between the scheduler's stale-migration guard runs.
    :param paused_reason: why the system paused the migration (the registry refused our
        token), None when it runs or the operator paused it; ``resume`` clears it.
    :param registry_breaker_max_window: the longest the shared registry breaker stays open
        before the next probe (its window doubles from 5 s up to this).
    :param registry_backoff_max: the longest one repository backs off after registry faults.
    :param updated_at: when the row last changed.
    """

    enabled: bool
    capacity: int
    enqueue_waiting_time: float
    created_before: datetime | None
    max_tags_count: int
    max_retries: int
    pre_import_timeout: float
    import_timeout: float
    max_step_duration: float
    root_namespace_deny_list: tuple[str, ...]
    lease_scope: str
    pending_enqueues: int | None
    enqueue_interval: float
    guard_interval: float
    paused_reason: str | None = None
    registry_breaker_max_window: float = 60.0
    registry_backoff_max: float = 300.0
    pre_import_timeout_per_tag: float = 0.0
    pre_import_timeout_max: float | None = None
    updated_at: datetime | None = None

    def pre_import_timeout_for(self, tags_count: int) -> float:
        """The guard's pre-import timeout for a repository with ``tags_count`` tags: the
        reference's dynamic timeout, a base plus seconds per tag, capped."""
        grown = self.pre_import_timeout + max(tags_count, 0) * self.pre_import_timeout_per_tag
        if self.pre_import_timeout_max is not None:
            grown = min(grown, max(self.pre_import_timeout_max, self.pre_import_timeout))
        return grown

    @property
    def effective_pending_enqueues(self) -> int:
        """P of the dedup gate: ``pending_enqueues``, or the capacity when it is unset."""
        return self.pending_enqueues if self.pending_enqueues is not None else max(self.capacity, 1)

    @classmethod
    def from_row(cls, **row: object) -> Settings:
        """Build from a database row (extra columns such as ``id`` are ignored)."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in row.items() if k in names}
        values["root_namespace_deny_list"] = tuple(values.get("root_namespace_deny_list") or ())  # type: ignore[arg-type]
        return cls(**values)  # type: ignore[arg-type]

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly values, keyed by setting name."""
        out: dict[str, object] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, datetime):
                value = value.isoformat()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


def _boolean(key: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise SettingsError(f"{key}: expected true or false, got {value!r}")


def _integer(minimum: int, *, optional: bool = False) -> Callable[[str, object], int | None]:
    def parse(key: str, value: object) -> int | None:
        if optional and (
            value is None
            or (isinstance(value, str) and value.strip().lower() in {"", "none", "null"})
        ):
            return None
        number: int | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
            number = int(value)
        if number is None or number < minimum:
            also = " or none" if optional else ""
            raise SettingsError(f"{key}: expected an integer >= {minimum}{also}, got {value!r}")
        if number > 2**31 - 1:
            raise SettingsError(f"{key}: {number} is too large")
        return number

    return parse


def _seconds(*, positive: bool) -> Callable[[str, object], float]:
    def parse(key: str, value: object) -> float:
        number: float | None = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = None
        if number is None or not math.isfinite(number) or number < 0 or (positive and number == 0):
            bound = "> 0" if positive else ">= 0"
            raise SettingsError(f"{key}: expected a number of seconds {bound}, got {value!r}")
        return number

    return parse


def _optional_seconds(key: str, value: object) -> float | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in {"", "none", "null"}):
        return None
    return _seconds(positive=True)(key, value)


def _timestamp(key: str, value: object) -> datetime | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in {"", "none", "null"}):
        return None
    moment: datetime | None = None
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            moment = None
    if moment is None:
        raise SettingsError(
            f"{key}: expected an ISO 8601 timestamp with a UTC offset or none, got {value!r}"
        )
    if moment.tzinfo is None:
        raise SettingsError(f"{key}: {value!r} has no UTC offset (add Z or +00:00)")
    return moment


def _deny_list(key: str, value: object) -> list[str]:
    if value is None:
        return []
    items: Iterable[object]
    if isinstance(value, str):
        items = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, list | tuple | set | frozenset):
        items = value
    else:
        raise SettingsError(
            f"{key}: expected a comma-separated list of root namespaces, got {value!r}"
        )
    names: list[str] = []
    for item in items:
        if not isinstance(item, str) or not _NAMESPACE.match(item):
            raise SettingsError(
                f"{key}: {item!r} is not a root namespace (lower-case letters, digits, . _ -)"
            )
        if item not in names:
            names.append(item)
    return names


def _lease_scope(key: str, value: object) -> str:
    if not isinstance(value, str) or value.strip() not in LEASE_SCOPES:
        raise SettingsError(f"{key}: expected {' or '.join(LEASE_SCOPES)}, got {value!r}")
    return value.strip()


#: Every settable key and its parser. ``updated_at`` is not settable.
PARSERS: dict[str, Callable[[str, object], object]] = {
    "enabled": _boolean,
    "capacity": _integer(0),
    "enqueue_waiting_time": _seconds(positive=False),
    "created_before": _timestamp,
    "max_tags_count": _integer(0),
    "max_retries": _integer(1),
    "pre_import_timeout": _seconds(positive=True),
    "import_timeout": _seconds(positive=True),
    "max_step_duration": _seconds(positive=True),
    "root_namespace_deny_list": _deny_list,
    "lease_scope": _lease_scope,
    "pending_enqueues": _integer(1, optional=True),
    "enqueue_interval": _seconds(positive=True),
    "guard_interval": _seconds(positive=True),
    "registry_breaker_max_window": _seconds(positive=True),
    "registry_backoff_max": _seconds(positive=True),
    "pre_import_timeout_per_tag": _seconds(positive=False),
    "pre_import_timeout_max": _optional_seconds,
}


def validate(changes: Mapping[str, object]) -> dict[str, object]:
    """Check every change; return the values to write, keyed by column.

    :param changes: setting name -> new value (typed, or a string from a command line).
    :raises SettingsError: the first unknown key or bad value, in one line.
    """
    if not changes:
        raise SettingsError("no settings to change (expected KEY=VALUE)")
    out: dict[str, object] = {}
    for key, value in changes.items():
        parser = PARSERS.get(key)
        if parser is None:
            raise SettingsError(f"{key}: unknown setting (known: {', '.join(PARSERS)})")
        out[key] = parser(key, value)
    return out


def parse_assignments(pairs: Iterable[str]) -> dict[str, str]:
    """Split ``KEY=VALUE`` arguments into a mapping (values stay strings for :func:`validate`).

    :raises SettingsError: an argument has no ``=`` or names a key twice.
    """
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SettingsError(f"{pair!r}: expected KEY=VALUE")
        if key in out:
            raise SettingsError(f"{key}: given twice")
        out[key] = value
    return out
