"""Client of the registry import API (``/gitlab/v1/import/<path>/``).

The client is synchronous (httpx) because it is called from Dramatiq worker threads; one
:class:`RegistryClient` holds one pooled ``httpx.Client`` and may be shared by threads.

Every call returns a typed, frozen result and never raises for what a registry can answer
or a network can do: refused connections, timeouts, 5xx and garbage all come back as an
``error`` outcome with a detail string. The mapping of HTTP statuses follows the reference
(GitLab's ``ContainerRegistry::GitlabApiClient``):

- 202 → ``started``: the registry began the (pre-)import;
- 200 → ``already_imported``: the repository is native already;
- 404 → ``not_found``: no such repository;
- 409 / 425 → ``already_being_imported``: an import / a pre-import is running;
- 424 → ``pre_import_failed``: a final import after a failed pre-import;
- 429 → ``too_many_imports``: after bounded retries with backoff and jitter;
- 401 → ``unauthorized``: the token was refused;
- anything else → ``error``: 5xx, unexpected codes, garbage, network errors, timeouts.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx
import structlog

from migration.config import Config

log = structlog.get_logger(__name__)

IMPORT_PATH = "/gitlab/v1/import/"


class ImportOutcome(StrEnum):
    """What a start call (pre-import or final import) came to."""

    STARTED = "started"
    ALREADY_IMPORTED = "already_imported"
    NOT_FOUND = "not_found"
    ALREADY_BEING_IMPORTED = "already_being_imported"
    PRE_IMPORT_FAILED = "pre_import_failed"
    TOO_MANY_IMPORTS = "too_many_imports"
    UNAUTHORIZED = "unauthorized"
    ERROR = "error"


class ImportType(StrEnum):
    """The ``import_type`` query parameter of a start call."""

    PRE = "pre"
    FINAL = "final"


class RegistryImportStatus(StrEnum):
    """A repository's import status as the registry reports it (GET and notifications)."""

    NATIVE = "native"
    PRE_IMPORT_IN_PROGRESS = "pre_import_in_progress"
    PRE_IMPORT_COMPLETE = "pre_import_complete"
    PRE_IMPORT_FAILED = "pre_import_failed"
    PRE_IMPORT_CANCELED = "pre_import_canceled"
    IMPORT_IN_PROGRESS = "import_in_progress"
    IMPORT_COMPLETE = "import_complete"
    IMPORT_FAILED = "import_failed"
    IMPORT_CANCELED = "import_canceled"

    @property
    def in_progress(self) -> bool:
        """True while a pre-import or an import runs."""
        return self in (self.PRE_IMPORT_IN_PROGRESS, self.IMPORT_IN_PROGRESS)

    @property
    def ended(self) -> bool:
        """True for the statuses a notification reports: a phase has ended."""
        return not self.in_progress and self is not self.NATIVE


class StatusOutcome(StrEnum):
    """What a status call came to."""

    FOUND = "found"
    NOT_FOUND = "not_found"
    UNAUTHORIZED = "unauthorized"
    ERROR = "error"


class CancelOutcome(StrEnum):
    """What a cancel call came to."""

    ACCEPTED = "accepted"
    NOTHING_RUNNING = "nothing_running"
    NOT_FOUND = "not_found"
    UNAUTHORIZED = "unauthorized"
    ERROR = "error"


@dataclass(frozen=True, kw_only=True)
class ImportResult:
    """The answer to a start call.

    :param outcome: what happened.
    :param http_status: the last HTTP status received, None when no answer came.
    :param detail: a short human-readable explanation (the registry's, or the error's).
    :param attempts: HTTP requests made (more than one only after 429 answers).
    """

    outcome: ImportOutcome
    http_status: int | None
    detail: str = ""
    attempts: int = 1

    @property
    def started(self) -> bool:
        """True when the registry began the (pre-)import."""
        return self.outcome is ImportOutcome.STARTED


@dataclass(frozen=True, kw_only=True)
class StatusResult:
    """The answer to a status call.

    :param outcome: ``found`` when the registry answered with a known status.
    :param status: the repository's import status (only with ``found``).
    :param name: the repository name the registry reported.
    :param path: the repository path the registry reported.
    :param detail: the registry's detail, or what went wrong.
    :param http_status: the HTTP status, None when no answer came.
    """

    outcome: StatusOutcome
    status: RegistryImportStatus | None = None
    name: str | None = None
    path: str | None = None
    detail: str = ""
    http_status: int | None = None


@dataclass(frozen=True, kw_only=True)
class CancelResult:
    """The answer to a cancel call.

    :param outcome: what happened; ``accepted`` means a ``*_canceled`` notification follows.
    :param status: the import status the registry reported with its answer, if any.
    :param detail: the registry's detail, or what went wrong.
    :param http_status: the HTTP status, None when no answer came.
    """

    outcome: CancelOutcome
    status: RegistryImportStatus | None = None
    detail: str = ""
    http_status: int | None = None


_START_OUTCOMES = {
    202: ImportOutcome.STARTED,
    200: ImportOutcome.ALREADY_IMPORTED,
    404: ImportOutcome.NOT_FOUND,
    409: ImportOutcome.ALREADY_BEING_IMPORTED,
    425: ImportOutcome.ALREADY_BEING_IMPORTED,
    424: ImportOutcome.PRE_IMPORT_FAILED,
    429: ImportOutcome.TOO_MANY_IMPORTS,
    401: ImportOutcome.UNAUTHORIZED,
}

_CANCEL_OUTCOMES = {
    202: CancelOutcome.ACCEPTED,
    400: CancelOutcome.NOTHING_RUNNING,
    404: CancelOutcome.NOT_FOUND,
    401: CancelOutcome.UNAUTHORIZED,
}


class InvalidRepositoryPath(ValueError):
    """A repository path is empty or has empty, ``.`` or ``..`` segments."""


def quote_repository_path(path: str) -> str:
    """A repository path fit for a URL: each segment quoted, the slashes between them kept.

    :param path: the repository path, ``root/group/.../name`` (surrounding slashes ignored).
    :raises InvalidRepositoryPath: when a segment is empty, ``.`` or ``..``.
    """
    segments = path.strip("/").split("/")
    if any(segment in ("", ".", "..") for segment in segments):
        raise InvalidRepositoryPath(f"invalid repository path {path!r}")
    return "/".join(quote(segment, safe="") for segment in segments)


def import_url_path(path: str) -> str:
    """The URL path of a repository's import resource, ``/gitlab/v1/import/<path>/``.

    :param path: the repository path, ``root/group/.../name``.
    :raises InvalidRepositoryPath: see :func:`quote_repository_path`.
    """
    return f"{IMPORT_PATH}{quote_repository_path(path)}/"


def _detail(response: httpx.Response) -> str:
    """The registry's explanation of an answer: a JSON detail/message/errors, else the text."""
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()
        return text[:200] if text else response.reason_phrase
    if isinstance(body, dict):
        for key in ("detail", "message", "error"):
            if isinstance(body.get(key), str) and body[key]:
                return str(body[key])
        errors = body.get("errors")
        if isinstance(errors, list) and errors:
            first = errors[0]
            if isinstance(first, dict) and isinstance(first.get("message"), str):
                return str(first["message"])
    return response.reason_phrase


def _transport_detail(error: Exception) -> str:
    message = str(error) or error.__class__.__doc__ or ""
    return f"{type(error).__name__}: {message.strip().splitlines()[0] if message else ''}"


class RegistryClient:
    """Calls the registry import API; safe to share between threads.

    :param base_url: the registry's base URL, e.g. ``http://127.0.0.1:5005``.
    :param token: a bearer token sent with every call, when set.
    :param timeout: seconds for each of connect, read, write and pool wait of every call.
    :param too_many_retries: retries of a start call answered 429 before giving up.
    :param backoff: first wait (seconds) between 429 retries; doubles, with jitter.
    :param transport: an httpx transport (tests, custom TLS); None for the default.

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout: float = 5.0,
        too_many_retries: int = 3,
        backoff: float = 0.2,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if too_many_retries < 0 or backoff < 0:
            raise ValueError("too_many_retries and backoff must not be negative")
        self.base_url = base_url.rstrip("/")
        self.too_many_retries = too_many_retries
        self.backoff = backoff
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout),
            transport=transport,
            follow_redirects=False,
        )

    @classmethod
    def from_config(cls, config: Config, **options: Any) -> RegistryClient:
        """A client for ``config.registry_url`` with ``config.registry_token``.

        :param config: the process configuration.
        :param options: further keyword options of the constructor (timeout, ...).
        """
        return cls(config.registry_url, token=config.registry_token, **options)

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the pooled connections."""
        self._http.close()

    # -- start -----------------------------------------------------------------------------

    def start_pre_import(self, path: str) -> ImportResult:
        """Ask the registry to pre-import a repository (``import_type=pre``).

        :param path: the repository path, ``root/.../name``.
        """
        return self._start(path, ImportType.PRE)

    def start_import(self, path: str) -> ImportResult:
        """Ask the registry for the final import of a repository (``import_type=final``).

        :param path: the repository path, ``root/.../name``.
        """
        return self._start(path, ImportType.FINAL)

    def _start(self, path: str, import_type: ImportType) -> ImportResult:
        try:
            url = import_url_path(path)
        except InvalidRepositoryPath as error:
            return ImportResult(
                outcome=ImportOutcome.ERROR, http_status=None, detail=str(error), attempts=0
            )
        attempts = 0
        while True:
            attempts += 1
            response = self._request("PUT", url, params={"import_type": str(import_type)})
            if isinstance(response, str):
                result = ImportResult(
                    outcome=ImportOutcome.ERROR,
                    http_status=None,
                    detail=response,
                    attempts=attempts,
                )
                break
            outcome = _START_OUTCOMES.get(response.status_code, ImportOutcome.ERROR)
            result = ImportResult(
                outcome=outcome,
                http_status=response.status_code,
                detail=_detail(response),
                attempts=attempts,
            )
            if outcome is not ImportOutcome.TOO_MANY_IMPORTS or attempts > self.too_many_retries:
                break
            time.sleep(self._retry_delay(attempts))
        log.debug(
            "registry.start",
            path=path,
            import_type=str(import_type),
            outcome=str(result.outcome),
            http_status=result.http_status,
            attempts=result.attempts,
        )
        return result

    def _retry_delay(self, attempt: int) -> float:
        # Exponential backoff with "equal jitter": half fixed, half random, so that workers
        # refused together do not come back together.
        ceiling = self.backoff * (2 ** (attempt - 1))
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    # -- status ----------------------------------------------------------------------------

    def status(self, path: str) -> StatusResult:
        """Read a repository's import status.

        :param path: the repository path, ``root/.../name``.
        """
        try:
            url = import_url_path(path)
        except InvalidRepositoryPath as error:
            return StatusResult(outcome=StatusOutcome.ERROR, detail=str(error))
        response = self._request("GET", url)
        if isinstance(response, str):
            return StatusResult(outcome=StatusOutcome.ERROR, detail=response)
        code = response.status_code
        if code == 404:
            return StatusResult(
                outcome=StatusOutcome.NOT_FOUND, detail=_detail(response), http_status=code
            )
        if code == 401:
            return StatusResult(
                outcome=StatusOutcome.UNAUTHORIZED, detail=_detail(response), http_status=code
            )
        if code != 200:
            return StatusResult(
                outcome=StatusOutcome.ERROR, detail=_detail(response), http_status=code
            )
        body = _json_object(response)
        status = _known_status(body.get("status")) if body is not None else None
        if body is None or status is None:
            return StatusResult(
                outcome=StatusOutcome.ERROR,
                detail=f"unexpected status body: {response.text.strip()[:200]!r}",
                http_status=code,
            )
        return StatusResult(
            outcome=StatusOutcome.FOUND,
            status=status,
            name=_str_or_none(body.get("name")),
            path=_str_or_none(body.get("path")),
            detail=_str_or_none(body.get("detail")) or "",
            http_status=code,
        )

    # -- cancel ----------------------------------------------------------------------------

    def cancel(self, path: str) -> CancelResult:
        """Ask the registry to cancel the running (pre-)import of a repository.

        :param path: the repository path, ``root/.../name``.
        """
        try:
            url = import_url_path(path)
        except InvalidRepositoryPath as error:
            return CancelResult(outcome=CancelOutcome.ERROR, detail=str(error))
        response = self._request("DELETE", url)
        if isinstance(response, str):
            return CancelResult(outcome=CancelOutcome.ERROR, detail=response)
        body = _json_object(response)
        result = CancelResult(
            outcome=_CANCEL_OUTCOMES.get(response.status_code, CancelOutcome.ERROR),
            status=_known_status(body.get("status")) if body is not None else None,
            detail=_detail(response),
            http_status=response.status_code,
        )
        log.debug(
            "registry.cancel",
            path=path,
            outcome=str(result.outcome),
            http_status=result.http_status,
        )
        return result

    # -- transport -------------------------------------------------------------------------

    def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response | str:
        """Send one request; a transport failure comes back as its description (a str)."""
        try:
            response = self._http.request(method, url, **kwargs)
            response.read()
        except httpx.HTTPError as error:
            detail = _transport_detail(error)
            log.warning("registry.unreachable", method=method, url=url, error=detail)
            return detail
        return response


def _json_object(response: httpx.Response) -> dict[str, Any] | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _known_status(value: object) -> RegistryImportStatus | None:
    try:
        return RegistryImportStatus(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None
