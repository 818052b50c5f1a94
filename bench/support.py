"""What the lease benchmarks share: the local stack, quiet logging, statistics, machine facts.

``from bench import support``: the repository root is on ``sys.path`` through the project's
editable install (``uv sync``), and no script in ``bench/`` is named like a package of the
project, so ``python bench/<name>.py`` and ``python -m bench.<name>`` both work.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shlex
import socket
import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

# The one parser of ``stack env`` output, tested in tests/test_stack.py.
from devtools.stack_env import parse_stack_env

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
STACK_SCRIPT = REPO_ROOT / "deploy" / "local" / "stack"
RESULTS_DIR = BENCH_DIR / "results"


# Where each service listens when its MIGRATOR_ variable is unset (the stack's fixed ports).
DEFAULTS = {
    "MIGRATOR_ETCD_ENDPOINTS": "127.0.0.1:23790",
    "MIGRATOR_DATABASE_URL": "postgresql://postgres@127.0.0.1:55432/migrator",
    "MIGRATOR_REDIS_URL": "redis://127.0.0.1:56379/0",
    "MIGRATOR_BROKER_URL": "amqp://guest:guest@127.0.0.1:56720/%2F?heartbeat=30",
}


def quiet_logs() -> None:
    """Keep the libraries' debug lines (session opened/closed...) out of the tables."""
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def _host_port(variable: str, value: str) -> tuple[str, int]:
    if variable == "MIGRATOR_ETCD_ENDPOINTS":
        host, _, port = value.split(",", maxsplit=1)[0].rpartition(":")
        return host, int(port)
    from urllib.parse import urlsplit

    parts = urlsplit(value)
    default = 5432 if "postgres" in value else 5672 if value.startswith("amqp") else 6379
    return parts.hostname or "127.0.0.1", parts.port or default


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def ensure_stack(needed: Sequence[str], *, with_redis: bool) -> dict[str, str]:
    """Addresses of the services in ``needed`` (MIGRATOR_ variable names), started if down.

    Values already in the environment win; missing ones come from ``deploy/local/stack env``.
    When a service does not accept connections, ``deploy/local/stack up`` (with
    ``--with-redis`` when asked) is run first.

    :param needed: the MIGRATOR_ variables the benchmark uses.
    :param with_redis: start Redis too.
    """
    values = {name: os.environ.get(name) or DEFAULTS[name] for name in needed}
    down = [name for name, value in values.items() if not _reachable(*_host_port(name, value))]
    if down:
        command = [str(STACK_SCRIPT), "up", *(["--with-redis"] if with_redis else [])]
        print(
            f"bench: {', '.join(down)} not reachable; running {shlex.join(command)}",
            file=sys.stderr,
        )
        subprocess.run(command, check=True, stdout=sys.stderr, timeout=600)
    stack_env = parse_stack_env(
        subprocess.run(
            [str(STACK_SCRIPT), "env"], check=True, capture_output=True, text=True, timeout=60
        ).stdout
    )
    for name in needed:
        values[name] = os.environ.get(name) or stack_env.get(name) or DEFAULTS[name]
        if not _reachable(*_host_port(name, values[name])):
            raise SystemExit(f"bench: {name}={values[name]} does not accept connections")
    return values


def parse_ttls(parser: argparse.ArgumentParser, text: str) -> list[int]:
    """A ``--ttls`` value (comma-separated seconds) as integers; a usage error unless each is
    an integer of at least 2 (etcd's minimum TTL).

    :param parser: the script's parser, whose ``error`` exits with status 2.
    :param text: the option's value.
    """
    try:
        ttls = [int(t) for t in text.split(",")]
    except ValueError:
        parser.error(f"--ttls must be comma-separated integers, not {text!r}")
    if any(t < 2 for t in ttls):
        parser.error("--ttls must be at least 2 (etcd's minimum)")
    return ttls


def etcd_endpoints(text: str) -> list[tuple[str, int]]:
    """``host:port,host:port`` as pairs."""
    return [(h, int(p)) for h, p in (item.rsplit(":", 1) for item in text.split(","))]


def percentile(sorted_values: Sequence[int], fraction: float) -> int:
    """Nearest-rank percentile of already sorted values (0 for none)."""
    if not sorted_values:
        return 0
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def machine() -> dict[str, Any]:
    """Facts that make numbers comparable: CPUs, load, Python and library versions."""
    versions: dict[str, str | None] = {}
    for package in ("etcd3", "grpcio", "protobuf", "dramatiq", "redis", "psycopg"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "host": socket.gethostname(),
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": versions,
    }


def write_json(name: str, data: dict[str, Any]) -> Path:
    """Write ``bench/results/<name>.json`` (git-ignored) and return its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def publish(name: str, data: dict[str, Any]) -> Path:
    """Write ``data`` as :func:`write_json` does, say where on stderr, print its headline.

    The headline (``data["headline"]``) is the last line on stdout: tests/bench checks that
    it begins with the headline number and equals the file's.

    :param name: the benchmark's name, the file's stem.
    :param data: the results, with a ``headline`` key.
    :returns: the file's path.
    """
    path = write_json(name, data)
    print(f"bench: wrote {path.relative_to(REPO_ROOT)}", file=sys.stderr, flush=True)
    print(data["headline"])
    return path
