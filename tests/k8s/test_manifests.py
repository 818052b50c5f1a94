"""Offline validation of deploy/k8s and deploy/Containerfile (no cluster, no network).

For each overlay: render with ``kubectl kustomize`` (exit status checked), validate every
document against the Kubernetes schema in strict mode (a removed API version is a failure),
lint with yamllint, and run the semantic checks of ``manifest_checks``. Then, for each check,
a deliberately broken copy of the tree shows that the check catches what it is for.
"""

from __future__ import annotations

import re
import shutil
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml

from tests.k8s import manifest_checks as checks
from tests.k8s.manifest_checks import K8S_DIR, OVERLAYS, REPO_ROOT

if TYPE_CHECKING:
    from tests.k8s.conftest import RenderCache

pytestmark = pytest.mark.timeout(120)

YAMLLINT_CONFIG = K8S_DIR / ".yamllint"
CONTAINERFILE = REPO_ROOT / "deploy" / "Containerfile"
SECRET_EXAMPLE = K8S_DIR / "docs" / "secret.example.yaml"


# --- the real tree -----------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_expected_resources(overlay: str, renders: RenderCache) -> None:
    docs = renders.get(K8S_DIR / "overlays" / overlay)
    kinds = sorted(checks.name_of(doc).split("/")[0] for doc in docs)
    deployments = {d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"}
    assert deployments == {
        "registry-migrator-worker",
        "registry-migrator-scheduler",
        "registry-migrator-api",
    }
    for kind in ("ConfigMap", "Job", "NetworkPolicy", "PodDisruptionBudget", "Service"):
        assert kind in kinds
    assert all(doc["metadata"].get("namespace") for doc in docs), "overlays set a namespace"


def test_base_renders_and_validates(renders: RenderCache) -> None:
    docs = renders.get(K8S_DIR / "base")
    assert checks.check_schemas(docs) == []


def test_overlay_documents_are_valid_kubernetes(overlay_docs: list[checks.Doc]) -> None:
    assert checks.check_schemas(overlay_docs) == []


def test_yaml_files_pass_yamllint() -> None:
    assert checks.lint_yaml(K8S_DIR, config_file=YAMLLINT_CONFIG) == []


@pytest.mark.parametrize("check_name", sorted(checks.SEMANTIC_CHECKS))
def test_overlay_passes_semantic_check(check_name: str, overlay_docs: list[checks.Doc]) -> None:
    assert checks.SEMANTIC_CHECKS[check_name](overlay_docs) == []


def test_production_spreads_every_deployment(renders: RenderCache) -> None:
    docs = renders.get(K8S_DIR / "overlays" / "production")
    for template in checks.pod_templates(docs):
        if template.owner["kind"] != "Deployment":
            continue
        spread = template.spec.get("topologySpreadConstraints") or []
        assert {c["topologyKey"] for c in spread} >= {"topology.kubernetes.io/zone"}, (
            template.owner_name
        )


def test_production_runs_more_than_dev(renders: RenderCache) -> None:
    def replicas(overlay: str) -> dict[str, int]:
        docs = renders.get(K8S_DIR / "overlays" / overlay)
        return {
            d["metadata"]["name"]: d["spec"]["replicas"] for d in docs if d["kind"] == "Deployment"
        }

    dev, production = replicas("dev"), replicas("production")
    assert all(production[name] >= dev[name] for name in dev)
    assert production["registry-migrator-scheduler"] == 2, "one leader, one standby"
    assert production["registry-migrator-worker"] > dev["registry-migrator-worker"]


def test_secret_example_matches_the_operator_allow_list() -> None:
    examples = [doc for doc in yaml.safe_load_all(SECRET_EXAMPLE.read_text()) if doc]
    assert checks.check_schemas(examples) == []
    documented = {doc["metadata"]["name"]: frozenset(doc["stringData"]) for doc in examples}
    assert documented == dict(checks.OPERATOR_PROVIDED_SECRETS)
    readme = (K8S_DIR / "README.md").read_text()
    for name, keys in checks.OPERATOR_PROVIDED_SECRETS.items():
        assert f"`{name}`" in readme
        for key in keys:
            assert f"`{key}`" in readme, f"README does not document {name} key {key}"


def test_containerfile_ships_every_package_and_runs_as_the_manifest_uid() -> None:
    text = CONTAINERFILE.read_text()
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    packages = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    copied = set(re.findall(r"^COPY (\w+) \./\1$", text, flags=re.MULTILINE))
    assert copied == set(packages), "the Containerfile must COPY each wheel package"
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim", text, flags=re.MULTILINE)
    assert re.search(r"uv sync --frozen --no-dev", text)
    users = re.findall(r"^USER (\S+)$", text, flags=re.MULTILINE)
    assert users == [f"{checks.RUN_AS_USER}:{checks.RUN_AS_USER}"]


def test_containerfile_downloads_trust_the_ca_store_the_build_script_mounts() -> None:
    # deploy/local/image mounts the host's CA bundle over this path for the RUN steps; pip
    # and uv must read it there, or the build fails behind a TLS-intercepting proxy (the
    # build itself only runs in the slow tests/image).
    store = "/etc/ssl/certs/ca-certificates.crt"
    text = CONTAINERFILE.read_text()
    assert f"PIP_CERT={store}" in text
    assert "UV_SYSTEM_CERTS=1" in text
    script = (REPO_ROOT / "deploy" / "local" / "image").read_text()
    assert f'--volume "$CA_BUNDLE:{store}:ro"' in script


#: checkov checks skipped on purpose (deploy/k8s/README.md gives each reason).
JUSTIFIED_CHECKOV_SKIPS = frozenset({"CKV_K8S_15", "CKV_K8S_35", "CKV_K8S_43"})


def test_checkov_skips_are_the_justified_ones(overlay_docs: list[checks.Doc]) -> None:
    skipped = set()
    for doc in overlay_docs:
        for key, value in (doc["metadata"].get("annotations") or {}).items():
            if not key.startswith("checkov.io/skip"):
                continue
            match = re.fullmatch(r"(CKV_K8S_\d+)=(.+)", value)
            assert match, f"{checks.name_of(doc)} {key}: expected CKV_K8S_xx=reason, got {value!r}"
            assert len(match.group(2).split()) >= 5, f"{checks.name_of(doc)} {key}: say why"
            skipped.add(match.group(1))
    assert skipped == JUSTIFIED_CHECKOV_SKIPS


# --- deliberately broken copies ----------------------------------------------------------


@dataclass(frozen=True)
class Breakage:
    """One deliberate defect: replace ``old`` (found exactly once) by ``new`` in ``file``.

    :param id: test id.
    :param file: path relative to deploy/k8s.
    :param check: a key of ``SEMANTIC_CHECKS``, or ``schemas``, ``yamllint``, ``render``.
    :param expected: a substring of the problem the check must report.
    :param overlay: the overlay rendered from the broken copy.
    """

    id: str
    file: str
    old: str
    new: str
    check: str
    expected: str
    overlay: str = "dev"


WORKER_SELECTOR = """  selector:
    matchLabels:
      app.kubernetes.io/name: registry-migrator
      app.kubernetes.io/component: worker
"""

TEMPLATE_LABELS = """  template:
    metadata:
      labels:
        app.kubernetes.io/name: registry-migrator
"""

BREAKAGES = [
    Breakage(
        "render-missing-base",
        "overlays/dev/kustomization.yaml",
        "  - ../../base\n",
        "  - ../../bases\n",
        "render",
        "exited 1",
    ),
    Breakage(
        "deployment-selector-mismatch",
        "base/worker.yaml",
        WORKER_SELECTOR,
        WORKER_SELECTOR.replace("component: worker", "component: worker-pool"),
        "selectors",
        "does not match its template labels",
    ),
    Breakage(
        "service-selector-mismatch",
        "base/api.yaml",
        "  selector:\n    app.kubernetes.io/name: registry-migrator\n"
        "    app.kubernetes.io/component: api\n",
        "  selector:\n    app.kubernetes.io/name: registry-migrator\n"
        "    app.kubernetes.io/component: apis\n",
        "selectors",
        "matches no pod template",
    ),
    Breakage(
        "removed-api-deployment-extensions-v1beta1",
        "base/api.yaml",
        "apiVersion: apps/v1\nkind: Deployment\n",
        "apiVersion: extensions/v1beta1\nkind: Deployment\n",
        "schemas",
        "no schema for 1.29",
    ),
    Breakage(
        "removed-api-pdb-policy-v1beta1",
        "base/poddisruptionbudgets.yaml",
        "apiVersion: policy/v1\nkind: PodDisruptionBudget\nmetadata:\n"
        "  name: registry-migrator-worker\n",
        "apiVersion: policy/v1beta1\nkind: PodDisruptionBudget\nmetadata:\n"
        "  name: registry-migrator-worker\n",
        "schemas",
        "no schema for 1.29",
    ),
    Breakage(
        "strict-schema-unknown-field",
        "base/serviceaccount.yaml",
        "automountServiceAccountToken: false",
        "automountServiceAccountTokens: false",
        "schemas",
        "invalid for 1.29",
    ),
    Breakage(
        "prometheusrule-unknown-field",
        "overlays/production/prometheusrule-registry-migrator.yaml",
        "    - alert: RegistryMigratorStalled\n      expr:",
        "    - alert: RegistryMigratorStalled\n      expression:",
        "schemas",
        "PrometheusRule/registry-migrator invalid at spec.groups.1.rules.0",
        overlay="production",
    ),
    Breakage(
        "yamllint-indentation",
        "base/serviceaccount.yaml",
        "  labels:\n    app.kubernetes.io/name",
        "  labels:\n     app.kubernetes.io/name",
        "yamllint",
        "(indentation)",
    ),
    Breakage(
        "yamllint-truthy",
        "base/kustomization.yaml",
        "includeSelectors: false",
        "includeSelectors: no",
        "yamllint",
        "(truthy)",
    ),
    Breakage(
        "missing-configmap",
        "base/worker.yaml",
        "name: registry-migrator\n                  key: WORKER_THREADS",
        "name: registry-migrator-settings\n                  key: WORKER_THREADS",
        "references",
        "'registry-migrator-settings' is not among the rendered ConfigMaps",
    ),
    Breakage(
        "missing-configmap-key",
        "base/worker.yaml",
        "key: WORKER_THREADS",
        "key: WORKER_THREAD",
        "references",
        "has no key 'WORKER_THREAD'",
    ),
    Breakage(
        "secret-not-operator-provided",
        "base/api.yaml",
        "name: registry-migrator\n                  key: notification-secret",
        "name: registry-migrator-api\n                  key: notification-secret",
        "references",
        "'registry-migrator-api' is not an operator-provided Secret",
    ),
    Breakage(
        "secret-key-not-documented",
        "base/api.yaml",
        "key: notification-secret",
        "key: notification-token",
        "references",
        "key 'notification-token' is not one the operator provides",
    ),
    Breakage(
        "secret-committed",
        "base/kustomization.yaml",
        "configMapGenerator:\n",
        "secretGenerator:\n  - name: registry-migrator\n    literals:\n"
        "      - database-url=postgresql://placeholder@postgres/migrator\n"
        "configMapGenerator:\n",
        "references",
        "never committed",
    ),
    Breakage(
        "probe-on-undeclared-port",
        "base/api.yaml",
        "path: /readyz\n              port: http",
        "path: /readyz\n              port: 9090",
        "probes",
        "port 9090 is not a declared port",
    ),
    Breakage(
        "worker-probe-on-undeclared-named-port",
        "base/worker.yaml",
        "tcpSocket:\n              port: metrics\n            initialDelaySeconds: 20",
        "tcpSocket:\n              port: metric\n            initialDelaySeconds: 20",
        "probes",
        "port 'metric' is not a declared port",
    ),
    Breakage(
        "probe-path-not-served",
        "base/api.yaml",
        "path: /readyz",
        "path: /ready",
        "probes",
        "path '/ready' is not served",
    ),
    Breakage(
        "service-target-port-undeclared",
        "base/api.yaml",
        "targetPort: http",
        "targetPort: web",
        "probes",
        "targetPort 'web' not declared",
    ),
    Breakage(
        "worker-grace-period-30s",
        "base/worker.yaml",
        "terminationGracePeriodSeconds: 660",
        "terminationGracePeriodSeconds: 30",
        "worker_grace_period",
        "terminationGracePeriodSeconds 30 is not above",
    ),
    Breakage(
        "worker-grace-period-default",
        "base/worker.yaml",
        "      terminationGracePeriodSeconds: 660\n",
        "",
        "worker_grace_period",
        "terminationGracePeriodSeconds 30 is not above",
    ),
    Breakage(
        "privileged-container",
        "base/worker.yaml",
        "privileged: false",
        "privileged: true",
        "security",
        "container worker: privileged",
    ),
    Breakage(
        "writable-root-filesystem",
        "base/scheduler.yaml",
        "readOnlyRootFilesystem: true",
        "readOnlyRootFilesystem: false",
        "security",
        "readOnlyRootFilesystem is not true",
    ),
    Breakage(
        "root-user",
        "base/db-upgrade-job.yaml",
        "            runAsUser: 10001\n",
        "            runAsUser: 0\n",
        "security",
        "runAsUser is 0",
    ),
    Breakage(
        "added-capability",
        "base/api.yaml",
        'drop: ["ALL"]',
        'drop: ["ALL"]\n              add: ["NET_ADMIN"]',
        "security",
        "adds capabilities",
    ),
    Breakage(
        "service-account-token-mounted",
        "base/worker.yaml",
        "      automountServiceAccountToken: false\n",
        "",
        "security",
        "automountServiceAccountToken is not false",
    ),
    Breakage(
        "prometheus-db-outside-emptydir",
        "base/worker.yaml",
        "value: /tmp/dramatiq-prometheus",
        "value: /var/lib/dramatiq-prometheus",
        "writable_paths",
        "'/var/lib/dramatiq-prometheus' is not on a writable emptyDir mount",
    ),
    Breakage(
        "missing-limits",
        "base/api.yaml",
        "            limits:\n              cpu: 500m\n              memory: 256Mi\n",
        "",
        "resources",
        "no limits.cpu",
    ),
    Breakage(
        "pdb-selector-mismatch",
        "base/poddisruptionbudgets.yaml",
        "      app.kubernetes.io/component: worker\n",
        "      app.kubernetes.io/component: worker-pool\n",
        "disruption_budgets",
        "selector matches no Deployment's pods",
    ),
    Breakage(
        "anti-affinity-selector-mismatch",
        "overlays/production/scheduler.yaml",
        "                  app.kubernetes.io/component: scheduler\n",
        "                  app.kubernetes.io/component: schedulers\n",
        "spread_selectors",
        "misses its pods",
        overlay="production",
    ),
    Breakage(
        "image-latest",
        "overlays/dev/kustomization.yaml",
        'newTag: "0.1.0"',
        "newTag: latest",
        "images_pinned",
        "has no pinned tag",
    ),
    Breakage(
        "egress-to-postgresql-closed",
        "base/networkpolicies.yaml",
        "        - {protocol: TCP, port: 5432}\n",
        "",
        "network_policies",
        "egress not allowed to ports [5432]",
    ),
    Breakage(
        "api-ingress-closed",
        "base/networkpolicies.yaml",
        "{protocol: TCP, port: 8080}",
        "{protocol: TCP, port: 8000}",
        "network_policies",
        "port 8080 of Deployment/registry-migrator-api is not open to ingress",
    ),
    Breakage(
        "pod-template-without-component-label",
        "base/scheduler.yaml",
        TEMPLATE_LABELS + "        app.kubernetes.io/component: scheduler\n",
        TEMPLATE_LABELS + "        app.kubernetes.io/role: scheduler\n",
        "labels",
        "pod template has no label app.kubernetes.io/component",
    ),
    Breakage(
        "argument-variable-undefined",
        "base/worker.yaml",
        '"--threads", "$(WORKER_THREADS)"',
        '"--threads", "$(WORKER_THREADZ)"',
        "argument_variables",
        "$(WORKER_THREADZ)",
    ),
]


def broken_copy(breakage: Breakage, destination: Path) -> Path:
    """Copy deploy/k8s to ``destination`` and apply ``breakage``; returns the copy's root."""
    root = destination / "k8s"
    shutil.copytree(K8S_DIR, root)
    path = root / breakage.file
    text = path.read_text()
    # Exactly once: a breakage that no longer applies must fail loudly, not pass vacuously.
    assert text.count(breakage.old) == 1, f"{breakage.id}: the text to break is not unique"
    path.write_text(text.replace(breakage.old, breakage.new))
    return root


def problems_of(breakage: Breakage, root: Path) -> list[str]:
    """Run the check ``breakage`` targets on the broken copy at ``root``."""
    if breakage.check == "yamllint":
        return checks.lint_yaml(root, config_file=root / ".yamllint")
    overlay = root / "overlays" / breakage.overlay
    if breakage.check == "render":
        with pytest.raises(checks.RenderError) as caught:
            checks.render(overlay)
        return [str(caught.value)]
    docs = checks.render(overlay)
    if breakage.check == "schemas":
        return checks.check_schemas(docs)
    return checks.SEMANTIC_CHECKS[breakage.check](docs)


def test_every_check_has_a_breakage() -> None:
    covered = {breakage.check for breakage in BREAKAGES}
    assert covered >= {*checks.SEMANTIC_CHECKS, "schemas", "yamllint", "render"}


@pytest.mark.parametrize("breakage", BREAKAGES, ids=lambda breakage: breakage.id)
def test_check_catches_broken_copy(breakage: Breakage, tmp_path: Path) -> None:
    problems = problems_of(breakage, broken_copy(breakage, tmp_path))
    assert any(breakage.expected in problem for problem in problems), problems
