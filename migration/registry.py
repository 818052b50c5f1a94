"""Client of the registry import API (``/gitlab/v1/import/<path>/``).

The client is synchronous (urllib3) because it is called from Dramatiq worker threads; one
:class:`RegistryClient` holds one urllib3 pool manager and may be shared by threads. urllib3
rather than httpx: a call costs about half the client CPU (bench/README.md, issue 16), and
the registry API needs nothing httpx adds (no redirects, cookies or HTTP/2).

Every call returns a typed, frozen result and never raises for what a registry can answer
or a network can do. The mapping of HTTP statuses follows the reference (GitLab's
``ContainerRegistry::GitlabApiClient``), and every result says whose failure it is
(:class:`FaultClass`, invariant 7 of docs/design.md): this table is the one place that decides.

==========================  ==========================  =================================
answer                      outcome                     fault class
==========================  ==========================  =================================
start 202                   ``started``                 ``ok``
start 200                   ``already_imported``        ``repository`` (native)
start / status / cancel 404 ``not_found``               ``repository``
start 424                   ``pre_import_failed``       ``repository`` (charges a retry)
status 200, unknown status  ``unknown_status``          ``repository`` (guard aborts)
start 409 / 425             ``already_being_imported``  ``not_now`` (reconcile, align)
start 429                   ``too_many_imports``        ``not_now`` (claim undone)
cancel 400                  ``nothing_running``         ``not_now``
401 / 403                   ``unauthorized``            ``registry`` (pauses the migration)
5xx, other codes            ``error`` (kind ``server``  ``registry`` (never charged)
                            / ``bad_answer``)
not JSON, wrong type        ``error`` (``bad_answer``)  ``registry``
refused, DNS, TLS           ``error`` (``connect``)     ``registry`` (opens the breaker)
timeout, reset mid-answer   ``error`` (``timeout`` /    ``registry``; a start's outcome is
                            ``reset``)                  unknown: reconcile with a status read
==========================  ==========================  =================================

An invalid repository path (our data, not the registry's answer) is ``error`` of kind
``invalid_path``, class ``repository``.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import structlog
import tenacity
import urllib3

from migration import metrics, retrying
from migration.config import Config

log = structlog.get_logger(__name__)

IMPORT_PATH = "/gitlab/v1/import/"
#: The registry's own compliance check: 200 when it implements this API (a cheap probe).
API_ROOT = "/gitlab/v1/"


#: Asked before every request of a call with the client's timeout; returns the timeout to
#: use (shorter when the caller's lease would not outlast the full one), or raises to send
#: nothing (invariant 8: no side effect after the lease is gone).
Fence = Callable[[float], float]


class FaultClass(StrEnum):
    """Whose failure an answer is (invariant 7): only ``repository`` may charge a retry."""

    OK = "ok"
    REPOSITORY = "repository"  # what the registry says about this repository
    NOT_NOW = "not_now"  # busy or already running: try again later, nothing charged
    REGISTRY = "registry"  # the registry (or the way to it) failed: never charged


class ErrorKind(StrEnum):
    """What went wrong when an answer is the registry's failure."""

    CONNECT = "connect"  # refused, DNS, TLS: the request never reached it
    TIMEOUT = "timeout"  # no answer in time: the request may have been acted on
    RESET = "reset"  # the connection broke after sending: may have been acted on
    SERVER = "server"  # a 5xx answer
    AUTH = "auth"  # 401 / 403: our token is refused
    BAD_ANSWER = "bad_answer"  # not the API's answer (unexpected code, not JSON)
    INVALID_PATH = "invalid_path"  # our repository path cannot be sent

    @property
    def outcome_unknown(self) -> bool:
        """Whether a start that failed this way may still have been started."""
        return self in (ErrorKind.TIMEOUT, ErrorKind.RESET, ErrorKind.SERVER)


def _fault_of(kind: ErrorKind | None) -> FaultClass:
    return FaultClass.REPOSITORY if kind is ErrorKind.INVALID_PATH else FaultClass.REGISTRY


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
    #: A 200 JSON answer whose status is not one of the API's: the repository's, not a fault
    #: of the registry as a whole (the guard cancels and aborts it, as the reference does).
    UNKNOWN_STATUS = "unknown_status"
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
    :param error_kind: with ``error`` and ``unauthorized``: what went wrong.
    """

    outcome: ImportOutcome
    http_status: int | None
    detail: str = ""
    attempts: int = 1
    error_kind: ErrorKind | None = None

    @property
    def started(self) -> bool:
        """True when the registry began the (pre-)import."""
        return self.outcome is ImportOutcome.STARTED

    @property
    def fault_class(self) -> FaultClass:
        """Whose failure this answer is (see the module's table)."""
        return _START_FAULTS.get(self.outcome) or _fault_of(self.error_kind)


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
    error_kind: ErrorKind | None = None

    @property
    def fault_class(self) -> FaultClass:
        """Whose failure this answer is (see the module's table)."""
        if self.outcome in (StatusOutcome.FOUND,):
            return FaultClass.OK
        if self.outcome in (StatusOutcome.NOT_FOUND, StatusOutcome.UNKNOWN_STATUS):
            return FaultClass.REPOSITORY
        return _fault_of(self.error_kind)


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
    error_kind: ErrorKind | None = None

    @property
    def fault_class(self) -> FaultClass:
        """Whose failure this answer is (see the module's table)."""
        return {
            CancelOutcome.ACCEPTED: FaultClass.OK,
            CancelOutcome.NOTHING_RUNNING: FaultClass.NOT_NOW,
            CancelOutcome.NOT_FOUND: FaultClass.REPOSITORY,
        }.get(self.outcome) or _fault_of(self.error_kind)


@dataclass(frozen=True, kw_only=True)
class ProbeResult:
    """The answer to the compliance check ``GET /gitlab/v1/``.

    :param ok: the registry answered 200: it is up and implements the API.
    :param detail: what went wrong otherwise (404: its metadata database is disabled).
    :param http_status: the HTTP status, None when no answer came.
    :param error_kind: what went wrong, when not ok.
    """

    ok: bool
    detail: str = ""
    http_status: int | None = None
    error_kind: ErrorKind | None = None


_START_FAULTS: dict[ImportOutcome, FaultClass] = {
    ImportOutcome.STARTED: FaultClass.OK,
    ImportOutcome.ALREADY_IMPORTED: FaultClass.REPOSITORY,
    ImportOutcome.NOT_FOUND: FaultClass.REPOSITORY,
    ImportOutcome.PRE_IMPORT_FAILED: FaultClass.REPOSITORY,
    ImportOutcome.ALREADY_BEING_IMPORTED: FaultClass.NOT_NOW,
    ImportOutcome.TOO_MANY_IMPORTS: FaultClass.NOT_NOW,
}

_START_OUTCOMES = {
    202: ImportOutcome.STARTED,
    200: ImportOutcome.ALREADY_IMPORTED,
    404: ImportOutcome.NOT_FOUND,
    409: ImportOutcome.ALREADY_BEING_IMPORTED,
    425: ImportOutcome.ALREADY_BEING_IMPORTED,
    424: ImportOutcome.PRE_IMPORT_FAILED,
    429: ImportOutcome.TOO_MANY_IMPORTS,
    401: ImportOutcome.UNAUTHORIZED,
    403: ImportOutcome.UNAUTHORIZED,
}

_CANCEL_OUTCOMES = {
    202: CancelOutcome.ACCEPTED,
    400: CancelOutcome.NOTHING_RUNNING,
    404: CancelOutcome.NOT_FOUND,
    401: CancelOutcome.UNAUTHORIZED,
    403: CancelOutcome.UNAUTHORIZED,
}


def _kind_of_status(code: int) -> ErrorKind:
    """The error kind of an HTTP status the API does not define for the call."""
    if code in (401, 403):
        return ErrorKind.AUTH
    return ErrorKind.SERVER if code >= 500 else ErrorKind.BAD_ANSWER


_NOT_JSON = object()


@dataclass(frozen=True)
class _Answer:
    """An HTTP answer, read whole.

    :param status_code: the HTTP status.
    :param reason_phrase: the status line's text.
    :param headers: the response headers (names in any case).
    :param content: the body.
    """

    status_code: int
    reason_phrase: str
    headers: Mapping[str, str]
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    @cached_property
    def _parsed(self) -> Any:
        try:
            return json.loads(self.content)
        except ValueError:  # not JSON, or not UTF-8 (UnicodeDecodeError is a ValueError)
            return _NOT_JSON

    def json(self) -> Any:
        """The body as JSON (parsed once); :class:`ValueError` when it is not JSON."""
        if self._parsed is _NOT_JSON:
            raise ValueError("the body is not JSON")
        return self._parsed


def _api_answer(response: _Answer) -> bool:
    """Whether a 2xx answer is the API's: JSON (or empty), not a proxy's HTML page."""
    if not response.content.strip():
        return True
    if "json" not in response.headers.get("content-type", "json").lower():
        return False
    try:
        response.json()
    except ValueError:
        return False
    return True


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


def _detail(response: _Answer) -> str:
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


def _transport_kind(error: urllib3.exceptions.HTTPError) -> ErrorKind:
    # NewConnectionError and NameResolutionError are ConnectTimeoutErrors too; a TLS
    # handshake that fails (SSLError) is before the request as well.
    if isinstance(
        error,
        urllib3.exceptions.ConnectTimeoutError
        | urllib3.exceptions.SSLError
        | urllib3.exceptions.LocationValueError,
    ):
        return ErrorKind.CONNECT  # nothing was sent: the start cannot have happened
    if isinstance(error, urllib3.exceptions.TimeoutError):
        return ErrorKind.TIMEOUT
    return ErrorKind.RESET


def _pool_manager(base_url: str, *, headers: dict[str, str]) -> urllib3.PoolManager:
    """A pool manager for ``base_url``, through the proxy the environment names for it
    (``HTTP(S)_PROXY``, ``NO_PROXY``), as httpx and requests do."""
    parts = urlsplit(base_url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    # Connections kept per host: the worker threads of a process (Dramatiq's default 8)
    # and a few more; a burst above it opens and closes extra ones.
    options: dict[str, Any] = {"headers": headers, "maxsize": 16, "retries": False}
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        return urllib3.ProxyManager(proxy, **options)
    return urllib3.PoolManager(**options)


@dataclass(frozen=True)
class _TransportFailure:
    """A request that got no HTTP answer."""

    detail: str
    kind: ErrorKind


class RegistryClient:
    """Calls the registry import API; safe to share between threads.

    :param base_url: the registry's base URL, e.g. ``http://127.0.0.1:5005``.
    :param token: a bearer token sent with every call, when set.
    :param timeout: seconds for each of connect and read (each wait for the socket, sends
        included) of every call.
    :param too_many_retries: retries of a start call answered 429 before giving up.
    :param backoff: first wait (seconds) between 429 retries; doubles, with jitter.

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
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if too_many_retries < 0 or backoff < 0:
            raise ValueError("too_many_retries and backoff must not be negative")
        self.base_url = base_url.rstrip("/")
        self.too_many_retries = too_many_retries
        self.backoff = backoff
        self.timeout = timeout
        #: Called after every call with (call, fault class, error kind, what went wrong: the
        #: HTTP status and the detail); see migration.registry_health. Must not raise.
        self.observer: Callable[[str, FaultClass, ErrorKind | None, str], None] | None = None
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._headers = headers
        self._http = _pool_manager(self.base_url, headers=headers)
        # Without a proxy every request goes to one host: its pool is asked directly, with
        # the path only, which saves the manager's parse of each URL and its pool lookup
        # (PoolManager.urlopen and parse_url, ~3 % of a worker's CPU in bench/pipeline.py).
        self._open: Callable[..., urllib3.BaseHTTPResponse]
        if isinstance(self._http, urllib3.ProxyManager):
            self._open, self._target_base = self._http.urlopen, self.base_url
        else:
            pool = self._http.connection_from_url(self.base_url)
            self._open, self._target_base = pool.urlopen, urlsplit(self.base_url).path

    @classmethod
    def from_config(cls, config: Config, **options: Any) -> RegistryClient:
        """A client for ``config.registry_url`` with ``config.registry_token``.

        :param config: the process configuration.
        :param options: further keyword options of the constructor (timeout, ...).
        """
        options.setdefault("timeout", config.registry_timeout)
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
        self._http.clear()

    # -- start -----------------------------------------------------------------------------

    def start_pre_import(self, path: str, *, fence: Fence | None = None) -> ImportResult:
        """Ask the registry to pre-import a repository (``import_type=pre``).

        :param path: the repository path, ``root/.../name``.
        :param fence: see :data:`Fence`.
        """
        return self._start(path, ImportType.PRE, fence)

    def start_import(self, path: str, *, fence: Fence | None = None) -> ImportResult:
        """Ask the registry for the final import of a repository (``import_type=final``).

        :param path: the repository path, ``root/.../name``.
        :param fence: see :data:`Fence`.
        """
        return self._start(path, ImportType.FINAL, fence)

    def _start(self, path: str, import_type: ImportType, fence: Fence | None) -> ImportResult:
        call = f"start_{import_type}"
        try:
            url = import_url_path(path)
        except InvalidRepositoryPath as error:
            return ImportResult(
                outcome=ImportOutcome.ERROR, http_status=None, detail=str(error), attempts=0,
                error_kind=ErrorKind.INVALID_PATH,
            )  # fmt: skip
        attempts = 0

        def attempt() -> ImportResult:
            nonlocal attempts
            attempts += 1
            return self._start_once(call, url, fence, import_type, attempts)

        # 429 only (the registry is at capacity: it may have room a moment later); every
        # other answer is final. After the last retry the 429 is the answer.
        result: ImportResult = retrying.policy(
            initial=self.backoff,
            attempts=self.too_many_retries + 1,
            retry=tenacity.retry_if_result(
                lambda answer: answer.outcome is ImportOutcome.TOO_MANY_IMPORTS
            ),
            before_sleep=retrying.log_before_sleep(
                log, "registry_start_retry", level="debug", path=path, http_status=429
            ),
        )(attempt)
        self._count(call, result.fault_class, result.error_kind, result.detail, result.http_status)
        log.debug(
            "registry_start",
            path=path,
            import_type=str(import_type),
            outcome=str(result.outcome),
            http_status=result.http_status,
            attempts=result.attempts,
            error_kind=result.error_kind,
        )
        return result

    def _start_once(
        self, call: str, url: str, fence: Fence | None, import_type: ImportType, attempts: int
    ) -> ImportResult:
        """One start call, its answer classified; ``attempts`` counts this one."""
        response = self._request(call, "PUT", url, fence, query={"import_type": str(import_type)})
        if isinstance(response, _TransportFailure):
            return ImportResult(
                outcome=ImportOutcome.ERROR,
                http_status=None,
                detail=response.detail,
                attempts=attempts,
                error_kind=response.kind,
            )
        code = response.status_code
        outcome = _START_OUTCOMES.get(code, ImportOutcome.ERROR)
        kind = None
        if outcome is ImportOutcome.ERROR or outcome is ImportOutcome.UNAUTHORIZED:
            kind = _kind_of_status(code)
        elif code < 300 and not _api_answer(response):
            outcome, kind = ImportOutcome.ERROR, ErrorKind.BAD_ANSWER
        return ImportResult(
            outcome=outcome,
            http_status=code,
            detail=_detail(response),
            attempts=attempts,
            error_kind=kind,
        )

    # -- status ----------------------------------------------------------------------------

    def status(self, path: str, *, fence: Fence | None = None) -> StatusResult:
        """Read a repository's import status.

        :param path: the repository path, ``root/.../name``.
        :param fence: see :data:`Fence`.
        """
        result = self._status(path, fence)
        self._count(
            "status", result.fault_class, result.error_kind, result.detail, result.http_status
        )
        return result

    def _status(self, path: str, fence: Fence | None) -> StatusResult:
        try:
            url = import_url_path(path)
        except InvalidRepositoryPath as error:
            return StatusResult(
                outcome=StatusOutcome.ERROR, detail=str(error), error_kind=ErrorKind.INVALID_PATH
            )
        response = self._request("status", "GET", url, fence)
        if isinstance(response, _TransportFailure):
            return StatusResult(
                outcome=StatusOutcome.ERROR, detail=response.detail, error_kind=response.kind
            )
        code = response.status_code
        if code == 404 and _api_answer(response):
            return StatusResult(
                outcome=StatusOutcome.NOT_FOUND, detail=_detail(response), http_status=code
            )
        if code in (401, 403):
            return StatusResult(
                outcome=StatusOutcome.UNAUTHORIZED, detail=_detail(response), http_status=code,
                error_kind=ErrorKind.AUTH,
            )  # fmt: skip
        if code != 200:
            return StatusResult(
                outcome=StatusOutcome.ERROR, detail=_detail(response), http_status=code,
                error_kind=_kind_of_status(code),
            )  # fmt: skip
        body = _json_object(response) if _api_answer(response) else None
        if body is None:
            return StatusResult(
                outcome=StatusOutcome.ERROR,
                detail=f"unexpected status body: {response.text.strip()[:200]!r}",
                http_status=code,
                error_kind=ErrorKind.BAD_ANSWER,
            )
        status = _known_status(body.get("status"))
        if status is None:
            return StatusResult(
                outcome=StatusOutcome.UNKNOWN_STATUS,
                detail=f"unknown status {str(body.get('status'))[:100]!r}",
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

    def cancel(self, path: str, *, fence: Fence | None = None) -> CancelResult:
        """Ask the registry to cancel the running (pre-)import of a repository.

        :param path: the repository path, ``root/.../name``.
        :param fence: see :data:`Fence`.
        """
        try:
            url = import_url_path(path)
        except InvalidRepositoryPath as error:
            return CancelResult(
                outcome=CancelOutcome.ERROR, detail=str(error), error_kind=ErrorKind.INVALID_PATH
            )
        response = self._request("cancel", "DELETE", url, fence)
        if isinstance(response, _TransportFailure):
            result = CancelResult(
                outcome=CancelOutcome.ERROR, detail=response.detail, error_kind=response.kind
            )
        else:
            body = _json_object(response)
            code = response.status_code
            outcome = _CANCEL_OUTCOMES.get(code, CancelOutcome.ERROR)
            kind = None
            if outcome in (CancelOutcome.ERROR, CancelOutcome.UNAUTHORIZED):
                kind = _kind_of_status(code)
            elif not _api_answer(response):
                outcome, kind = CancelOutcome.ERROR, ErrorKind.BAD_ANSWER
            result = CancelResult(
                outcome=outcome,
                status=_known_status(body.get("status")) if body is not None else None,
                detail=_detail(response),
                http_status=code,
                error_kind=kind,
            )
        self._count(
            "cancel", result.fault_class, result.error_kind, result.detail, result.http_status
        )
        log.debug(
            "registry_cancel",
            path=path,
            outcome=str(result.outcome),
            http_status=result.http_status,
        )
        return result

    # -- probe -----------------------------------------------------------------------------

    def probe(self) -> ProbeResult:
        """The registry's compliance check, ``GET /gitlab/v1/``: is it up and speaking the API?

        200 → ok; 401/403 → our token is refused; 404 → its metadata database is disabled;
        anything else, or no answer, → not ok.
        """
        response = self._request("probe", "GET", API_ROOT, None)
        if isinstance(response, _TransportFailure):
            result = ProbeResult(ok=False, detail=response.detail, error_kind=response.kind)
        elif response.status_code == 200 and _api_answer(response):
            result = ProbeResult(ok=True, http_status=200)
        else:
            code = response.status_code
            detail = _detail(response)
            if code == 404:
                detail = f"metadata database disabled (404): {detail}"
            kind = ErrorKind.BAD_ANSWER if code == 200 else _kind_of_status(code)
            result = ProbeResult(ok=False, detail=detail, http_status=code, error_kind=kind)
        fault = FaultClass.OK if result.ok else FaultClass.REGISTRY
        self._count("probe", fault, result.error_kind, result.detail, result.http_status)
        return result

    # -- transport -------------------------------------------------------------------------

    def _request(
        self,
        call: str,
        method: str,
        url: str,
        fence: Fence | None,
        *,
        query: dict[str, str] | None = None,
    ) -> _Answer | _TransportFailure:
        """Send one request; a transport failure comes back as a :class:`_TransportFailure`.

        The fence (if any) is asked before every request, 429 retries included: it may
        shorten the timeout, or raise, and then nothing is sent.
        """
        seconds = self.timeout if fence is None else fence(self.timeout)
        target = self._target_base + url + (f"?{urlencode(query)}" if query else "")
        began = time.monotonic()
        try:
            # No retries, no redirects: a start is not idempotent, and its answer (or its
            # loss) is classified here, once. The body is read whole within the timeout.
            raw = self._open(
                method,
                target,
                headers=self._headers,  # a pool asked directly has not the manager's
                timeout=urllib3.Timeout(connect=seconds, read=seconds),
                retries=False,
                redirect=False,
                preload_content=True,
            )
            response = _Answer(raw.status, raw.reason or "", raw.headers, raw.data)
        except urllib3.exceptions.HTTPError as error:
            detail = _transport_detail(error)
            kind = _transport_kind(error)
            log.warning(
                "registry_unreachable", method=method, url=url, error=detail, error_kind=kind
            )
            return _TransportFailure(detail, kind)
        finally:
            metrics.REGISTRY_CALL_SECONDS.labels(call).observe(time.monotonic() - began)
        return response

    def _count(
        self,
        call: str,
        fault_class: FaultClass,
        kind: ErrorKind | None,
        detail: str,
        http_status: int | None,
    ) -> None:
        metrics.REGISTRY_CALLS.labels(call, fault_class.value).inc()
        if self.observer is not None:
            said = f"{http_status} {detail}" if http_status is not None else detail
            self.observer(call, fault_class, kind, said)


def _json_object(response: _Answer) -> dict[str, Any] | None:
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
