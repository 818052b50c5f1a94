"""Write the production overlay's PrometheusRule manifests from deploy/prometheus/rules/.

One ``PrometheusRule`` per rules file (``rules/NAME.yml`` → ``prometheusrule-NAME.yaml`` in
deploy/k8s/overlays/production, named ``registry-migrator-NAME``; ``registry-migrator.yml``
keeps its own name), with the file's groups
unchanged; tests/prometheus checks they stay equal. List a new file under ``resources:`` of
the overlay's kustomization.yaml.

Usage: uv run python deploy/prometheus/prometheusrule.py [--check]
  --check   write nothing; exit 1 when a manifest is missing or differs
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
RULES_DIR = HERE / "rules"
OVERLAY_DIR = HERE.parent / "k8s" / "overlays" / "production"

HEADER = """\
# Generated from deploy/prometheus/rules/{source} by deploy/prometheus/prometheusrule.py:
# edit the rules file, then run `uv run python deploy/prometheus/prometheusrule.py`.
# The Prometheus Operator loads it when its Prometheus selects these labels (ruleSelector).
"""


def rule_files() -> list[Path]:
    """Every rules file, sorted."""
    return sorted([*RULES_DIR.glob("*.yml"), *RULES_DIR.glob("*.yaml")])


def manifest_path(rules: Path) -> Path:
    return OVERLAY_DIR / f"prometheusrule-{rules.stem}.yaml"


def name_of(rules: Path) -> str:
    """``registry-migrator-etcd`` for rules/etcd.yml; rules/registry-migrator.yml keeps its name."""
    stem = rules.stem
    return stem if stem.startswith("registry-migrator") else f"registry-migrator-{stem}"


def manifest(rules: Path) -> dict[str, Any]:
    """The PrometheusRule holding the groups of ``rules``."""
    groups = yaml.safe_load(rules.read_text())["groups"]
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": name_of(rules),
            "labels": {
                "app.kubernetes.io/name": "registry-migrator",
                "app.kubernetes.io/part-of": "registry-migrator",
                "app.kubernetes.io/component": "monitoring",
            },
        },
        "spec": {"groups": groups},
    }


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the expressions) as literal blocks, line for line as written."""


def _string(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _string)


def render(rules: Path) -> str:
    # width < yamllint's 120: long one-line strings fold (the same value once parsed).
    body = yaml.dump(
        manifest(rules), Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True
    )
    return HEADER.format(source=rules.name) + body


def main(argv: list[str]) -> int:
    check = argv == ["--check"]
    if argv and not check:
        print(__doc__, file=sys.stderr)
        return 2
    stale = []
    for rules in rule_files():
        path, text = manifest_path(rules), render(rules)
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path)
        if not check:
            path.write_text(text)
    for path in stale:
        print(f"{'differs' if check else 'wrote'}: {path.relative_to(HERE.parent.parent)}")
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
