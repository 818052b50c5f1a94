"""A registry simulator: serves the registry import API over real HTTP.

Demo, tests and benchmarks need a registry that imports repositories, takes time, fails,
refuses when busy and notifies when an import ends. This module is that registry, in one
asyncio event loop (Starlette on uvicorn):

- ``PUT /gitlab/v1/import/<path>/?import_type=pre|final[&tags=N]`` starts a phase; it runs
  for a random time (uniform between the configured bounds, scaled by ``tags`` over
  ``default_tags``) and ends complete or failed; then a notification is sent.
- ``GET /gitlab/v1/import/<path>/`` answers ``{name, path, status, detail}``.
- ``DELETE /gitlab/v1/import/<path>/`` cancels a running phase (a ``*_canceled``
  notification follows).

Paths decide some answers, by substring: ``native`` → 200 (already imported), ``missing`` →
404, ``fail-once`` / ``fail-always`` → the first / every pre-import fails,
``fail-import-once`` / ``fail-import-always`` → the same for the final import,
``server-error`` → 500 on every call, ``garbage`` → answers that are not the API's,
``unknown-status`` → a status read answers 200 with a status outside the API's list.

- ``GET /gitlab/v1/`` is the registry's own compliance check: 200 when it serves the API,
  401 with a wrong token, 404 when its metadata database is off (``metadata_database``).

A fleet-wide fault switch (knobs ``fault``, ``fault_calls``, ``fault_seconds``) answers every
call, or only calls of some kinds (``start``, ``status``, ``cancel``, ``probe``), for a while:
``status:CODE`` (401, 403 or any 5xx), ``slow:SECONDS`` (the call acts at once, its answer
comes that much later: a client that timed out does not know what happened), ``garbage``
(200 with an HTML body), ``reset`` (the connection is closed after the headers, mid-answer).
Only ``slow`` lets the call act; the others refuse it before it reaches the registry, as a
proxy in front of it would. A registry that is *down* is its process stopped: with
``--state-file`` the state survives a stop and start (imports go on where they were,
undelivered notifications are sent again), so an outage is not a wipe.

Test hooks (no token needed): ``GET /simulator/report``, ``GET|POST /simulator/config``
(change knobs at runtime), ``POST /simulator/reset``.

The report is what benchmarks check: the most imports ever running at once, the starts that
came while the repository already had a running phase (refused with 409/425 — "double start
attempted"; or, with the guard switched off, accepted — an "overlap", which a correct
migrator never causes; ``overlapping_imports`` counts them), starts per repository,
notifications sent/refused/failed/pending, the counts of each outcome and the answers the
fault switch gave (``faulted_answers``, ``fault``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
import json
import logging
import math
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import h11
import httpx
import structlog
import tenacity
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from migration import retrying
from migration.registry import (
    ImportType,
    InvalidRepositoryPath,
    RegistryImportStatus,
    quote_repository_path,
)
from service.sockets import inherited_listener

log = structlog.get_logger(__name__)

# httpcore's async pool runs ``import sniffio`` on every request (the notifier's); sniffio is
# not installed here, and a failed import is not remembered, so each request searched
# sys.path again: 12-14 % of the simulator's CPU in bench/pipeline.py. A None entry makes
# the import fail at once, with the same outcome (httpcore and anyio then assume asyncio).
if importlib.util.find_spec("sniffio") is None:
    sys.modules.setdefault("sniffio", None)  # type: ignore[arg-type]

NATIVE_MARKER = "native"
MISSING_MARKER = "missing"
FAIL_ONCE_MARKER = "fail-once"
FAIL_ALWAYS_MARKER = "fail-always"
FAIL_IMPORT_ONCE_MARKER = "fail-import-once"
FAIL_IMPORT_ALWAYS_MARKER = "fail-import-always"
SERVER_ERROR_MARKER = "server-error"
GARBAGE_MARKER = "garbage"
UNKNOWN_STATUS_MARKER = "unknown-status"
SLOW_START_MARKER = "slow-start"
SLOW_DECIDE_MARKER = "slow-decide"

#: The kinds of call the fault switch can be limited to (``fault_calls``).
CALL_KINDS = ("start", "status", "cancel", "probe")
#: Config knobs that belong to the fault switch (not kept across a restart).
FAULT_KNOBS = ("fault", "fault_calls", "fault_seconds")


@dataclass(frozen=True)
class Fault:
    """A parsed ``fault`` knob: how every affected call is answered.

    :param mode: ``status``, ``slow``, ``garbage`` or ``reset``.
    :param code: the HTTP status of a ``status`` fault.
    :param seconds: the delay of a ``slow`` fault.
    """

    mode: str
    code: int = 0
    seconds: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Fault:
        """``status:503``, ``status:401``, ``status:403``, ``slow:SECONDS``, ``garbage``,
        ``reset``.

        :raises ValueError: for anything else, saying what is accepted.
        """
        mode, _, argument = text.partition(":")
        if mode in ("garbage", "reset") and not argument:
            return cls(mode)
        if mode == "status" and argument.isdigit():
            code = int(argument)
            if code in (401, 403) or 500 <= code <= 599:
                return cls(mode, code=code)
        if mode == "slow":
            with contextlib.suppress(ValueError):
                seconds = float(argument)
                if 0 < seconds < math.inf:
                    return cls(mode, seconds=seconds)
        raise ValueError(
            f"fault must be status:CODE (401, 403 or 5xx), slow:SECONDS, garbage or reset,"
            f" got {text!r}"
        )


def parse_fault_calls(text: str) -> frozenset[str]:
    """``all`` or a comma-separated list of :data:`CALL_KINDS`.

    :raises ValueError: naming the unknown kind.
    """
    kinds = {kind.strip() for kind in text.split(",") if kind.strip()}
    if kinds == {"all"}:
        return frozenset(CALL_KINDS)
    unknown = sorted(kinds - set(CALL_KINDS))
    if unknown or not kinds:
        raise ValueError(
            f"fault_calls must be 'all' or a comma-separated list of {', '.join(CALL_KINDS)},"
            f" got {text!r}"
        )
    return frozenset(kinds)


@dataclass(frozen=True, kw_only=True)
class SimulatorConfig:
    """The knobs of the simulator.

    :param pre_import_seconds: (min, max) seconds a pre-import takes for ``default_tags`` tags.
    :param import_seconds: (min, max) seconds a final import takes for ``default_tags`` tags.
    :param default_tags: tags assumed when a start call passes no ``tags`` query parameter;
        durations scale by ``tags / default_tags``.
    :param pre_import_failure_rate: probability (0..1) that a pre-import ends failed.
    :param import_failure_rate: probability (0..1) that a final import ends failed.
    :param start_error_rate: probability (0..1) that a start call is answered 503.
    :param max_concurrent_imports: phases (pre + final) running at once before 429; 0 = no limit.
    :param start_latency_seconds: how long a start call waits before it is answered (the
        decision is taken after the wait; a client that timed out may still have started it).
    :param slow_start_seconds: for paths containing ``slow-start``: the start is decided (and
        an accepted import begins) at once, and the answer is sent this much later; for
        paths containing ``slow-decide``: the wait comes first, and nothing starts when the
        caller has gone by then (answered 499). For benchmarks that kill a caller mid-call.
    :param guard_double_start: answer 425/409 to a start while a phase runs for the path;
        False accepts it (an overlap, flagged in the report and counted in
        ``overlapping_imports``) — what a migrator must never cause, even without the guard.
    :param metadata_database: False: the compliance check ``GET /gitlab/v1/`` answers 404,
        as a registry whose metadata database is disabled does.
    :param fault: the fault switch; None = off. ``status:CODE`` (401, 403, 5xx),
        ``slow:SECONDS``, ``garbage`` or ``reset`` (see the module's docstring).
    :param fault_calls: the calls the fault hits: ``all`` or a comma-separated list of
        ``start``, ``status``, ``cancel``, ``probe`` (``GET /gitlab/v1/``).
    :param fault_seconds: the fault ends by itself this long after it was set; 0 = until
        cleared (``fault: null``). Setting ``fault`` or ``fault_seconds`` restarts the clock.
    :param token: the bearer token required on import calls; None = no authentication.
    :param notify_url: base URL of the notification API; None = send no notifications.
    :param secret: the ``Authorization`` header value of notifications.
    :param notify_timeout: seconds per notification request.
    :param notify_backoff: first wait between notification attempts; doubles, with jitter.
    :param notify_backoff_max: the longest wait between notification attempts.
    :param notify_max_attempts: attempts for a notification answered 5xx/429 or unreachable.
    :param notify_refused_attempts: attempts for a notification answered another 4xx.
    :param seed: seed of the random source (durations, failures), for repeatable runs.
    """

    pre_import_seconds: tuple[float, float] = (0.05, 0.2)
    import_seconds: tuple[float, float] = (0.05, 0.2)
    default_tags: int = 10
    pre_import_failure_rate: float = 0.0
    import_failure_rate: float = 0.0
    start_error_rate: float = 0.0
    max_concurrent_imports: int = 0
    start_latency_seconds: float = 0.0
    slow_start_seconds: float = 0.0
    guard_double_start: bool = True
    metadata_database: bool = True
    fault: str | None = None
    fault_calls: str = "all"
    fault_seconds: float = 0.0
    token: str | None = None
    notify_url: str | None = None
    secret: str | None = None
    notify_timeout: float = 5.0
    notify_backoff: float = 0.1
    notify_backoff_max: float = 5.0
    notify_max_attempts: int = 50
    notify_refused_attempts: int = 3
    seed: int | None = None

    def __post_init__(self) -> None:
        problems = []
        for name in ("pre_import_seconds", "import_seconds"):
            low, high = getattr(self, name)
            if not (0 <= low <= high) or not math.isfinite(high):
                problems.append(
                    f"{name} must be [min, max] with 0 <= min <= max, got {[low, high]}"
                )
        for name in ("pre_import_failure_rate", "import_failure_rate", "start_error_rate"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"{name} must be between 0 and 1")
        for name in (
            "start_latency_seconds",
            "slow_start_seconds",
            "fault_seconds",
            "notify_backoff",
            "notify_backoff_max",
        ):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative")
        if self.notify_timeout <= 0:
            problems.append("notify_timeout must be positive")
        if self.default_tags < 1:
            problems.append("default_tags must be at least 1")
        if self.max_concurrent_imports < 0:
            problems.append("max_concurrent_imports must not be negative (0 = no limit)")
        if self.notify_max_attempts < 1 or self.notify_refused_attempts < 1:
            problems.append("notify_max_attempts and notify_refused_attempts must be at least 1")
        checks: list[tuple[Callable[[str], object], str | None]] = [
            (Fault.parse, self.fault),
            (parse_fault_calls, self.fault_calls or ""),
        ]
        for check, value in checks:
            if value is not None:
                try:
                    check(value)
                except ValueError as error:
                    problems.append(str(error))
        if self.notify_url is not None and not self.notify_url.startswith(("http://", "https://")):
            problems.append(f"notify_url must be an http(s) URL, got {self.notify_url!r}")
        if problems:
            raise ValueError("; ".join(problems))

    def with_changes(self, changes: Mapping[str, Any]) -> SimulatorConfig:
        """A copy with ``changes`` applied (JSON values: lists for the (min, max) pairs).

        :raises ValueError: for an unknown knob or a bad value, naming it.
        """
        known = {f.name: f for f in dataclasses.fields(self)}
        values: dict[str, Any] = {}
        for name, value in changes.items():
            if name not in known:
                raise ValueError(f"unknown simulator setting {name!r}")
            values[name] = _coerce(name, value, getattr(self, name), known[name].default)
        return dataclasses.replace(self, **values)

    def as_dict(self) -> dict[str, Any]:
        """The knobs as JSON-able values."""
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }


def _coerce(name: str, value: Any, current: Any, default: Any) -> Any:
    """Check one JSON value against the type of the knob it sets."""
    if isinstance(current, tuple):
        if (
            not isinstance(value, list | tuple)
            or len(value) != 2
            or not all(_is_number(v) for v in value)
        ):
            raise ValueError(f"{name} must be [min, max] seconds, got {value!r}")
        return (float(value[0]), float(value[1]))
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value
    if isinstance(current, int) and name != "seed":
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return value
    if isinstance(current, float):
        if not _is_number(value):
            raise ValueError(f"{name} must be a number, got {value!r}")
        return float(value)
    # str | None and int | None knobs
    if value is None or (name == "seed" and isinstance(value, int) and not isinstance(value, bool)):
        return value
    if name != "seed" and isinstance(value, str):
        return value or None
    raise ValueError(f"{name} has a bad value {value!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# -- the simulated registry -------------------------------------------------------------------


@dataclass(eq=False)
class _Run:
    """One running phase (a pre-import or a final import) of one repository."""

    run_id: int
    path: str
    phase: ImportType
    started_at: float
    duration: float
    cancel_requested: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


@dataclass
class _Repository:
    path: str
    status: RegistryImportStatus | None = None
    detail: str = ""
    runs: list[_Run] = field(default_factory=list)
    pre_import_starts: int = 0
    import_starts: int = 0


@dataclass(frozen=True)
class Answer:
    """What the registry answers: an HTTP status and a JSON body."""

    status_code: int
    body: dict[str, Any]


def _name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def _in_progress(phase: ImportType) -> RegistryImportStatus:
    if phase is ImportType.PRE:
        return RegistryImportStatus.PRE_IMPORT_IN_PROGRESS
    return RegistryImportStatus.IMPORT_IN_PROGRESS


def _ended(phase: ImportType, how: str) -> RegistryImportStatus:
    prefix = "pre_import" if phase is ImportType.PRE else "import"
    return RegistryImportStatus(f"{prefix}_{how}")


def _sent(code: int | None) -> bool:
    return code is not None and 200 <= code < 300


def _refused(code: int | None) -> bool:
    """A 4xx other than 429: the notification API refuses this notification as it is."""
    return code is not None and 400 <= code < 500 and code != 429


#: Notification requests in flight at once (the others wait their turn, outside their timeout).
NOTIFY_CONCURRENCY = 16


class NotifyError(Exception):
    """A notification request that got no HTTP answer; ``kind`` names it as httpx would
    (``ConnectError``, ``ReadTimeout``, ``ReadError``, ``RemoteProtocolError``)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


class _Connection:
    """A kept-alive connection of :class:`NotifyClient`: the stream and its HTTP state."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.protocol = h11.Connection(our_role=h11.CLIENT)

    def close(self) -> None:
        self.writer.close()


class NotifyClient:
    """A small client for the notifications: PUT a JSON body, read the status.

    httpx's AsyncClient cost ~3 ms of the simulator's CPU per notification here (anyio
    streams, a pool that polls every idle connection on each request): more than half of
    the simulator's CPU in bench/pipeline.py. This one speaks HTTP/1.1 with h11 (the
    protocol library httpx itself uses) over plain asyncio streams; connections are kept
    alive and reused (at most ``keep`` idle ones) when h11 says the exchange left them
    reusable.

    :param url: the notification API's base URL (http or https).
    :param keep: the most idle connections kept.
    """

    def __init__(self, url: str, *, keep: int) -> None:
        parts = urllib.parse.urlsplit(url)
        self._tls = parts.scheme == "https"
        self._host = parts.hostname or "localhost"
        self._port = parts.port or (443 if self._tls else 80)
        self._authority = parts.netloc.rsplit("@", 1)[-1]
        self._keep = keep
        self._idle: list[_Connection] = []

    async def put_json(
        self, target: str, body: dict[str, Any], headers: Mapping[str, str], *, timeout: float
    ) -> int:
        """PUT ``body`` as JSON to ``target`` (the path); the answer's status code.

        :raises NotifyError: no answer within ``timeout`` seconds, or none at all.
        """
        payload = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        request = h11.Request(
            method="PUT",
            target=target,
            headers=[
                ("Host", self._authority),
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(payload))),
                ("Accept", "*/*"),
                *headers.items(),
            ],
        )
        connection = None
        try:
            async with asyncio.timeout(timeout):
                connection = await self._connection()
                protocol = connection.protocol
                connection.writer.write(
                    protocol.send(request)
                    + protocol.send(h11.Data(data=payload))
                    + protocol.send(h11.EndOfMessage())
                )
                await connection.writer.drain()
                code = await _read_answer(connection)
        except TimeoutError:
            self._discard(connection)
            raise NotifyError("ReadTimeout", f"no answer within {timeout:g} s") from None
        except NotifyError:
            self._discard(connection)
            raise
        except h11.ProtocolError as error:
            self._discard(connection)
            raise NotifyError("RemoteProtocolError", str(error)) from None
        except OSError as error:
            self._discard(connection)
            kind = "ReadError" if connection is not None else "ConnectError"
            raise NotifyError(kind, str(error) or type(error).__name__) from None
        except BaseException:  # cancelled: the connection is in an unknown state
            self._discard(connection)
            raise
        protocol = connection.protocol
        if (
            protocol.our_state is h11.DONE
            and protocol.their_state is h11.DONE
            and len(self._idle) < self._keep
        ):
            protocol.start_next_cycle()
            self._idle.append(connection)
        else:
            self._discard(connection)
        return code

    async def _connection(self) -> _Connection:
        while self._idle:
            connection = self._idle.pop()
            if not connection.reader.at_eof() and not connection.writer.is_closing():
                return connection
            connection.close()  # the server closed it while it was idle
        try:
            reader, writer = await asyncio.open_connection(
                self._host, self._port, ssl=ssl.create_default_context() if self._tls else None
            )
        except OSError as error:
            raise NotifyError("ConnectError", str(error) or type(error).__name__) from None
        return _Connection(reader, writer)

    def _discard(self, connection: _Connection | None) -> None:
        if connection is not None:
            connection.close()

    async def aclose(self) -> None:
        """Close the idle connections."""
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()


async def _read_answer(connection: _Connection) -> int:
    """Read one answer (h11 parses it, body and all); its status code."""
    protocol = connection.protocol
    code: int | None = None
    while True:
        event = protocol.next_event()
        if event is h11.NEED_DATA:
            protocol.receive_data(await connection.reader.read(65536))  # b"": the close
        elif isinstance(event, h11.Response):
            code = event.status_code
        elif isinstance(event, h11.EndOfMessage):
            assert code is not None  # h11 sends a Response before the end of its body
            return code
        elif isinstance(event, h11.ConnectionClosed):
            raise NotifyError("RemoteProtocolError", "the server closed without an answer")


class Notifier:
    """Delivers end-of-import notifications to the notification API, with retries.

    Each notification is its own task: 2xx counts as sent; 5xx, 429 and network errors are
    retried with backoff up to ``notify_max_attempts``, other 4xx up to
    ``notify_refused_attempts`` (then counted refused).
    """

    def __init__(self, config_of: Callable[[], SimulatorConfig]) -> None:
        self._config_of = config_of
        self._client: NotifyClient | None = None
        self._sending: asyncio.Semaphore | None = None
        self._tasks: dict[asyncio.Task[None], tuple[str, str, str]] = {}
        self.counts: Counter[str] = Counter()
        self.deliveries: list[dict[str, Any]] = []

    def send(self, *, path: str, status: RegistryImportStatus, detail: str) -> None:
        """Schedule a notification that ``path`` reached ``status`` (no-op without a URL)."""
        config = self._config_of()
        if not config.notify_url:
            self.counts["skipped_no_url"] += 1
            return
        task = asyncio.create_task(self._deliver(config, path, status, detail))
        self._tasks[task] = (path, str(status), detail)
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)

    @property
    def pending(self) -> int:
        """Notifications not yet delivered nor given up."""
        return len(self._tasks)

    async def _deliver(
        self, config: SimulatorConfig, path: str, status: RegistryImportStatus, detail: str
    ) -> None:
        assert config.notify_url is not None
        target = (
            f"{urllib.parse.urlsplit(config.notify_url).path.rstrip('/')}"
            f"/notifications/registry/repositories/{quote_repository_path(path)}/status"
        )
        body = {"name": _name(path), "path": path, "status": str(status), "detail": detail}
        headers = {"Authorization": config.secret} if config.secret else {}
        if self._client is None or self._sending is None:
            # At most NOTIFY_CONCURRENCY requests in flight, on as many kept-alive
            # connections, not one request per pending notification (hundreds when the
            # imports take no time).
            self._client = NotifyClient(config.notify_url, keep=NOTIFY_CONCURRENCY)
            self._sending = asyncio.Semaphore(NOTIFY_CONCURRENCY)
        client, sending = self._client, self._sending
        last = ""
        attempts = refusals = 0

        async def attempt() -> int | None:
            nonlocal last, attempts, refusals
            attempts += 1
            self.counts["attempts"] += 1
            try:
                async with sending:  # the wait is no part of the request's timeout
                    code = await client.put_json(
                        target, body, headers, timeout=config.notify_timeout
                    )
            except NotifyError as error:
                last = f"{error.kind}: {error}"
                log.info("simulator_notification_attempt_failed", path=path,
                         status=str(status), attempt=attempts, answer=error.kind)  # fmt: skip
                return None
            last = str(code)
            if _refused(code):
                refusals += 1
            if not _sent(code):
                # One line per attempt the API did not take (none when all goes well): what
                # the registry saw during an outage, attempt by attempt.
                log.info("simulator_notification_attempt_failed", path=path,
                         status=str(status), attempt=attempts, answer=str(code))  # fmt: skip
            return code

        def out_of_attempts(state: tenacity.RetryCallState) -> bool:
            # Two budgets: refusals (4xx but 429) have theirs, everything else has its own.
            assert state.outcome is not None
            if _refused(state.outcome.result()):
                return refusals >= config.notify_refused_attempts
            return state.attempt_number >= config.notify_max_attempts

        policy = retrying.async_policy(
            initial=config.notify_backoff,
            maximum=config.notify_backoff_max,
            retry=tenacity.retry_if_result(lambda code: not _sent(code)),
            stop=out_of_attempts,
        )
        code: int | None = await policy(attempt)
        outcome = "sent" if _sent(code) else "refused" if _refused(code) else "failed"
        self.counts[outcome] += 1
        self.deliveries.append(
            {"path": path, "status": str(status), "outcome": outcome, "attempts": attempts,
             "last_answer": last, "at": time.time()}
        )  # fmt: skip
        logger = log.info if outcome == "sent" else log.warning
        logger("simulator_notification", path=path, status=str(status), outcome=outcome,
               attempts=attempts, last_answer=last)  # fmt: skip

    async def reset(self) -> None:
        """Drop pending deliveries, forget counts and deliveries."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.counts.clear()
        self.deliveries.clear()

    async def close(self, *, grace: float) -> list[tuple[str, str, str]]:
        """Wait up to ``grace`` seconds for pending deliveries, cancel the rest, close.

        :returns: the notifications given up on, ``(path, status, detail)`` each.
        """
        undelivered = []
        if self._tasks:
            _done, still = await asyncio.wait(set(self._tasks), timeout=grace)
            undelivered = [self._tasks[task] for task in still if task in self._tasks]
            for task in still:
                task.cancel()
            if still:
                await asyncio.gather(*still, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        self._sending = None
        return undelivered


class SimulatedRegistry:
    """The registry's import behaviour and the record of everything asked of it.

    All methods run on one event loop; nothing here is thread-safe, nor needs to be.

    :param config: the initial knobs; :meth:`configure` changes them at runtime.
    """

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self.config = config or SimulatorConfig()
        self._random = random.Random(self.config.seed)
        self.notifier = Notifier(lambda: self.config)
        self._fault_set_at = time.time()
        self._fault_cleared_at: float | None = None
        self._clear()

    def _clear(self) -> None:
        self._repositories: dict[str, _Repository] = {}
        self._running = 0
        self._max_running = 0
        self._next_run_id = 1
        self._events: list[dict[str, Any]] = []
        self._double_start_attempts: list[dict[str, Any]] = []
        self._overlaps: list[dict[str, Any]] = []
        self._outcomes: Counter[str] = Counter()
        self._answers: Counter[str] = Counter()
        self._faulted: Counter[str] = Counter()

    def configure(self, changes: Mapping[str, Any]) -> SimulatorConfig:
        """Apply knob changes; raise ValueError (naming the knob) when one is bad."""
        was_active = self.fault_active()
        self.config = self.config.with_changes(changes)
        if "seed" in changes:
            self._random.seed(self.config.seed)
        if "fault" in changes or "fault_seconds" in changes:
            # The fault's clock starts when it is set.
            self._fault_set_at = time.time()
            self._fault_cleared_at = None
            if was_active and self.config.fault is None:
                self._fault_cleared_at = self._fault_set_at
        log.info("simulator_configured", changes=sorted(changes), fault=self.config.fault)
        return self.config

    # -- the fault switch --------------------------------------------------------------------

    def _fault_ends_at(self) -> float | None:
        """When the fault ends by itself (wall time); None: until cleared, or no fault."""
        if self.config.fault is None or not self.config.fault_seconds:
            return None
        return self._fault_set_at + self.config.fault_seconds

    def fault_active(self) -> bool:
        """True while the fault switch answers the calls it covers."""
        if self.config.fault is None:
            return False
        ends_at = self._fault_ends_at()
        return ends_at is None or time.time() < ends_at

    def fault_for(self, kind: str) -> Fault | None:
        """The fault that answers a call of ``kind`` now (one of :data:`CALL_KINDS`), if any;
        counted in the report's ``faulted_answers``."""
        if not self.fault_active() or kind not in parse_fault_calls(self.config.fault_calls):
            return None
        assert self.config.fault is not None
        self._faulted[f"{kind} {self.config.fault}"] += 1
        return Fault.parse(self.config.fault)

    def fault_state(self) -> dict[str, Any]:
        """The fault switch as the report shows it (times are Unix seconds)."""
        ends_at = self._fault_ends_at()
        if self.config.fault is None:
            ended_at = self._fault_cleared_at
        else:
            ended_at = ends_at if ends_at is not None and time.time() >= ends_at else None
        return {
            "fault": self.config.fault,
            "calls": sorted(parse_fault_calls(self.config.fault_calls)),
            "active": self.fault_active(),
            "set_at": self._fault_set_at,
            "ends_at": ends_at,
            "ended_at": ended_at,
        }

    async def reset(self) -> None:
        """Stop every running phase without notifying, forget all state and the report."""
        await self._stop_runs()
        self._clear()
        await self.notifier.reset()

    async def close(self, *, grace: float = 1.0, state_file: str | None = None) -> None:
        """Stop running phases; give pending notifications ``grace`` seconds.

        :param state_file: save the state there first (see :meth:`restore`), with the
            notifications still undelivered after the grace.
        """
        state = self._snapshot() if state_file else None
        await self._stop_runs()
        undelivered = await self.notifier.close(grace=grace)
        if state_file and state is not None:
            state["undelivered"] = [list(note) for note in undelivered]
            state["notifier_counts"] = dict(self.notifier.counts)
            state["deliveries"] = list(self.notifier.deliveries)
            with open(state_file + ".tmp", "w") as out:
                json.dump(state, out)
            os.replace(state_file + ".tmp", state_file)
            log.info("simulator_state_saved", state_file=state_file,
                     repositories=len(state["repositories"]), running=self._running_in(state),
                     undelivered=len(undelivered))  # fmt: skip

    def _snapshot(self) -> dict[str, Any]:
        """Everything a restart needs to go on: repositories, running phases, the report."""
        now = time.time()
        repositories = {
            path: {
                "status": str(repo.status) if repo.status else None,
                "detail": repo.detail,
                "pre_import_starts": repo.pre_import_starts,
                "import_starts": repo.import_starts,
                "runs": [
                    {
                        "phase": str(run.phase),
                        "remaining": max(0.0, run.started_at + run.duration - now),
                        "cancel_requested": run.cancel_requested.is_set(),
                    }
                    for run in repo.runs
                ],
            }
            for path, repo in self._repositories.items()
        }
        return {
            "version": 1,
            "saved_at": now,
            # What was set at start and changed since, but no fault: a restart ends it.
            "config": {k: v for k, v in self.config.as_dict().items() if k not in FAULT_KNOBS},
            "repositories": repositories,
            "next_run_id": self._next_run_id,
            "max_running": self._max_running,
            "events": self._events,
            "double_start_attempts": self._double_start_attempts,
            "overlaps": self._overlaps,
            "outcomes": dict(self._outcomes),
            "answers": dict(self._answers),
            "faulted": dict(self._faulted),
        }

    @staticmethod
    def _running_in(state: Mapping[str, Any]) -> int:
        return sum(len(repo["runs"]) for repo in state["repositories"].values())

    def restore(self, state: Mapping[str, Any]) -> None:
        """Go on from a state saved by :meth:`close` (call on the event loop, at start).

        Running phases resume with the time they had left; notifications undelivered when
        the registry stopped are sent again.

        :param state: what :func:`load_state` read.
        """
        self.config = self.config.with_changes(state["config"])
        self._random.seed(self.config.seed)
        self._clear()
        for path, saved in state["repositories"].items():
            repository = self._repository(path)
            status = saved["status"]
            repository.status = RegistryImportStatus(status) if status else None
            repository.detail = saved["detail"]
            repository.pre_import_starts = saved["pre_import_starts"]
            repository.import_starts = saved["import_starts"]
            for saved_run in saved["runs"]:
                run = _Run(
                    run_id=self._next_run_id,
                    path=path,
                    phase=ImportType(saved_run["phase"]),
                    started_at=time.time(),
                    duration=float(saved_run["remaining"]),
                )
                self._next_run_id += 1
                if saved_run["cancel_requested"]:
                    run.cancel_requested.set()
                repository.runs.append(run)
                self._running += 1
                run.task = asyncio.create_task(self._run(repository, run))
        self._next_run_id = max(self._next_run_id, int(state["next_run_id"]))
        self._max_running = max(int(state["max_running"]), self._running)
        self._events = list(state["events"])
        self._double_start_attempts = list(state["double_start_attempts"])
        self._overlaps = list(state["overlaps"])
        self._outcomes = Counter(state["outcomes"])
        self._answers = Counter(state["answers"])
        self._faulted = Counter(state["faulted"])
        self.notifier.counts.update(state.get("notifier_counts", {}))
        self.notifier.deliveries.extend(state.get("deliveries", []))
        for path, status, detail in state.get("undelivered", []):
            self.notifier.send(path=path, status=RegistryImportStatus(status), detail=detail)
        log.info("simulator_state_restored",
                 repositories=len(self._repositories), running=self._running,
                 undelivered=len(state.get("undelivered", [])),
                 down_seconds=round(time.time() - float(state["saved_at"]), 2))  # fmt: skip

    async def _stop_runs(self) -> None:
        tasks = [r.task for repo in self._repositories.values() for r in repo.runs if r.task]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _repository(self, path: str) -> _Repository:
        repository = self._repositories.get(path)
        if repository is None:
            repository = self._repositories[path] = _Repository(path)
        return repository

    def _record(self, action: str, path: str, phase: str | None, code: int, **extra: Any) -> None:
        self._answers[f"{action}_{code}"] += 1
        self._events.append(
            {"at": time.time(), "action": action, "path": path, "phase": phase, "answer": code,
             **extra}
        )  # fmt: skip

    # -- the import API ----------------------------------------------------------------------

    async def start(
        self,
        path: str,
        phase: ImportType,
        *,
        tags: int | None = None,
        caller_gone: Callable[[], Awaitable[bool]] | None = None,
    ) -> Answer:
        """A start call: begin a pre-import or final import of ``path``, or say why not.

        :param caller_gone: tells whether the caller has disconnected (``slow-decide`` paths).
        """
        slow = self.config.slow_start_seconds
        if self.config.start_latency_seconds:
            await asyncio.sleep(self.config.start_latency_seconds)
        if slow and SLOW_DECIDE_MARKER in path:
            await asyncio.sleep(slow)
            if caller_gone is not None and await caller_gone():
                self._record("start", path, str(phase), 499, overlap=False)
                return Answer(499, {"detail": "caller gone before the start was decided"})
        answer, overlap = self._decide_start(path, phase)
        if answer.status_code == 202:
            self._begin(path, phase, tags=tags, overlap=overlap)
        self._record("start", path, str(phase), answer.status_code, overlap=overlap)
        if slow and SLOW_START_MARKER in path:
            await asyncio.sleep(slow)
        return answer

    def _decide_start(self, path: str, phase: ImportType) -> tuple[Answer, bool]:
        config = self.config
        if MISSING_MARKER in path:
            return Answer(404, {"detail": "repository not found"}), False
        if NATIVE_MARKER in path:
            return Answer(200, {"detail": "repository already imported (native)"}), False
        if config.start_error_rate and self._random.random() < config.start_error_rate:
            return Answer(503, {"detail": "simulated registry error"}), False
        repository = self._repository(path)
        overlap = False
        if repository.runs:
            running = repository.runs[-1].phase
            attempt = {"at": time.time(), "path": path, "phase": str(phase),
                       "running_phase": str(running)}  # fmt: skip
            if config.guard_double_start:
                self._double_start_attempts.append(attempt)
                if running is ImportType.PRE:
                    return Answer(425, {"detail": "pre-import in progress"}), False
                return Answer(409, {"detail": "import in progress"}), False
            # The guard is off: accept, and flag what a real registry would have refused.
            self._overlaps.append(attempt)
            overlap = True
        if repository.status is RegistryImportStatus.IMPORT_COMPLETE and not overlap:
            return Answer(200, {"detail": "repository already imported"}), False
        if (
            phase is ImportType.FINAL
            and repository.status is RegistryImportStatus.PRE_IMPORT_FAILED
            and not overlap
        ):
            return Answer(424, {"detail": "pre-import failed"}), False
        if 0 < config.max_concurrent_imports <= self._running:
            return Answer(429, {"detail": "too many imports"}), False
        return Answer(202, {"detail": f"{phase} import started"}), overlap

    def _begin(self, path: str, phase: ImportType, *, tags: int | None, overlap: bool) -> None:
        config = self.config
        repository = self._repository(path)
        low, high = config.pre_import_seconds if phase is ImportType.PRE else config.import_seconds
        scale = (tags if tags is not None else config.default_tags) / config.default_tags
        run = _Run(
            run_id=self._next_run_id,
            path=path,
            phase=phase,
            started_at=time.time(),
            duration=self._random.uniform(low, high) * scale,
        )
        self._next_run_id += 1
        if phase is ImportType.PRE:
            repository.pre_import_starts += 1
        else:
            repository.import_starts += 1
        repository.runs.append(run)
        repository.status = _in_progress(phase)
        repository.detail = ""
        self._running += 1
        self._max_running = max(self._max_running, self._running)
        run.task = asyncio.create_task(self._run(repository, run))
        log.debug("simulator_started", path=path, phase=str(phase), overlap=overlap,
                  duration=round(run.duration, 3), running=self._running)  # fmt: skip

    def _fails(self, repository: _Repository, phase: ImportType) -> bool:
        path = repository.path
        if phase is ImportType.PRE:
            once, always, rate = (
                FAIL_ONCE_MARKER,
                FAIL_ALWAYS_MARKER,
                self.config.pre_import_failure_rate,
            )
            first = repository.pre_import_starts == 1
        else:
            once, always, rate = (
                FAIL_IMPORT_ONCE_MARKER,
                FAIL_IMPORT_ALWAYS_MARKER,
                self.config.import_failure_rate,
            )
            first = repository.import_starts == 1
        if always in path or (once in path and first):
            return True
        return self._random.random() < rate

    async def _run(self, repository: _Repository, run: _Run) -> None:
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(run.cancel_requested.wait(), timeout=run.duration)
        finally:
            # Also on reset/shutdown (task cancelled): the run no longer counts as running.
            repository.runs.remove(run)
            self._running -= 1
        if run.cancel_requested.is_set():
            status, detail = _ended(run.phase, "canceled"), "canceled on request"
        elif self._fails(repository, run.phase):
            status, detail = _ended(run.phase, "failed"), f"simulated {run.phase} import failure"
        else:
            status, detail = _ended(run.phase, "complete"), ""
        if not repository.runs:  # with overlaps, the last run to end sets the status
            repository.status, repository.detail = status, detail
        self._outcomes[str(status)] += 1
        log.debug("simulator_ended", path=repository.path, status=str(status))
        self.notifier.send(path=repository.path, status=status, detail=detail)

    def status(self, path: str) -> Answer:
        """A status call."""
        if MISSING_MARKER in path:
            return Answer(404, {"detail": "repository not found"})
        body = {"name": _name(path), "path": path, "detail": ""}
        if NATIVE_MARKER in path:
            return Answer(200, {**body, "status": str(RegistryImportStatus.NATIVE)})
        repository = self._repositories.get(path)
        if repository is None or repository.status is None:
            # A repository never imported has no row in the registry's database.
            return Answer(404, {"detail": "repository not imported"})
        return Answer(200, {**body, "status": str(repository.status), "detail": repository.detail})

    def cancel(self, path: str) -> Answer:
        """A cancel call: 202 and a ``*_canceled`` notification when a phase runs, else 400."""
        if MISSING_MARKER in path:
            answer = Answer(404, {"detail": "repository not found"})
        else:
            repository = self._repositories.get(path)
            runs = (
                [r for r in repository.runs if not r.cancel_requested.is_set()]
                if repository
                else []
            )
            if not runs:
                status = repository.status if repository else None
                answer = Answer(400, {"detail": "no import running",
                                      "status": str(status) if status else None})  # fmt: skip
            else:
                for run in runs:
                    run.cancel_requested.set()
                answer = Answer(
                    202, {"detail": "cancel accepted", "status": str(_in_progress(runs[-1].phase))}
                )
        self._record("cancel", path, None, answer.status_code)
        return answer

    # -- the report --------------------------------------------------------------------------

    def report(self, *, events: bool = True) -> dict[str, Any]:
        """Everything a test or benchmark checks; ``events`` adds the timestamped log."""
        starts = {
            path: {"pre": repo.pre_import_starts, "final": repo.import_starts}
            for path, repo in self._repositories.items()
            if repo.pre_import_starts or repo.import_starts
        }
        notifications = {
            key: self.notifier.counts.get(key, 0)
            for key in ("sent", "refused", "failed", "attempts", "skipped_no_url")
        }
        notifications["pending"] = self.notifier.pending
        report: dict[str, Any] = {
            "running_imports": self._running,
            "max_concurrent_imports": self._max_running,
            "starts_accepted": sum(s["pre"] + s["final"] for s in starts.values()),
            "starts": starts,
            "double_start_attempts": list(self._double_start_attempts),
            "double_started_repositories": sorted({a["path"] for a in self._double_start_attempts}),
            "overlapping_starts": list(self._overlaps),
            "overlapping_imports": len(self._overlaps),
            "overlapping_repositories": sorted({a["path"] for a in self._overlaps}),
            "outcomes": dict(self._outcomes),
            "answers": dict(self._answers),
            "faulted_answers": dict(self._faulted),
            "fault": self.fault_state(),
            "notifications": notifications,
        }
        if events:
            report["events"] = list(self._events)
            report["deliveries"] = list(self.notifier.deliveries)
        return report


def load_state(state_file: str) -> dict[str, Any] | None:
    """The state a simulator saved in ``state_file`` when it stopped; None when there is none.

    :raises ValueError: when the file cannot be read or is not a simulator's state.
    """
    try:
        with open(state_file) as source:
            state = json.load(source)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read the state file {state_file}: {error}") from error
    if not isinstance(state, dict) or state.get("version") != 1:
        raise ValueError(f"{state_file} is not a simulator state file")
    return state


# -- HTTP --------------------------------------------------------------------------------------


class SimulatedReset(Exception):
    """Raised mid-answer by the ``reset`` fault: the server closes the connection."""


class _CutAnswer(Response):
    """Headers and the start of a body, then the connection is closed (``reset`` fault)."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"64")],
            }
        )
        await send({"type": "http.response.body", "body": b'{"name": "', "more_body": True})
        # uvicorn closes the transport of an answer that raised after it started.
        raise SimulatedReset("connection closed mid-answer by the fault switch")


class _QuietResets(logging.Filter):
    """Keeps uvicorn from logging a traceback for every simulated reset."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], SimulatedReset))


_QUIET_RESETS = _QuietResets()


def _fault_answer(fault: Fault, kind: str) -> Response:
    """The answer of a fault that refuses the call (every mode but ``slow``)."""
    if fault.mode == "status":
        body = {"detail": f"simulated fault: {kind} answered {fault.code}"}
        return JSONResponse(body, status_code=fault.code)
    if fault.mode == "garbage":
        return PlainTextResponse("<html><body>simulated fault: not the API</body></html>",
                                 status_code=200, media_type="text/html")  # fmt: skip
    return _CutAnswer()


def create_app(
    registry: SimulatedRegistry, *, shutdown_grace: float = 1.0, state_file: str | None = None
) -> Starlette:
    """The Starlette application serving ``registry`` (import API and ``/simulator/*``).

    :param registry: the simulated registry the routes act on.
    :param shutdown_grace: seconds pending notifications get when the server stops.
    :param state_file: restore the registry from it at start, save it there at stop.
    """
    logging.getLogger("uvicorn.error").addFilter(_QUIET_RESETS)

    def authorized(request: Request) -> bool:
        token = registry.config.token
        return not token or request.headers.get("authorization") == f"Bearer {token}"

    async def faulted(kind: str, act: Callable[[], Awaitable[Response]]) -> Response:
        """``act``'s answer, unless the fault switch answers calls of ``kind`` now."""
        fault = registry.fault_for(kind)
        if fault is None:
            return await act()
        if fault.mode == "slow":
            # The call acts at once; only its answer is late (a caller that timed out does
            # not know whether it happened).
            answer = await act()
            await asyncio.sleep(fault.seconds)
            return answer
        return _fault_answer(fault, kind)

    async def import_endpoint(request: Request) -> Response:
        kind = {"PUT": "start", "GET": "status", "DELETE": "cancel"}[request.method]
        return await faulted(kind, lambda: import_call(request))

    async def import_call(request: Request) -> Response:
        raw = request.path_params["path"]
        path = raw.strip("/")
        try:
            quote_repository_path(path)
        except InvalidRepositoryPath as error:
            return JSONResponse({"detail": str(error)}, status_code=400)
        if not authorized(request):
            return JSONResponse({"detail": "unauthorized"}, status_code=401)
        if SERVER_ERROR_MARKER in path:
            return JSONResponse({"detail": "simulated internal error"}, status_code=500)
        if GARBAGE_MARKER in path:
            code = 502 if request.method == "PUT" else 200
            return PlainTextResponse("<html><body>oops</body></html>", status_code=code,
                                     media_type="text/html")  # fmt: skip
        if request.method == "GET" and UNKNOWN_STATUS_MARKER in path:
            return JSONResponse({"name": _name(path), "path": path, "status": "import_paused",
                                 "detail": "a status this API does not define"})  # fmt: skip
        if request.method == "GET":
            answer = registry.status(path)
        elif request.method == "DELETE":
            answer = registry.cancel(path)
        else:
            try:
                phase = ImportType(request.query_params.get("import_type", ""))
            except ValueError:
                return JSONResponse({"detail": "import_type must be pre or final"}, status_code=400)
            tags_raw = request.query_params.get("tags")
            tags = None
            if tags_raw is not None:
                if not tags_raw.isdigit():
                    return JSONResponse({"detail": "tags must be a whole number"}, status_code=400)
                tags = int(tags_raw)
            answer = await registry.start(
                path, phase, tags=tags, caller_gone=request.is_disconnected
            )
        return JSONResponse(answer.body, status_code=answer.status_code)

    async def api_root(request: Request) -> Response:
        return await faulted("probe", lambda: probe_call(request))

    async def probe_call(request: Request) -> Response:
        # The registry's compliance check: what GitLab asks before it uses the import API.
        if not authorized(request):
            return JSONResponse({"detail": "unauthorized"}, status_code=401)
        if not registry.config.metadata_database:
            return JSONResponse({"detail": "metadata database disabled"}, status_code=404)
        return JSONResponse({}, headers={"Gitlab-Container-Registry-Version": "simulator"})

    async def report_endpoint(request: Request) -> Response:
        events = request.query_params.get("events", "true").lower() not in ("0", "false", "no")
        return JSONResponse(registry.report(events=events))

    async def config_endpoint(request: Request) -> Response:
        if request.method == "POST":
            try:
                changes = await request.json()
            except ValueError:
                return JSONResponse({"detail": "body must be a JSON object"}, status_code=400)
            if not isinstance(changes, dict):
                return JSONResponse({"detail": "body must be a JSON object"}, status_code=400)
            try:
                registry.configure(changes)
            except ValueError as error:
                return JSONResponse({"detail": str(error)}, status_code=400)
        return JSONResponse(registry.config.as_dict())

    async def reset_endpoint(_request: Request) -> Response:
        await registry.reset()
        return JSONResponse({"detail": "reset"})

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        state = load_state(state_file) if state_file else None
        if state is not None:
            registry.restore(state)
        yield
        await registry.close(grace=shutdown_grace, state_file=state_file)

    return Starlette(
        routes=[
            Route("/gitlab/v1/", api_root, methods=["GET"]),
            Route(
                "/gitlab/v1/import/{path:path}", import_endpoint, methods=["PUT", "GET", "DELETE"]
            ),
            Route("/simulator/report", report_endpoint, methods=["GET"]),
            Route("/simulator/config", config_endpoint, methods=["GET", "POST"]),
            Route("/simulator/reset", reset_endpoint, methods=["POST"]),
        ],
        lifespan=lifespan,
    )


def _uvicorn_config(app: Starlette, *, host: str, port: int, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        log_config=None,  # keep the process's own (structlog) logging
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
    )


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one).

    :raises OSError: when the address cannot be bound (in use, not local...).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on sockets that say so, and
    # without it every answer (headers, then body) waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def serve(
    config: SimulatorConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 5005,
    log_level: str = "info",
    ready_file: str | None = None,
    state_file: str | None = None,
    fd: int | None = None,
) -> None:
    """Run the simulator in the foreground until SIGINT/SIGTERM (the CLI's entry).

    :param config: the knobs.
    :param host: the address to listen on.
    :param port: the port to listen on (0: a free one).
    :param log_level: uvicorn's log level.
    :param ready_file: a file to write the base URL into once listening (for port 0).
    :param state_file: where the registry's state is saved at stop and restored from at
        start (a stop and start is then an outage, not a new registry).
    :param fd: serve on this inherited listening TCP socket instead of binding
        ``host:port`` (a launcher that reserved the port passes it: no race for the port).
    :raises OSError: when ``host:port`` cannot be bound, or ``fd`` is not a TCP socket.
    :raises ValueError: when ``state_file`` exists but is not a simulator's state.
    """
    if state_file:
        load_state(state_file)  # a bad file stops here, with its reason, not in uvicorn
    sock = inherited_listener(fd) if fd is not None else listen(host, port)
    host, port = sock.getsockname()[:2]
    url = f"http://{host}:{port}"
    app = create_app(SimulatedRegistry(config), state_file=state_file)
    server = uvicorn.Server(_uvicorn_config(app, host=host, port=port, log_level=log_level))
    log.info("simulator_listening", url=url, notify_url=config.notify_url, fault=config.fault)
    if ready_file:
        # Written before serving: the socket already listens, connections queue up.
        with open(ready_file + ".tmp", "w") as out:
            out.write(url + "\n")
        os.replace(ready_file + ".tmp", ready_file)
    # uvicorn turns SIGTERM/SIGINT into a graceful shutdown (the lifespan then stops the
    # running imports and gives pending notifications a second), and afterwards re-raises
    # the signal to the handler that was in place: make that one a no-op, so that a
    # requested stop ends the process with status 0.
    previous = {sig: signal.signal(sig, _ignore_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    log.info("simulator_stopped")


def _ignore_signal(_signal: int, _frame: FrameType | None) -> None:
    """A handler that does nothing (the stop it asks for is already done)."""


class _SimulatorEndpoints:
    """The ``/simulator/*`` test hooks of a running simulator at :attr:`url`."""

    url: str

    def report(self, *, events: bool = True) -> dict[str, Any]:
        """``GET /simulator/report``."""
        response = httpx.get(f"{self.url}/simulator/report", params={"events": str(events)})
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def configure(self, **changes: Any) -> dict[str, Any]:
        """``POST /simulator/config`` with ``changes``; ValueError when the simulator refuses."""
        response = httpx.post(f"{self.url}/simulator/config", json=changes)
        if response.status_code == 400:
            raise ValueError(response.json()["detail"])
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def reset(self) -> None:
        """``POST /simulator/reset``."""
        httpx.post(f"{self.url}/simulator/reset").raise_for_status()


class SimulatorServer(_SimulatorEndpoints):
    """A simulator on a loopback port, served from a background thread (tests, demos).

    :param config: the knobs; None for the defaults.
    :param host: the address to listen on.
    :param port: the port; 0 picks a free one (read :attr:`url` after :meth:`start`).
    :param start_timeout: seconds to wait for the server to listen.

    Use as a context manager; :meth:`report`, :meth:`configure` and :meth:`reset` go through
    the simulator's own HTTP endpoints.
    """

    def __init__(
        self,
        config: SimulatorConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        start_timeout: float = 10.0,
    ) -> None:
        self.registry = SimulatedRegistry(config)
        self._host = host
        self._port = port
        self._start_timeout = start_timeout
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def start(self) -> SimulatorServer:
        """Listen and serve; return once the server accepts connections."""
        sock = listen(self._host, self._port)
        host, port = sock.getsockname()[:2]
        self.url = f"http://{host}:{port}"
        app = create_app(self.registry, shutdown_grace=0.2)
        server = uvicorn.Server(_uvicorn_config(app, host=host, port=port, log_level="warning"))
        self._server = server
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name=f"simulator-{port}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + self._start_timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the simulator did not start on {self.url}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Stop serving (running imports are dropped, pending notifications get 0.2 s)."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> SimulatorServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class SimulatorProcess(_SimulatorEndpoints):
    """A simulator in its own process (``registry-migrator simulator``), e.g. for benchmarks
    whose load must not share the interpreter lock with the registry.

    :param config: the knobs, applied through ``POST /simulator/config`` once it listens.
    :param host: the address to listen on.
    :param port: the port; 0 picks a free one (read :attr:`url` after :meth:`start`).
    :param log_level: the process's log level.
    :param log_path: where the process's output goes; None discards it.
    :param start_timeout: seconds to wait for the process to listen.
    :param state_file: ``--state-file``: the registry's state survives :meth:`stop` and a
        later :meth:`start` (a registry outage, not a new registry).

    :meth:`stop` sends SIGTERM and waits; the process is killed if it does not end in time.
    :meth:`start` after :meth:`stop` starts it again on the same port.
    """

    def __init__(
        self,
        config: SimulatorConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        log_path: str | None = None,
        start_timeout: float = 30.0,
        state_file: str | None = None,
    ) -> None:
        self._config = config or SimulatorConfig()
        self._state_file = state_file
        self._started_once = False
        self._host = host
        self._port = port
        self._log_level = log_level
        self._log_path = log_path
        self._start_timeout = start_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self.url = ""

    @property
    def pid(self) -> int | None:
        """The process id while it runs."""
        return self._process.pid if self._process else None

    def start(self) -> SimulatorProcess:
        """Start the process; return once it listens and has the configured knobs."""
        command = str(Path(sys.executable).with_name("registry-migrator"))
        state = ["--state-file", self._state_file] if self._state_file else []
        with tempfile.TemporaryDirectory(prefix="simulator-") as scratch:
            ready = os.path.join(scratch, "url")
            output = open(self._log_path, "ab") if self._log_path else subprocess.DEVNULL  # noqa: SIM115
            try:
                self._process = subprocess.Popen(
                    [command, "simulator", "--host", self._host, "--port", str(self._port),
                     "--log-level", self._log_level, "--ready-file", ready, *state],
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "MIGRATOR_REGISTRY_TOKEN": "",
                         "MIGRATOR_NOTIFICATION_SECRET": ""},
                )  # fmt: skip
            finally:
                if not isinstance(output, int):
                    output.close()
            deadline = time.monotonic() + self._start_timeout
            while not os.path.exists(ready):
                if self._process.poll() is not None or time.monotonic() > deadline:
                    code = self._process.poll()
                    self.stop()
                    raise RuntimeError(f"the simulator process did not start (exit status {code})")
                time.sleep(0.05)
            with open(ready) as url_file:
                self.url = url_file.read().strip()
        self._port = int(self.url.rsplit(":", 1)[1])  # a restart comes back on this port
        if not (self._started_once and self._state_file):  # else the saved knobs hold
            self.configure(**self._config.as_dict())
        self._started_once = True
        return self

    def stop(self, *, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` seconds (then kill); return the exit status."""
        process, self._process = self._process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode

    def __enter__(self) -> SimulatorProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
