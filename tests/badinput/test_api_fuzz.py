"""Fuzz the notification API from its own OpenAPI document with schemathesis.

The app is wired to the real servers: this module's PostgreSQL database, the stack's etcd
(a prefix of its own) and RabbitMQ (``publish`` really sends handle_registry_notification
to a queue of its own, deleted afterwards). For every generated request:

- no answer is a 5xx;
- on every route but /healthz, /readyz and /metrics, the request is refused with 401 when
  its Authorization is missing or wrong — whatever else is wrong with it;
- with the right secret, and again with the body's path made to match the URL's (so the
  request gets past validation to the database), still no 5xx.

The number of requests and their outcomes are printed at the end of the module.
"""

from __future__ import annotations

import collections
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import schemathesis
from dramatiq import Message
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

from actors.broker import make_broker
from actors.runtime import Runtime
from migration.config import Config
from migration.store import Store
from service.api import create_app, rabbitmq_check
from tests.badinput.conftest import add_summary_lines

PUBLIC = {"/healthz", "/readyz", "/metrics"}
#: Cases per protected operation and generation mode (public ones: a third); each
#: protected case is sent three to five times (see the module doc).
MAX_EXAMPLES = 60
#: The same with ``--long``.
MAX_EXAMPLES_LONG = 1000

OUTCOMES: collections.Counter[tuple[str, str, int]] = collections.Counter()


@pytest.fixture(scope="module")
def fuzz_config(stack: dict[str, str], database_url: str, store: Store) -> Config:
    run = uuid.uuid4().hex[:10]
    env = {
        **stack,
        "MIGRATOR_DATABASE_URL": database_url,
        "MIGRATOR_ETCD_PREFIX": f"/fuzz-{run}",
        "MIGRATOR_QUEUE_NAME": f"fuzz_{run}",
        "MIGRATOR_NOTIFICATION_SECRET": f"fuzz-secret-{uuid.uuid4().hex}",
    }
    return Config.from_env(env)


@pytest.fixture(scope="module")
def seeded(store: Store, database_url: str) -> list[str]:
    """Repositories the fuzzer's coherent requests may hit, in states notifications fit."""
    paths = {
        "group/pre": "pre_importing",
        "group/final": "importing",
        "group/idle": "default",
        "group/done": "import_done",
    }
    for path in paths:
        store.add_repository(path)
    with psycopg.connect(database_url, autocommit=True) as conn:
        for path, state in paths.items():
            conn.execute(
                "UPDATE container_repositories SET migration_state = %s WHERE path = %s",
                (state, path),
            )
    return list(paths)


@pytest.fixture(scope="module")
def app(
    fuzz_config: Config, seeded: list[str], request: pytest.FixtureRequest
) -> Iterator[FastAPI]:
    runtime = Runtime(fuzz_config)
    broker = make_broker(fuzz_config)
    broker.declare_queue(fuzz_config.queue_name)
    sent: list[tuple[str, str, str]] = []

    def publish(
        path: str, status: str, detail: str, repository_id: int, seen: dict[str, object]
    ) -> None:
        broker.enqueue(
            Message(
                queue_name=fuzz_config.queue_name,
                actor_name="handle_registry_notification",
                args=(path, status, detail),
                kwargs={"repository_id": repository_id, "seen": seen},
                options={},
            )
        )
        sent.append((path, status, detail))

    app = create_app(
        fuzz_config,
        runtime=lambda: runtime,
        publish=publish,
        broker_check=rabbitmq_check(fuzz_config.broker_url),
    )
    yield app
    channel = broker.channel
    queued = channel.queue_declare(fuzz_config.queue_name, passive=True).method.message_count
    for name in (fuzz_config.queue_name, f"{fuzz_config.queue_name}.DQ"):
        channel.queue_delete(name)
    channel.queue_delete(f"{fuzz_config.queue_name}.XQ")
    broker.close()
    runtime.close()
    _report(request, queued=queued, published=len(sent))


def _report(request: pytest.FixtureRequest, *, queued: int, published: int) -> None:
    lines = [f"API fuzz: {sum(OUTCOMES.values())} requests"]
    for (operation, variant, status), count in sorted(OUTCOMES.items()):
        lines.append(f"  {operation:<62} {variant:<16} {status}: {count}")
    lines.append(f"  notifications published to RabbitMQ: {published} (in the queue: {queued})")
    add_summary_lines(request.config, lines)


@pytest.fixture(scope="module")
def api_schema(app: FastAPI, fuzz_config: Config) -> Any:
    # The schema is served only with the secret; it is the app's own document either way.
    return schemathesis.openapi.from_asgi(
        "/openapi.json", app, headers={"Authorization": str(fuzz_config.notification_secret)}
    )


#: Every operation of the API; test_every_operation_is_fuzzed keeps this list complete.
OPERATIONS = [
    "GET /healthz",
    "GET /readyz",
    "GET /metrics",
    "PUT /notifications/registry/repositories/{path}/status",
]


def test_every_operation_is_fuzzed(api_schema: Any) -> None:
    found = {
        f"{result.ok().method.upper()} {result.ok().path}"
        for result in api_schema.get_all_operations()
    }
    assert found == set(OPERATIONS)


def _send(case: Any, variant: str, headers: dict[str, str] | None = None) -> int:
    response = case.call(headers=headers)
    operation = f"{case.method} {case.path}"
    OUTCOMES[(operation, variant, response.status_code)] += 1
    assert response.status_code < 500, (
        f"{variant}: {operation} answered {response.status_code}: {response.text[:300]}"
    )
    return int(response.status_code)


def _check(case: Any, secret: str) -> None:
    """Send ``case`` in its variants (see the module doc) and check each answer."""
    if case.path in PUBLIC:
        status = _send(case, "no secret")
        if case.path == "/readyz":
            assert status == 200, "the stack is up: ready"
        return
    # Whatever schemathesis put in Authorization (or nothing) is not the secret.
    assert _send(case, "generated auth") == 401
    generated = dict(case.headers or {})
    if case.headers:
        case.headers.pop("authorization", None)
        case.headers.pop("Authorization", None)
    assert _send(case, "no secret") == 401
    if case.headers is not None:
        case.headers.update(generated)
    assert _send(case, "wrong secret", {"Authorization": secret + "x"}) == 401
    _send(case, "right secret", {"Authorization": secret})
    # Cases are not copyable: the last variant changes the case itself.
    path = (case.path_parameters or {}).get("path")
    if isinstance(case.body, dict) and isinstance(path, str):
        case.body["path"] = path
        _send(case, "coherent body", {"Authorization": secret})


# schemathesis' own pytest integration (from_fixture) breaks on pytest 9.2 (it sets
# Node._nodeid, which pytest no longer has), so the cases come from its strategies.
# Negative cases (that break the schema) only where there is something to break.
@pytest.mark.parametrize(
    ("operation", "mode"),
    [(operation, GenerationMode.POSITIVE) for operation in OPERATIONS]
    + [(OPERATIONS[-1], GenerationMode.NEGATIVE)],
)
def test_fuzzed_requests(
    api_schema: Any,
    fuzz_config: Config,
    operation: str,
    mode: GenerationMode,
    request: pytest.FixtureRequest,
) -> None:
    method, path = operation.split(" ", 1)
    examples = MAX_EXAMPLES_LONG if request.config.getoption("--long") else MAX_EXAMPLES
    secret = fuzz_config.notification_secret
    assert secret is not None
    strategy = api_schema[path][method].as_strategy(generation_mode=mode)

    @given(case=strategy)
    @settings(
        max_examples=examples // 3 if path in PUBLIC else examples,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
        phases=[Phase.explicit, Phase.generate],
    )
    def fuzz(case: Any) -> None:
        _check(case, secret)

    fuzz()


@pytest.mark.parametrize(
    ("path", "status", "expected"),
    [
        ("group/pre", "pre_import_complete", 202),
        ("group/final", "import_complete", 202),
        ("group/idle", "import_complete", 409),
        ("group/missing", "import_complete", 404),
        ("group/pre", "pre_import_in_progress", 422),
    ],
)
def test_known_notifications(
    app: FastAPI, fuzz_config: Config, path: str, status: str, expected: int
) -> None:
    with TestClient(app) as client:
        body = {"name": path.rsplit("/", 1)[-1], "path": path, "status": status, "detail": ""}
        url = f"/notifications/registry/repositories/{path}/status"
        answer = client.put(
            url, json=body, headers={"Authorization": str(fuzz_config.notification_secret)}
        )
        OUTCOMES[("PUT (known)", "right secret", answer.status_code)] += 1
        assert answer.status_code == expected, answer.text
        refused = client.put(url, json=body)
        OUTCOMES[("PUT (known)", "no secret", refused.status_code)] += 1
        assert refused.status_code == 401


def test_a_notification_rabbitmq_does_not_confirm_is_answered_503_at_the_deadline(
    fuzz_config: Config, seeded: list[str]
) -> None:
    """A broker that never confirms (cut off in silence) must not hold the registry's
    request past the deadline: 503 then, counted, and nothing answered 202."""
    entered, release = threading.Event(), threading.Event()

    def silent_publish(
        path: str, status: str, detail: str, repository_id: int, seen: dict[str, object]
    ) -> None:
        entered.set()
        release.wait(30)

    runtime = Runtime(fuzz_config)
    app = create_app(fuzz_config, runtime=lambda: runtime, publish=silent_publish, deadline=0.5)
    secret = {"Authorization": str(fuzz_config.notification_secret)}
    body = {"name": "pre", "path": "group/pre", "status": "pre_import_complete"}
    try:
        with TestClient(app) as client:
            began = time.monotonic()
            answer = client.put(
                "/notifications/registry/repositories/group/pre/status", json=body, headers=secret
            )
            waited = time.monotonic() - began
            assert answer.status_code == 503, answer.text
            assert entered.is_set(), "the lookup passed and the publish was under way"
            assert 0.4 < waited < 5, waited  # the deadline, not the publish's 30 s
            scraped = client.get("/metrics").text
            assert 'registry_migrator_notifications_total{outcome="timed_out"} 1.0' in scraped
            assert 'outcome="accepted"' not in scraped
    finally:
        release.set()
        runtime.close()
