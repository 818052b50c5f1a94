"""Every command's --help shows an example (a newcomer copies it)."""

from __future__ import annotations

from collections.abc import Iterator

import click
import pytest
from click.testing import CliRunner

from service.cli import main


def _commands(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    # list_commands/get_command, not group.commands: the main group loads commands lazily.
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None, f"{' '.join((*path, name))} is listed but does not load"
        yield (*path, name)
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))


COMMANDS = [(), *_commands(main)]


def test_the_command_tree_is_not_trivial() -> None:
    names = {" ".join(path) for path in COMMANDS}
    assert {"status", "demo", "repositories show", "leases list", "settings set"} <= names


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "main")
def test_help_has_an_example(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output, f"`registry-migrator {' '.join(path)} --help` has no example"
    # The example names the command itself (a copied line works).
    example = result.output.split("Example", 1)[1]
    assert f"registry-migrator {' '.join(path)}".strip() in example
