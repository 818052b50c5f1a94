"""The command line answers at once: ``--help`` imports no heavy library.

Each case runs in a fresh interpreter (another test may have imported anything) and
reads ``sys.modules`` after click has printed the help.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import click
import pytest

from migration.store import Store
from service.cli import COMMANDS, main

#: What ``--help`` must not load: servers, clients, the simulator, structlog (it imports rich).
HEAVY = ("fastapi", "uvicorn", "grpc", "etcd3", "psycopg", "httpx", "dramatiq", "rich",
         "structlog", "pika", "actors", "leases", "migration.store",
         "devtools.simulator")  # fmt: skip

#: Commands whose --help may load more: the simulator's option defaults are its config's.
EXEMPT = {("simulator",)}

_PROBE = """
import json, sys
from service.cli import main
try:
    main(sys.argv[1:], prog_name="registry-migrator")
except SystemExit as exit:
    assert exit.code in (0, None), exit.code
print("\\n" + json.dumps(sorted(sys.modules)), file=sys.stderr)
"""


def _paths(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        yield (*path, name)
        if isinstance(command, click.Group):
            yield from _paths(command, (*path, name))


PATHS = [(), *(p for p in _paths(main) if p not in EXEMPT)]


def _modules_after(*args: str, env: dict[str, str] | None = None) -> set[str]:
    result = subprocess.run([sys.executable, "-c", _PROBE, *args], env=env,
                            capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    if "--help" in args:
        assert "Usage: registry-migrator" in result.stdout
    return set(json.loads(result.stderr.strip().splitlines()[-1]))


def _heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))


def test_the_probe_sees_heavy_modules() -> None:
    # The checks below could pass by looking at nothing: a module that does import them
    # must show up, and the exempt command's help does.
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, json, service.status;"
         "print(json.dumps(sorted(sys.modules)))"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert {"psycopg", "grpc", "etcd3", "leases"} <= set(_heavy(set(json.loads(loaded))))
    assert "devtools.simulator" in _heavy(_modules_after("simulator", "--help"))


def test_every_group_is_checked() -> None:
    checked = {" ".join(p) for p in PATHS}
    assert {"", "leases", "db", "repositories", "settings", "status", "leases list"} <= checked


@pytest.mark.parametrize("path", PATHS, ids=lambda p: " ".join(p) or "main")
def test_help_imports_nothing_heavy(path: tuple[str, ...]) -> None:
    assert _heavy(_modules_after(*path, "--help")) == []


def test_commands_load_only_what_they_use(store: Store, database_url: str) -> None:
    # Against the real stack: listing leases needs etcd only; status --json needs etcd and
    # PostgreSQL but neither rich (it renders nothing) nor structlog (it logs nothing).
    env = {**os.environ, "MIGRATOR_DATABASE_URL": database_url}
    listed = _modules_after("leases", "list", env=env)
    assert {"leases", "etcd3", "grpc"} <= listed
    assert not {"psycopg", "rich", "structlog", "fastapi", "dramatiq"} & listed
    status = _modules_after("status", "--json", env=env)
    assert {"psycopg", "leases", "etcd3"} <= status
    assert not {"rich", "structlog", "fastapi", "dramatiq", "uvicorn", "httpx"} & status


def test_main_help_loads_no_command_module() -> None:
    assert not {m for m in _modules_after("--help") if m.startswith("service.commands.")}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_listed_help_matches_the_command(name: str) -> None:
    # `registry-migrator --help` shows the table's line without importing the command;
    # it must say what the command's own docstring says.
    command = COMMANDS[name].load()
    listed = click.Command(name, help=COMMANDS[name].short_help)
    assert listed.get_short_help_str(200) == command.get_short_help_str(200)
    assert main.get_command(click.Context(main), name) is command
