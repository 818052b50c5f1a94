"""The Grafana dashboard deploy/grafana/registry-migrator.json: importable, and its queries are
the recording rules of deploy/prometheus (unit-tested by promtool, and shown returning data on
a real run by test_scrape), each of which promtool parses."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import REPO_ROOT
from tests.prometheus.conftest import RULES_DIR

DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "registry-migrator.json"
SECTIONS = ("Progress", "In flight vs capacity", "Rates", "Registry health", "Leases")


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _expressions() -> list[str]:
    return [
        target["expr"] for panel in _dashboard()["panels"] for target in panel.get("targets") or []
    ]


def _recorded() -> set[str]:
    names = set()
    for path in sorted(RULES_DIR.glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            names |= {rule["record"] for rule in group["rules"] if "record" in rule}
    return names


def test_dashboard_has_the_sections_and_imports_with_a_datasource_input() -> None:
    dashboard = _dashboard()
    rows = [panel["title"] for panel in dashboard["panels"] if panel["type"] == "row"]
    assert rows == list(SECTIONS)
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        for target in panel.get("targets") or []:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]


def test_every_query_is_a_tested_recording_rule() -> None:
    expressions = _expressions()
    assert len(expressions) >= 15
    assert sorted(set(expressions) - _recorded()) == []


def test_every_query_parses(promtool: Path, tmp_path: Path) -> None:
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{n}", "expr": expr}
                    for n, expr in enumerate(_expressions())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run(
        [str(promtool), "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
