"""The rules in deploy/prometheus: valid (promtool check rules), unit-tested (promtool test
rules), every alert shown firing by a test, and the production PrometheusRule equal to them.

Every file under deploy/prometheus/rules and deploy/prometheus/tests is picked up: a new rules
file needs no change here.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.k8s.manifest_checks import K8S_DIR, render
from tests.prometheus.conftest import PROMETHEUS_DIR, RULE_TESTS_DIR, RULES_DIR


def _yaml_files(folder: Path) -> list[Path]:
    return sorted([*folder.glob("*.yml"), *folder.glob("*.yaml")])


RULE_FILES = _yaml_files(RULES_DIR)
TEST_FILES = _yaml_files(RULE_TESTS_DIR)


def _promtool(promtool: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(promtool), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def _alerts(rules_file: Path) -> set[str]:
    groups = yaml.safe_load(rules_file.read_text())["groups"]
    return {rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule}


def _rule_files_of(test_file: Path) -> set[Path]:
    spec = yaml.safe_load(test_file.read_text())
    return {(test_file.parent / name).resolve() for name in spec.get("rule_files") or []}


def test_there_are_rules_and_tests() -> None:
    assert RULE_FILES, f"no rules under {RULES_DIR}"
    assert TEST_FILES, f"no promtool tests under {RULE_TESTS_DIR}"


@pytest.mark.parametrize("rules_file", RULE_FILES, ids=lambda path: path.name)
def test_rules_pass_promtool_check(promtool: Path, rules_file: Path) -> None:
    result = _promtool(promtool, "check", "rules", str(rules_file), cwd=RULES_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("test_file", TEST_FILES, ids=lambda path: path.name)
def test_rule_unit_tests_pass(promtool: Path, test_file: Path) -> None:
    result = _promtool(promtool, "test", "rules", test_file.name, cwd=test_file.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize("rules_file", RULE_FILES, ids=lambda path: path.name)
def test_every_alert_is_shown_firing_by_a_unit_test(rules_file: Path) -> None:
    """Each alert of the file has a promtool case where it fires (and so shows its labels
    and annotations), in a test file that loads this rules file."""
    fired: set[str] = set()
    tested = False
    for test_file in TEST_FILES:
        if rules_file.resolve() not in _rule_files_of(test_file):
            continue
        tested = True
        for case in yaml.safe_load(test_file.read_text())["tests"]:
            for check in case.get("alert_rule_test") or []:
                if check.get("exp_alerts"):
                    fired.add(check["alertname"])
    assert tested, f"no file under {RULE_TESTS_DIR} loads {rules_file.name}"
    assert _alerts(rules_file) - fired == set(), "alerts never shown firing"


def test_a_wrong_expectation_fails(promtool: Path, tmp_path: Path) -> None:
    """The runner notices a failing unit test: promtool exits non-zero on a changed value."""
    copy = tmp_path / "prometheus"
    (copy / "tests").mkdir(parents=True)
    (copy / "rules").symlink_to(RULES_DIR)
    original = (RULE_TESTS_DIR / "registry-migrator_test.yml").read_text()
    wrong = original.replace("value: 66", "value: 67")
    assert wrong != original
    (copy / "tests" / "registry-migrator_test.yml").write_text(wrong)
    result = _promtool(promtool, "test", "rules", "registry-migrator_test.yml", cwd=copy / "tests")
    assert result.returncode != 0
    assert "FAILED" in result.stdout + result.stderr


def _prometheus_rules(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        doc["metadata"]["name"]: doc["spec"]["groups"]
        for doc in docs
        if doc.get("kind") == "PrometheusRule"
    }


@pytest.mark.parametrize("rules_file", RULE_FILES, ids=lambda path: path.name)
def test_production_prometheusrule_equals_the_rules_file(rules_file: Path) -> None:
    """The production overlay renders a PrometheusRule whose groups are the file's."""
    stem = rules_file.stem
    name = stem if stem.startswith("registry-migrator") else f"registry-migrator-{stem}"
    rendered = _prometheus_rules(render(K8S_DIR / "overlays" / "production"))
    update = (
        "run `uv run python deploy/prometheus/prometheusrule.py` and list the file under"
        " resources: in deploy/k8s/overlays/production/kustomization.yaml"
    )
    assert name in rendered, f"no PrometheusRule {name} in the production overlay: {update}"
    assert rendered[name] == yaml.safe_load(rules_file.read_text())["groups"], update


def test_prometheusrule_generator_is_up_to_date() -> None:
    script = PROMETHEUS_DIR / "prometheusrule.py"
    result = subprocess.run(
        [sys.executable, str(script), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
