"""Client-side bounds of PostgreSQL connections (``MIGRATOR_DATABASE_TIMEOUT``,
``MIGRATOR_DATABASE_STATEMENT_TIMEOUT``): read from the environment, and set on the real
connections of a :class:`~migration.store.Store`."""

from __future__ import annotations

import socket

import pytest

from migration.config import Config, ConfigError
from migration.store import Store
from tests.fixtures import database_url

__all__ = ["database_url"]


def test_the_defaults_bound_a_silent_server_to_about_ten_seconds() -> None:
    options = Config.from_env({}).database_options()
    assert options == {
        "connect_timeout": 10,
        "keepalives": 1,
        "keepalives_idle": 5,
        "keepalives_interval": 1,
        "keepalives_count": 3,
        "tcp_user_timeout": 10000,
    }


def test_a_shorter_timeout_and_a_statement_timeout() -> None:
    config = Config.from_env(
        {"MIGRATOR_DATABASE_TIMEOUT": "3", "MIGRATOR_DATABASE_STATEMENT_TIMEOUT": "1.5"}
    )
    options = config.database_options()
    assert options["tcp_user_timeout"] == 3000
    assert options["connect_timeout"] == 3
    # Idle, then three probes: declared dead within the timeout, give or take a second.
    idle, interval = int(options["keepalives_idle"]), int(options["keepalives_interval"])
    assert idle + 3 * interval <= 4
    assert options["options"] == "-c statement_timeout=1500"


@pytest.mark.parametrize("value", ["1", "abc", "-3", "nan"])
def test_a_bad_timeout_names_the_variable(value: str) -> None:
    with pytest.raises(ConfigError, match="MIGRATOR_DATABASE_TIMEOUT"):
        Config.from_env({"MIGRATOR_DATABASE_TIMEOUT": value})


def test_the_store_s_connections_carry_them(database_url: str) -> None:
    config = Config.from_env(
        {"MIGRATOR_DATABASE_TIMEOUT": "4", "MIGRATOR_DATABASE_STATEMENT_TIMEOUT": "2"}
    )
    store = Store(database_url, max_size=1, connect_options=config.database_options())
    with store, store._connection() as conn:
        assert conn.execute("SHOW statement_timeout").fetchone() == ("2s",)
        sock = socket.socket(fileno=conn.fileno())
        try:
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 4000
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 2
        finally:
            sock.detach()  # the connection's descriptor, not ours to close
