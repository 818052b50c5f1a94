"""Process configuration from ``MIGRATOR_*`` environment variables.

These are the settings a process needs to reach its servers; they are read once at
start. Settings that tune the migration itself live in PostgreSQL (``migration.settings``)
and change without a restart.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from leases import EtcdClient

PREFIX = "MIGRATOR_"

#: RabbitMQ queue types ``MIGRATOR_QUEUE_TYPE`` accepts.
QUEUE_TYPES = ("classic", "quorum")
# Several broker URLs: split only where a URL starts ("amqp://", "amqps://", or any other
# scheme, then refused), so that the commas inside a URL (pika's
# ssl_options={'ca_certs':...,'certfile':...}) stay in it.
_BROKER_URL_SEPARATOR = re.compile(r"[\s,;]+(?=[A-Za-z][A-Za-z0-9+.-]*://)")


def split_broker_urls(text: str) -> tuple[str, ...]:
    """The URLs of ``MIGRATOR_BROKER_URL``: one, or several separated by commas or spaces.

    :param text: the variable's value.
    """
    return tuple(part for part in _BROKER_URL_SEPARATOR.split(text.strip()) if part)


class ConfigError(Exception):
    """A configuration value is missing or malformed.

    ``str(error)`` is one line that names the variable, fit to print before exiting with
    status 2.
    """

    def __init__(self, variable: str, problem: str) -> None:
        self.variable = variable
        self.problem = problem
        super().__init__(f"{variable}: {problem}")


def _url(env: Mapping[str, str], name: str, default: str, schemes: tuple[str, ...]) -> str:
    value = env.get(name, default).strip()
    parts = urlsplit(value)
    if parts.scheme not in schemes or not parts.netloc:
        raise ConfigError(name, f"expected a {'/'.join(schemes)} URL, got {value!r}")
    return value


def _broker_urls(env: Mapping[str, str], name: str, default: str) -> str:
    """One or several AMQP URLs (comma- or space-separated), each checked; joined by ","."""
    urls = split_broker_urls(env.get(name, default))
    if not urls:
        raise ConfigError(name, "expected an amqp or amqps URL, got ''")
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
            raise ConfigError(name, f"expected amqp/amqps URLs, got {url!r}")
    return ",".join(urls)


def _number(
    env: Mapping[str, str], name: str, default: float, minimum: float, maximum: float
) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(name, f"expected a number, got {raw!r}") from None
    if not math.isfinite(value) or not minimum <= value <= maximum:
        raise ConfigError(name, f"must be between {minimum:g} and {maximum:g}, got {raw!r}")
    return value


def _endpoints(env: Mapping[str, str], name: str, default: str) -> tuple[tuple[str, int], ...]:
    raw = env.get(name, default)
    endpoints = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        parts = urlsplit(item if "://" in item else f"http://{item}")
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname or port is None:
            raise ConfigError(name, f"expected host:port[,host:port...], got {item!r}")
        endpoints.append((parts.hostname, port))
    if not endpoints:
        raise ConfigError(name, "needs at least one host:port")
    return tuple(endpoints)


def _optional_pem(env: Mapping[str, str], name: str) -> str | None:
    """A PEM file's path (certificate or key), checked to exist and look like PEM."""
    value = env.get(name, "").strip()
    if not value:
        return None
    if not os.path.isfile(value):
        raise ConfigError(name, f"no such file: {value!r}")
    try:
        with open(value, "rb") as file:
            head = file.read(64 * 1024)
    except OSError as error:
        raise ConfigError(name, f"cannot read {value!r}: {error.strerror}") from None
    # gRPC would only fail at the first call, with an obscure TLS error (or not at all).
    if b"-----BEGIN " not in head:
        raise ConfigError(name, f"{value!r} is not a PEM file")
    return value


@dataclass(frozen=True, kw_only=True)
class Config:
    """Where the servers are and how to reach them.

    :param database_url: PostgreSQL connection URL (``MIGRATOR_DATABASE_URL``).
    :param etcd_endpoints: etcd client endpoints (``MIGRATOR_ETCD_ENDPOINTS``, comma-separated).
    :param etcd_prefix: the key prefix every lease key lives under (``MIGRATOR_ETCD_PREFIX``).
    :param broker_url: RabbitMQ AMQP URL (``MIGRATOR_BROKER_URL``); several, comma-separated,
        for the nodes of a cluster (:attr:`broker_urls`): connections go to the first
        that answers and move to another when it fails.
    :param registry_url: the registry import API base URL (``MIGRATOR_REGISTRY_URL``).
    :param registry_token: bearer token for the registry (``MIGRATOR_REGISTRY_TOKEN``).
    :param notification_secret: the shared secret the registry sends
        (``MIGRATOR_NOTIFICATION_SECRET``).
    :param lease_ttl: seconds an etcd lease lives without keep-alive (``MIGRATOR_LEASE_TTL``).
    :param registry_timeout: seconds each registry call may take, for each of connect,
        read, write (``MIGRATOR_REGISTRY_TIMEOUT``); a call past it is a registry fault.
    :param database_timeout: seconds a PostgreSQL connection may go unanswered before this
        client gives it up (``MIGRATOR_DATABASE_TIMEOUT``): the connect timeout, TCP
        keep-alives that declare a silent peer dead, and ``tcp_user_timeout`` for data
        sent but never acknowledged. Without them a process cut off from PostgreSQL
        mid-step waits for the kernel to give up (15 minutes or more) with the step held.
    :param database_statement_timeout: seconds PostgreSQL lets one statement run
        (``MIGRATOR_DATABASE_STATEMENT_TIMEOUT``, its ``statement_timeout``); 0: no limit.
    :param log_level: debug, info, warning or error (``MIGRATOR_LOG_LEVEL``).
    :param queue_name: the RabbitMQ queue of the actors (``MIGRATOR_QUEUE_NAME``); separate
        migrations (or test runs) sharing one RabbitMQ use separate queues.
    :param queue_type: ``classic`` (default) or ``quorum`` (``MIGRATOR_QUEUE_TYPE``): the type
        the queues are declared with. Quorum queues are replicated over a RabbitMQ cluster
        and survive the loss of a minority of its nodes: the production choice.
    """

    database_url: str = "postgresql://postgres@127.0.0.1:55432/migrator"
    etcd_endpoints: tuple[tuple[str, int], ...] = (("127.0.0.1", 23790),)
    etcd_prefix: str = "/registry-migrator"
    etcd_ca_cert: str | None = None
    etcd_cert_cert: str | None = None
    etcd_cert_key: str | None = None
    etcd_user: str | None = None
    etcd_password: str | None = field(default=None, repr=False)
    broker_url: str = "amqp://guest:guest@127.0.0.1:56720/%2F?heartbeat=30"
    registry_url: str = "http://127.0.0.1:5005"
    registry_token: str | None = field(default=None, repr=False)
    notification_secret: str | None = field(default=None, repr=False)
    lease_ttl: float = 10.0
    registry_timeout: float = 5.0
    database_timeout: float = 10.0
    database_statement_timeout: float = 0.0
    log_level: str = "info"
    queue_name: str = "registry_migrator"
    queue_type: str = "classic"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        """Read the configuration; raise :class:`ConfigError` naming the first bad variable."""
        env = os.environ if env is None else env
        d = cls()
        raw_prefix = env.get(f"{PREFIX}ETCD_PREFIX", d.etcd_prefix).strip()
        if not raw_prefix.startswith("/"):
            raise ConfigError(f"{PREFIX}ETCD_PREFIX", f"must start with '/', got {raw_prefix!r}")
        prefix = raw_prefix.rstrip("/")  # "/" itself: every key at the root
        level = env.get(f"{PREFIX}LOG_LEVEL", d.log_level).strip().lower()
        if level not in {"debug", "info", "warning", "error"}:
            raise ConfigError(
                f"{PREFIX}LOG_LEVEL", f"expected debug|info|warning|error, got {level!r}"
            )
        cert = _optional_pem(env, f"{PREFIX}ETCD_CERT")
        key = _optional_pem(env, f"{PREFIX}ETCD_KEY")
        if (cert is None) != (key is None):
            raise ConfigError(
                f"{PREFIX}ETCD_CERT", "MIGRATOR_ETCD_CERT and MIGRATOR_ETCD_KEY go together"
            )
        user = env.get(f"{PREFIX}ETCD_USER") or None
        password = env.get(f"{PREFIX}ETCD_PASSWORD") or None
        if (user is None) != (password is None):
            raise ConfigError(
                f"{PREFIX}ETCD_USER", "MIGRATOR_ETCD_USER and MIGRATOR_ETCD_PASSWORD go together"
            )
        secret = env.get(f"{PREFIX}NOTIFICATION_SECRET") or None
        queue = env.get(f"{PREFIX}QUEUE_NAME", d.queue_name).strip()
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,200}", queue):
            raise ConfigError(f"{PREFIX}QUEUE_NAME", f"expected [A-Za-z0-9_.-]+, got {queue!r}")
        queue_type = env.get(f"{PREFIX}QUEUE_TYPE", d.queue_type).strip().lower()
        if queue_type not in QUEUE_TYPES:
            raise ConfigError(
                f"{PREFIX}QUEUE_TYPE", f"expected {'|'.join(QUEUE_TYPES)}, got {queue_type!r}"
            )
        return cls(
            database_url=_url(
                env, f"{PREFIX}DATABASE_URL", d.database_url, ("postgresql", "postgres")
            ),
            etcd_endpoints=_endpoints(env, f"{PREFIX}ETCD_ENDPOINTS", d.etcd_endpoints_text),
            etcd_prefix=prefix or "/",
            etcd_ca_cert=_optional_pem(env, f"{PREFIX}ETCD_CA_CERT"),
            etcd_cert_cert=cert,
            etcd_cert_key=key,
            etcd_user=user,
            etcd_password=password,
            broker_url=_broker_urls(env, f"{PREFIX}BROKER_URL", d.broker_url),
            registry_url=_url(env, f"{PREFIX}REGISTRY_URL", d.registry_url, ("http", "https")),
            registry_token=env.get(f"{PREFIX}REGISTRY_TOKEN") or None,
            notification_secret=secret,
            # etcd grants whole seconds; an hour-long TTL would already defeat fast recovery.
            lease_ttl=_number(env, f"{PREFIX}LEASE_TTL", d.lease_ttl, minimum=2, maximum=3600),
            registry_timeout=_number(
                env, f"{PREFIX}REGISTRY_TIMEOUT", d.registry_timeout, minimum=0.1, maximum=300
            ),
            database_timeout=_number(
                env, f"{PREFIX}DATABASE_TIMEOUT", d.database_timeout, minimum=2, maximum=3600
            ),
            database_statement_timeout=_number(
                env,
                f"{PREFIX}DATABASE_STATEMENT_TIMEOUT",
                d.database_statement_timeout,
                minimum=0,
                maximum=86400,
            ),
            log_level=level,
            queue_name=queue,
            queue_type=queue_type,
        )

    def database_options(self) -> dict[str, str | int]:
        """libpq connection options bounding how long a connection may go unanswered
        (:attr:`database_timeout`) and a statement may run (:attr:`database_statement_timeout`),
        for ``psycopg.connect(**options)`` or a pool's ``kwargs``.

        A dead peer is noticed within about the timeout whatever the connection is doing:
        connecting (``connect_timeout``, whole seconds), waiting for an answer to a query
        the server received (keep-alives: idle, then ``count`` probes ``interval`` apart),
        or sending what is never acknowledged (``tcp_user_timeout``, milliseconds).
        """
        timeout = self.database_timeout
        idle = max(1, int(timeout / 2))
        interval = max(1, int((timeout - idle) / 3))
        options: dict[str, str | int] = {
            "connect_timeout": max(2, math.ceil(timeout)),
            "keepalives": 1,
            "keepalives_idle": idle,
            "keepalives_interval": interval,
            "keepalives_count": 3,
            "tcp_user_timeout": int(timeout * 1000),
        }
        if self.database_statement_timeout:
            milliseconds = max(1, int(self.database_statement_timeout * 1000))
            options["options"] = f"-c statement_timeout={milliseconds}"
        return options

    def require_notification_secret(self) -> str:
        """The notification secret, or :class:`ConfigError` when it is not set."""
        if not self.notification_secret:
            raise ConfigError(f"{PREFIX}NOTIFICATION_SECRET", "is required (the registry sends it)")
        return self.notification_secret

    @property
    def broker_urls(self) -> tuple[str, ...]:
        """The RabbitMQ node URLs of ``broker_url``, in the configured order."""
        return split_broker_urls(self.broker_url)

    @property
    def etcd_endpoints_text(self) -> str:
        return ",".join(f"{host}:{port}" for host, port in self.etcd_endpoints)

    def etcd_client(self, *, timeout: float = 5.0) -> EtcdClient:
        """An etcd client for the configured endpoints, TLS and credentials."""
        # Imported here: reading the configuration (every command, every ``--help``) must
        # not load etcd3 and gRPC.
        from leases import EtcdClient  # noqa: PLC0415

        return EtcdClient(
            self.etcd_endpoints,
            timeout=timeout,
            ca_cert=self.etcd_ca_cert,
            cert_cert=self.etcd_cert_cert,
            cert_key=self.etcd_cert_key,
            user=self.etcd_user,
            password=self.etcd_password,
        )
