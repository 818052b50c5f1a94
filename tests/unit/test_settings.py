"""Settings validation: typed and command-line values, one-line errors. No servers."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from migration.settings import PARSERS, Settings, SettingsError, parse_assignments, validate


def test_strings_from_a_command_line_are_parsed() -> None:
    values = validate(
        parse_assignments(
            [
                "enabled=off",
                "capacity=25",
                "enqueue_waiting_time=2.5",
                "created_before=2022-01-23T00:00:00Z",
                "max_tags_count=100",
                "max_retries=3",
                "pre_import_timeout=1800",
                "import_timeout=600",
                "max_step_duration=300",
                "root_namespace_deny_list=gitlab-org, acme ,acme",
                "lease_scope=global",
                "pending_enqueues=none",
                "enqueue_interval=60",
                "guard_interval=0.5",
            ]
        )
    )
    assert values == {
        "enabled": False,
        "capacity": 25,
        "enqueue_waiting_time": 2.5,
        "created_before": datetime(2022, 1, 23, tzinfo=UTC),
        "max_tags_count": 100,
        "max_retries": 3,
        "pre_import_timeout": 1800.0,
        "import_timeout": 600.0,
        "max_step_duration": 300.0,
        "root_namespace_deny_list": ["gitlab-org", "acme"],
        "lease_scope": "global",
        "pending_enqueues": None,
        "enqueue_interval": 60.0,
        "guard_interval": 0.5,
    }


def test_typed_values_pass() -> None:
    assert validate({"capacity": 0, "enabled": True, "root_namespace_deny_list": ("a",)}) == {
        "capacity": 0,
        "enabled": True,
        "root_namespace_deny_list": ["a"],
    }


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"capacty": "3"}, "capacty: unknown setting"),
        ({"capacity": "-1"}, "capacity: expected an integer >= 0"),
        ({"capacity": "ten"}, "capacity: expected an integer >= 0"),
        ({"capacity": 2.5}, "capacity: expected an integer"),
        ({"capacity": True}, "capacity: expected an integer"),
        ({"capacity": "99999999999"}, "capacity: 99999999999 is too large"),
        ({"max_retries": "0"}, "max_retries: expected an integer >= 1"),
        ({"enabled": "maybe"}, "enabled: expected true or false"),
        ({"enqueue_waiting_time": "-1"}, "enqueue_waiting_time: expected a number of seconds >= 0"),
        ({"import_timeout": "0"}, "import_timeout: expected a number of seconds > 0"),
        ({"import_timeout": "nan"}, "import_timeout: expected a number"),
        ({"max_step_duration": "inf"}, "max_step_duration: expected a number"),
        ({"created_before": "yesterday"}, "created_before: expected an ISO 8601 timestamp"),
        ({"created_before": "2022-01-23T00:00:00"}, "has no UTC offset"),
        ({"root_namespace_deny_list": "Bad Name"}, "is not a root namespace"),
        ({"root_namespace_deny_list": "a/b"}, "is not a root namespace"),
        ({"lease_scope": "cluster"}, "lease_scope: expected repository or global"),
        ({"pending_enqueues": "0"}, "pending_enqueues: expected an integer >= 1 or none"),
        ({"updated_at": "2022-01-01T00:00:00Z"}, "updated_at: unknown setting"),
        ({}, "no settings to change"),
    ],
)
def test_bad_changes_raise_one_line(changes: dict[str, object], message: str) -> None:
    with pytest.raises(SettingsError, match=message) as caught:
        validate(changes)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("pair", ["capacity", "=3", ""])
def test_assignment_needs_key_and_equals(pair: str) -> None:
    with pytest.raises(SettingsError, match="expected KEY=VALUE"):
        parse_assignments([pair])


def test_assignment_twice_is_refused() -> None:
    with pytest.raises(SettingsError, match="capacity: given twice"):
        parse_assignments(["capacity=1", "capacity=2"])


def test_every_settings_field_but_updated_at_is_settable() -> None:
    # paused_reason is the system's to write (a refused registry token); resume clears it.
    names = set(Settings.__dataclass_fields__) - {"updated_at", "paused_reason"}
    assert names == set(PARSERS)


#: The required settings fields (the others have defaults), for building Settings directly.
_SETTINGS: dict[str, object] = {
    "enabled": True, "capacity": 7, "enqueue_waiting_time": 0.0, "created_before": None,
    "max_tags_count": 0, "max_retries": 3, "pre_import_timeout": 1.0, "import_timeout": 1.0,
    "max_step_duration": 1.0, "root_namespace_deny_list": (), "lease_scope": "repository",
    "pending_enqueues": None, "enqueue_interval": 1.0, "guard_interval": 1.0,
}  # fmt: skip


def test_effective_pending_enqueues_defaults_to_capacity() -> None:
    base = dict(_SETTINGS)
    assert Settings(**base).effective_pending_enqueues == 7  # type: ignore[arg-type]
    assert Settings(**{**base, "pending_enqueues": 2}).effective_pending_enqueues == 2  # type: ignore[arg-type]


def test_the_pre_import_timeout_grows_with_the_tags_up_to_its_cap() -> None:
    base = dict(_SETTINGS)
    fixed = Settings(**{**base, "pre_import_timeout": 1800.0})  # type: ignore[arg-type]
    assert fixed.pre_import_timeout_for(10_000) == 1800  # the default: today's fixed value
    grows = Settings(**{**base, "pre_import_timeout": 600.0, "pre_import_timeout_per_tag": 0.5,
                        "pre_import_timeout_max": 3600.0})  # type: ignore[arg-type]  # fmt: skip
    assert grows.pre_import_timeout_for(0) == 600
    assert grows.pre_import_timeout_for(1000) == 1100
    assert grows.pre_import_timeout_for(100_000) == 3600
    assert validate({"pre_import_timeout_max": "none"}) == {"pre_import_timeout_max": None}
    with pytest.raises(SettingsError, match="pre_import_timeout_per_tag"):
        validate({"pre_import_timeout_per_tag": "-1"})
