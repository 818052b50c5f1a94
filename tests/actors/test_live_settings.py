"""LiveSettings: one settings read per ``max_age`` however many threads ask (no server)."""

from __future__ import annotations

import importlib.util
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import pytest

from migration.settings import Settings


def _live_settings_module() -> ModuleType:
    # Loaded from its file, not as ``actors.live_settings``: importing the ``actors`` package
    # configures its broker and queue from the environment once per process, which
    # test_triggers.py must be the first to do.
    path = Path(__file__).parents[2] / "actors" / "live_settings.py"
    spec = importlib.util.spec_from_file_location("live_settings_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class CountingRead:
    """Stands in for ``Store.settings``: counts the reads, returns the current value."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.reads = 0
        self._lock = threading.Lock()

    def __call__(self) -> Settings:
        with self._lock:
            self.reads += 1
        time.sleep(0.01)  # a round trip: the other threads ask meanwhile
        return self.settings


@pytest.fixture
def settings() -> Settings:
    return Settings(
        enabled=True, capacity=10, enqueue_waiting_time=0, created_before=None,
        max_tags_count=0, max_retries=3, pre_import_timeout=600, import_timeout=600,
        max_step_duration=300, root_namespace_deny_list=(), lease_scope="repository",
        pending_enqueues=None, enqueue_interval=60, guard_interval=60,
    )  # fmt: skip


def test_threads_share_one_read_within_max_age(settings: Settings) -> None:
    read = CountingRead(settings)
    live = _live_settings_module().LiveSettings(read, max_age=5.0)
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(lambda _: live.get(), range(400)))
    assert read.reads == 1
    assert all(s is settings for s in got)


def test_a_change_is_seen_after_max_age(settings: Settings) -> None:
    read = CountingRead(settings)
    live = _live_settings_module().LiveSettings(read, max_age=0.3)
    assert live.get().enabled is True
    read.settings = replace(settings, enabled=False)  # the operator pauses
    assert live.get().enabled is True  # within max_age: the copy
    time.sleep(0.35)
    assert live.get().enabled is False
    assert read.reads == 2


def test_a_failed_read_is_not_cached(settings: Settings) -> None:
    calls = 0

    def flaky() -> Settings:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("PostgreSQL is restarting")
        return settings

    live = _live_settings_module().LiveSettings(flaky, max_age=5.0)
    with pytest.raises(ConnectionError):
        live.get()
    assert live.get() is settings
