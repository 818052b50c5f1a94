"""An etcd out of space is counted and logged once per failure; other errors are not."""

from __future__ import annotations

import structlog
from prometheus_client import REGISTRY

from actors.runtime import note_etcd_failure
from leases import EtcdNoSpace, EtcdUnavailable

METRIC = "registry_migrator_etcd_nospace_total"


def _count(where: str) -> float:
    return REGISTRY.get_sample_value(METRIC, {"where": where}) or 0.0


def test_nospace_is_counted_and_logged_other_failures_are_not() -> None:
    before = _count("unit")
    with structlog.testing.capture_logs() as logs:
        note_etcd_failure(EtcdNoSpace("etcd create failed: out of space"), where="unit")
        note_etcd_failure(EtcdUnavailable("etcd create failed: UNAVAILABLE"), where="unit")
        note_etcd_failure(ValueError("not etcd"), where="unit")
        note_etcd_failure(None, where="unit")
    assert _count("unit") == before + 1
    assert [line["event"] for line in logs] == ["etcd_nospace"]
    assert logs[0]["log_level"] == "error"
    assert logs[0]["where"] == "unit"
    assert "--recover" in logs[0]["action"]
