"""Malformed Dramatiq messages published straight to a real worker's queue.

One ``dramatiq actors`` worker (``LocalMigration``, no API, no scheduler) on a queue of its
own. Each bad message must either go to the dead-letter queue (``<queue>.XQ``) or be dropped
with a clear log line, without retries; and afterwards the worker still processes a valid
message.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import psycopg
import pytest

from actors.validation import argument_problem
from devtools.launcher import LocalMigration
from migration.registry import RegistryClient, RegistryImportStatus
from migration.store import Seen, Store


def _enqueue(
    ticket_key: str | None = None, ticket_token: int | None = None, source: str = "x"
) -> None:
    """Stands for enqueue_next_migration's signature in the unit tests below."""


def _notify(
    path: str,
    status: str,
    detail: str = "",
    *,
    repository_id: int | None = None,
    seen: dict[str, Any] | None = None,
) -> None:
    """Stands for handle_registry_notification's signature."""


@pytest.mark.parametrize(
    ("fn", "args", "kwargs", "fits"),
    [
        (_notify, ("a/b", "import_complete"), {}, True),
        (_notify, ("a/b", "import_complete", "detail"), {}, True),
        (_notify, ("a/b",), {}, False),
        (_notify, ("a/b", "s", "d", "extra"), {}, False),
        (_notify, (1, "import_complete"), {}, False),
        (_notify, ("a/b", None), {}, False),
        (_notify, ("a/b", "s"), {"nope": 1}, False),
        (_notify, ("a/b", "s"), {"repository_id": 7}, True),
        (_notify, ("a/b", "s"), {"repository_id": "7"}, False),
        (_notify, ("a/b", "s"), {"repository_id": 7, "seen": {"fencing_token": 1}}, True),
        (_notify, ("a/b", "s", "d", 7), {}, False),  # the id is a keyword only
        (_enqueue, (), {}, True),
        (_enqueue, ("k", 5, "scheduler"), {}, True),
        (_enqueue, ("k", "5"), {}, False),
        (_enqueue, ("k", True), {}, False),
        (_enqueue, ("k", 1.5), {}, False),
        (_enqueue, ([], None), {}, False),
    ],
)
def test_argument_problem(
    fn: Callable[..., None], args: tuple[Any, ...], kwargs: dict[str, Any], fits: bool
) -> None:
    assert (argument_problem(fn, args, kwargs) is None) == fits


class QueueClient:
    """Publishes raw bodies to a queue and counts its dead letters, with pika."""

    def __init__(self, url: str, queue: str) -> None:
        self.queue = queue
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()

    def wait_declared(self, *, timeout: float) -> None:
        """Wait until the worker has declared the queue and its dead-letter queue.

        Before that, a publish to the queue is dropped and a passive declare of the
        dead-letter queue closes the channel (404): every later case would then fail with
        "Channel is closed" (seen on a loaded machine, where the worker is slow to consume).
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                for name in (self.queue, f"{self.queue}.XQ"):
                    self.channel.queue_declare(name, passive=True)
                return
            except pika.exceptions.ChannelClosedByBroker:
                assert time.monotonic() < deadline, f"{self.queue} not declared in {timeout} s"
                time.sleep(0.2)
                self.channel = self.connection.channel()

    def publish(self, body: bytes) -> None:
        self.channel.basic_publish(
            exchange="",
            routing_key=self.queue,
            body=body,
            properties=pika.BasicProperties(delivery_mode=2),
        )

    def message(self, actor: str, args: Any, kwargs: Any = None, **fields: Any) -> str:
        """Publish a Dramatiq message (possibly with bad arguments); its id."""
        message_id = str(uuid.uuid4())
        body = {
            "queue_name": self.queue,
            "actor_name": actor,
            "args": args,
            "kwargs": {} if kwargs is None else kwargs,
            "options": {},
            "message_id": message_id,
            "message_timestamp": int(time.time() * 1000),
            **fields,
        }
        self.publish(json.dumps(body).encode())
        return message_id

    def dead_letters(self) -> int:
        declared = self.channel.queue_declare(f"{self.queue}.XQ", passive=True)
        return int(declared.method.message_count)

    def delete_queues(self) -> None:
        for name in (self.queue, f"{self.queue}.DQ", f"{self.queue}.XQ"):
            self.channel.queue_delete(name)
        self.connection.close()


@pytest.fixture(scope="module")
def worker(
    stack: dict[str, str],
    database_url: str,
    store: Store,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LocalMigration]:
    queue = f"badinput_{uuid.uuid4().hex[:10]}"
    env = {**stack, "MIGRATOR_DATABASE_URL": database_url, "MIGRATOR_LOG_LEVEL": "info"}
    run = LocalMigration(
        env=env,
        log_dir=tmp_path_factory.mktemp("badinput-worker"),
        workers=1,
        threads=2,
        api=False,
        scheduler=False,
        queue_name=queue,
    )
    with run:
        yield run
    # After the worker stopped, so it does not see its queues vanish.
    QueueClient(stack["MIGRATOR_BROKER_URL"], queue).delete_queues()


@pytest.fixture(scope="module")
def queue(worker: LocalMigration, stack: dict[str, str]) -> Iterator[QueueClient]:
    client = QueueClient(stack["MIGRATOR_BROKER_URL"], worker.env["MIGRATOR_QUEUE_NAME"])
    client.wait_declared(timeout=60)
    yield client
    client.connection.close()


def worker_log(worker: LocalMigration) -> str:
    return (Path(worker.log_dir) / "worker-0.log").read_text(errors="replace")


def wait_for(condition: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


DEAD = "dead-lettered"

#: name -> (publish it, what must happen: DEAD or the event of the one log line)
CASES: dict[str, tuple[Callable[[QueueClient], object], str]] = {
    "not JSON": (lambda q: q.publish(b"\x00\xffnot json at all{"), DEAD),
    "empty body": (lambda q: q.publish(b""), DEAD),
    "JSON list": (lambda q: q.publish(b"[1, 2, 3]"), DEAD),
    "JSON, not a message": (lambda q: q.publish(b'{"hello": "world"}'), DEAD),
    "message without args": (
        lambda q: q.publish(json.dumps({"actor_name": "enqueue_next_migration"}).encode()),
        DEAD,
    ),
    "unknown actor": (lambda q: q.message("drop_all_tables", []), DEAD),
    "notification: too few args": (
        lambda q: q.message("handle_registry_notification", ["a/b"]),
        DEAD,
    ),
    "notification: too many args": (
        lambda q: q.message("handle_registry_notification", ["a/b", "import_complete", "", 4]),
        DEAD,
    ),
    "notification: path not a string": (
        lambda q: q.message("handle_registry_notification", [12, "import_complete"]),
        DEAD,
    ),
    "notification: unknown keyword": (
        lambda q: q.message(
            "handle_registry_notification", ["a/b", "import_complete"], {"force": True}
        ),
        DEAD,
    ),
    "notification: repository id a string": (
        lambda q: q.message(
            "handle_registry_notification", ["a/b", "import_complete"], {"repository_id": "7"}
        ),
        DEAD,
    ),
    "notification: args an object": (
        lambda q: q.message("handle_registry_notification", {"path": "a/b"}),
        DEAD,
    ),
    "notification: kwargs a list": (
        lambda q: q.message("handle_registry_notification", ["a/b", "import_complete"], ["x"]),
        DEAD,
    ),
    "enqueuer: token a string": (
        lambda q: q.message("enqueue_next_migration", ["/gate/0", "seven", "test"]),
        DEAD,
    ),
    "enqueuer: too many args": (
        lambda q: q.message("enqueue_next_migration", [None, None, "test", "extra"]),
        DEAD,
    ),
    "guard: an argument": (lambda q: q.message("guard_stale_migrations", [1]), DEAD),
    "notification: unknown repository": (
        lambda q: q.message("handle_registry_notification", ["no/such/repo", "import_complete"]),
        "notification_dropped",
    ),
    "notification: unknown repository, id and path": (
        lambda q: q.message(
            "handle_registry_notification",
            ["no/such/repo", "import_complete"],
            {"repository_id": 2_000_000_000},
        ),
        "notification_dropped",
    ),
    "notification: unknown status": (
        lambda q: q.message("handle_registry_notification", ["no/such/repo", "exploded"]),
        "notification_dropped",
    ),
    "notification: NUL in the path": (
        lambda q: q.message("handle_registry_notification", ["a\x00b", "import_complete"]),
        "notification_dropped",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_message_is_dead_lettered_or_dropped_once(
    case: str, queue: QueueClient, worker: LocalMigration
) -> None:
    publish, expected = CASES[case]
    dead_before = queue.dead_letters()
    log_before = len(worker_log(worker))
    publish(queue)
    if expected == DEAD:
        wait_for(lambda: queue.dead_letters() == dead_before + 1, timeout=10, what="dead letter")
    else:
        wait_for(
            lambda: f'"event": "{expected}"' in worker_log(worker)[log_before:],
            timeout=10,
            what=f"a {expected} line",
        )
    time.sleep(0.3)  # a retry would show up by now (min backoff 100 ms)
    new_lines = worker_log(worker)[log_before:]
    assert "Retrying message" not in new_lines, new_lines
    assert "Logging error" not in new_lines, new_lines
    assert queue.dead_letters() == dead_before + (1 if expected == DEAD else 0)
    assert worker.alive()["worker-0"], "the worker died"


def _imported(worker: LocalMigration, store: Store, database_url: str, path: str) -> int:
    """A repository the registry has imported, ``importing`` in the store: its id."""
    repository_id = store.add_repository(path)
    # The import really ends at the registry: the worker confirms a notification's status
    # with the registry before applying it.
    with RegistryClient(worker.simulator_url) as registry:
        for start, done in (
            (registry.start_pre_import, RegistryImportStatus.PRE_IMPORT_COMPLETE),
            (registry.start_import, RegistryImportStatus.IMPORT_COMPLETE),
        ):
            assert start(path).started
            wait_for(
                lambda done=done: registry.status(path).status is done,  # type: ignore[misc]
                timeout=10,
                what=f"the registry's {done.value}",
            )
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE container_repositories SET migration_state = 'importing' WHERE id = %s",
            (repository_id,),
        )
    return repository_id


def _wait_import_done(store: Store, repository_id: int) -> None:
    wait_for(
        lambda: (
            (found := store.get(repository_id)) is not None
            and found.migration_state.value == "import_done"
        ),
        timeout=10,
        what="the step to import_done",
    )


def test_a_nul_in_the_detail_does_not_stop_the_step(
    queue: QueueClient, worker: LocalMigration, store: Store, database_url: str
) -> None:
    """The registry's free-text detail is kept in the events log; NUL cannot be stored."""
    path = f"nul/detail-{uuid.uuid4().hex[:6]}"
    repository_id = _imported(worker, store, database_url, path)
    log_before = len(worker_log(worker))
    queue.message("handle_registry_notification", [path, "import_complete", "bad\x00detail"])
    _wait_import_done(store, repository_id)
    assert "Retrying message" not in worker_log(worker)[log_before:]


def test_a_repository_id_of_another_path_steps_the_path_s_repository(
    queue: QueueClient, worker: LocalMigration, store: Store, database_url: str
) -> None:
    """The API sends the id it found for the path; an id that names another repository
    (a message by hand, a row deleted and added again) must not step that one."""
    path = f"stale-id/imported-{uuid.uuid4().hex[:6]}"
    repository_id = _imported(worker, store, database_url, path)
    other = store.add_repository(f"stale-id/other-{uuid.uuid4().hex[:6]}")
    # Paused: the run the step's freed slot makes must not start ``other`` either.
    store.update_settings(enabled=False)
    time.sleep(1.2)  # the worker's settings are at most a second old
    log_before = len(worker_log(worker))
    try:
        queue.message(
            "handle_registry_notification", [path, "import_complete"], {"repository_id": other}
        )
        _wait_import_done(store, repository_id)
    finally:
        store.update_settings(enabled=True)
    untouched = store.get(other)
    assert untouched is not None and untouched.migration_state.value == "default"
    new_lines = worker_log(worker)[log_before:]
    assert '"event": "notification_repository_id_stale"' in new_lines
    assert "Retrying message" not in new_lines


def test_the_seen_columns_are_a_hint_the_row_under_the_lease_decides(
    queue: QueueClient, worker: LocalMigration, store: Store, database_url: str
) -> None:
    """The API sends the row's columns as it read them; the worker writes its step with
    its read only when the row still has them. Stale or malformed columns are not a
    reason to lose the notification, nor to record a refused write."""
    ids = [
        _imported(worker, store, database_url, f"seen/{kind}-{uuid.uuid4().hex[:6]}")
        for kind in ("as-seen", "stale", "malformed")
    ]
    with psycopg.connect(database_url, autocommit=True) as conn:
        # Started once, as a claim leaves it: nothing to confirm with the registry.
        conn.execute(
            "UPDATE container_repositories SET migration_import_starts = 1 WHERE id = ANY(%s)",
            (ids,),
        )
    rows = [store.get(i) for i in ids]
    assert all(rows)
    seen = [Seen.of(row).as_message() for row in rows if row is not None]
    log_before = len(worker_log(worker))
    for row, columns in zip(
        rows,
        [seen[0], {**seen[1], "fencing_token": seen[1]["fencing_token"] + 1}, {"nope": 1}],
        strict=True,
    ):
        assert row is not None
        queue.message(
            "handle_registry_notification", [row.path, "import_complete"],
            {"repository_id": row.id, "seen": columns},
        )  # fmt: skip
    for repository_id in ids:
        _wait_import_done(store, repository_id)
    with psycopg.connect(database_url) as conn:
        events = conn.execute(
            "SELECT repository_id, event, accepted FROM migration_events"
            " WHERE repository_id = ANY(%s) ORDER BY id",
            (ids,),
        ).fetchall()
    assert sorted(events) == sorted((i, "finish_import", True) for i in ids)
    new_lines = worker_log(worker)[log_before:]
    assert new_lines.count('"event": "notification_seen_ignored"') == 1
    assert "Retrying message" not in new_lines


def test_the_worker_still_processes_a_valid_message(
    queue: QueueClient, worker: LocalMigration
) -> None:
    # Runs after the bad messages (module order): the worker must still be at work.
    source = f"after-bad-input-{uuid.uuid4().hex[:6]}"
    queue.message("enqueue_next_migration", [None, None, source])
    wait_for(
        lambda: f'"source": "{source}"' in worker_log(worker),
        timeout=15,
        what="the valid message's log line",
    )
    assert worker.alive()["worker-0"]
