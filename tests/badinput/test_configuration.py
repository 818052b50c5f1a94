"""Bad configuration: each ``MIGRATOR_`` variable malformed in turn, bad ``settings set``.

Every refusal is exit status 2 with exactly one line on standard error naming the
variable (or the setting), and nothing changed. Most cases run the command in this process
(click's runner, fast); a few run the real console script to check the process as a whole.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from migration.config import Config, ConfigError
from migration.settings import PARSERS
from migration.store import Store
from service.cli import main

NOT_PEM = Path(__file__)  # exists, but is no certificate

#: (variable, bad value, the command to run)
BAD_VARIABLES: list[tuple[str, str]] = [
    ("MIGRATOR_DATABASE_URL", ""),
    ("MIGRATOR_DATABASE_URL", "not a url"),
    ("MIGRATOR_DATABASE_URL", "mysql://db/migrator"),
    ("MIGRATOR_ETCD_ENDPOINTS", ""),
    ("MIGRATOR_ETCD_ENDPOINTS", " , "),
    ("MIGRATOR_ETCD_ENDPOINTS", "etcd-without-port"),
    ("MIGRATOR_ETCD_ENDPOINTS", "127.0.0.1:notaport"),
    ("MIGRATOR_ETCD_ENDPOINTS", "127.0.0.1:99999"),
    ("MIGRATOR_ETCD_PREFIX", "no-leading-slash"),
    ("MIGRATOR_ETCD_PREFIX", ""),
    ("MIGRATOR_ETCD_CA_CERT", "/no/such/ca.pem"),
    ("MIGRATOR_ETCD_CA_CERT", str(NOT_PEM)),
    ("MIGRATOR_ETCD_CERT", "/no/such/client.pem"),
    ("MIGRATOR_ETCD_KEY", "/no/such/client-key.pem"),
    ("MIGRATOR_ETCD_USER", "user-without-password"),
    ("MIGRATOR_ETCD_PASSWORD", "password-without-user"),
    ("MIGRATOR_BROKER_URL", ""),
    ("MIGRATOR_BROKER_URL", "http://127.0.0.1:56720/"),
    ("MIGRATOR_BROKER_URL", "amqp://"),
    ("MIGRATOR_BROKER_URL", "amqp://mq-0:5672/,http://mq-1:5672/"),
    ("MIGRATOR_BROKER_URL", "amqp://mq-0:5672/ amqp://"),
    ("MIGRATOR_BROKER_URL", " , "),
    ("MIGRATOR_QUEUE_TYPE", "mirrored"),
    ("MIGRATOR_QUEUE_TYPE", ""),
    ("MIGRATOR_REGISTRY_URL", ""),
    ("MIGRATOR_REGISTRY_URL", "ftp://registry"),
    ("MIGRATOR_LEASE_TTL", "ten"),
    ("MIGRATOR_LEASE_TTL", "1"),
    ("MIGRATOR_LEASE_TTL", "-5"),
    ("MIGRATOR_LEASE_TTL", "nan"),
    ("MIGRATOR_LEASE_TTL", "inf"),
    ("MIGRATOR_LEASE_TTL", "1e12"),
    ("MIGRATOR_LOG_LEVEL", "loud"),
    ("MIGRATOR_LOG_LEVEL", ""),
    ("MIGRATOR_QUEUE_NAME", ""),
    ("MIGRATOR_QUEUE_NAME", "spaces are not allowed"),
    ("MIGRATOR_QUEUE_NAME", "x" * 201),
]

#: The error line must name this variable (a lone half of a pair names the pair's first).
NAMED = {"MIGRATOR_ETCD_PASSWORD": "MIGRATOR_ETCD_USER"}


def clean_env(stack: dict[str, str]) -> dict[str, str]:
    """The stack's variables, with no other MIGRATOR_ variable of the caller's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIGRATOR_")}
    return {**env, **stack}


def _one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected exactly one line on stderr, got {lines!r}"
    return lines[0]


@pytest.mark.parametrize(("variable", "value"), BAD_VARIABLES)
def test_a_malformed_variable_is_refused_in_one_line(
    stack: dict[str, str], variable: str, value: str
) -> None:
    env = {**stack, variable: value}
    with pytest.raises(ConfigError) as caught:
        Config.from_env(env)
    assert caught.value.variable == NAMED.get(variable, variable)
    result = CliRunner().invoke(main, ["leases", "list"], env=env)
    assert result.exit_code == 2, result.output
    line = _one_line(result.stderr)
    assert NAMED.get(variable, variable) in line
    assert line.startswith("registry-migrator: configuration error: ")
    assert result.stdout == ""


def test_several_broker_urls_are_split_before_each_scheme(stack: dict[str, str]) -> None:
    tls = "amqps://u:p@mq-1:5671/%2F?ssl_options={'ca_certs':'/ca.crt','certfile':'/c.crt'}"
    value = f" amqp://u:p@mq-0:5672/%2F?heartbeat=30,{tls}  amqp://u:p@mq-2:5672/%2F "
    config = Config.from_env({**stack, "MIGRATOR_BROKER_URL": value})
    # The commas inside pika's ssl_options stay in their URL.
    assert config.broker_urls == (
        "amqp://u:p@mq-0:5672/%2F?heartbeat=30",
        tls,
        "amqp://u:p@mq-2:5672/%2F",
    )
    assert Config.from_env(stack).queue_type == "classic"
    quorum = Config.from_env({**stack, "MIGRATOR_QUEUE_TYPE": " Quorum "})
    assert quorum.queue_type == "quorum"


def test_the_root_prefix_is_allowed(stack: dict[str, str]) -> None:
    assert Config.from_env({**stack, "MIGRATOR_ETCD_PREFIX": "/"}).etcd_prefix == "/"


@pytest.mark.parametrize("secret", [None, ""])
def test_the_api_refuses_to_start_without_a_secret(
    stack: dict[str, str], secret: str | None
) -> None:
    env: dict[str, str | None] = {**stack, "MIGRATOR_NOTIFICATION_SECRET": secret}
    result = CliRunner().invoke(main, ["api", "--port", "1"], env=env)
    assert result.exit_code == 2, result.output
    assert "MIGRATOR_NOTIFICATION_SECRET" in _one_line(result.stderr)


@pytest.mark.parametrize(
    ("variable", "value", "command"),
    [
        ("MIGRATOR_LEASE_TTL", "inf", ["leases", "list"]),
        ("MIGRATOR_ETCD_CA_CERT", str(NOT_PEM), ["scheduler", "--health-port", "0"]),
        ("MIGRATOR_BROKER_URL", "redis://nope", ["api", "--port", "1"]),
        ("MIGRATOR_QUEUE_NAME", "a b", ["enqueue"]),
        ("MIGRATOR_QUEUE_TYPE", "lazy", ["api", "--port", "1"]),
        ("MIGRATOR_DATABASE_URL", "nope", ["settings", "show"]),
    ],
)
def test_the_console_script_exits_2_with_one_line(
    stack: dict[str, str], variable: str, value: str, command: list[str]
) -> None:
    script = Path(sys.executable).with_name("registry-migrator")
    env = {**clean_env(stack), "MIGRATOR_NOTIFICATION_SECRET": "s", variable: value}
    done = subprocess.run(
        [str(script), *command], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2, done.stderr
    assert variable in _one_line(done.stderr)
    assert "Traceback" not in done.stderr


# -- settings set ----------------------------------------------------------------------------

#: A bad value for every settable key.
BAD_SETTINGS: dict[str, list[str]] = {
    "enabled": ["maybe", ""],
    "capacity": ["-1", "ten", "1.5", "99999999999"],
    "enqueue_waiting_time": ["-1", "soon", "nan", "inf"],
    "created_before": ["yesterday", "2024-01-01T00:00:00"],
    "max_tags_count": ["-3", "many"],
    "max_retries": ["0", "x"],
    "pre_import_timeout": ["0", "-1", "forever"],
    "import_timeout": ["0", "inf"],
    "max_step_duration": ["0", "later"],
    "root_namespace_deny_list": ["Upper,case", "a b", "-dash"],
    "lease_scope": ["cluster", ""],
    "pending_enqueues": ["0", "lots"],
    "enqueue_interval": ["0", "-2"],
    "guard_interval": ["0", "often"],
    "registry_breaker_max_window": ["0", "-5", "a minute"],
    "registry_backoff_max": ["0", "nan"],
    "pre_import_timeout_per_tag": ["-0.5", "some"],
    "pre_import_timeout_max": ["0", "-1", "big"],
}


def test_every_settable_key_has_bad_values() -> None:
    assert set(BAD_SETTINGS) == set(PARSERS)


BAD_ASSIGNMENTS = [
    *[[f"{key}={value}"] for key, values in BAD_SETTINGS.items() for value in values],
    ["no_such_setting=1"],
    ["updated_at=2024-01-01T00:00:00Z"],
    ["paused_reason=whatever"],  # the system's to write; resume clears it
    ["capacity"],
    ["=5"],
    ["capacity=5", "capacity=6"],
    ["capacity=7", "max_retries=zero"],  # a good change with a bad one: neither is made
]


@pytest.mark.parametrize("assignments", BAD_ASSIGNMENTS, ids=" ".join)
def test_settings_set_refuses_a_bad_value_and_changes_nothing(
    stack: dict[str, str], database_url: str, store: Store, assignments: list[str]
) -> None:
    before = store.settings()
    env = {**stack, "MIGRATOR_DATABASE_URL": database_url}
    result = CliRunner().invoke(main, ["settings", "set", *assignments], env=env)
    assert result.exit_code == 2, result.output
    line = _one_line(result.stderr)
    key = assignments[-1].partition("=")[0].strip()
    if key:
        assert key in line
    assert store.settings() == before


def test_settings_set_accepts_good_values(
    stack: dict[str, str], database_url: str, store: Store
) -> None:
    """The counterpart: the refusals above are about the values, not the command."""
    env = {**stack, "MIGRATOR_DATABASE_URL": database_url}
    result = CliRunner().invoke(main, ["settings", "set", "capacity=7", "max_retries=2"], env=env)
    assert result.exit_code == 0, result.output
    after = store.settings()
    assert (after.capacity, after.max_retries) == (7, 2)
