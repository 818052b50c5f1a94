"""Reading ``deploy/local/stack env``: the local stack's addresses as ``MIGRATOR_*`` variables.

Shared by the test fixtures and the benchmarks::

    env = parse_stack_env(subprocess.run(["deploy/local/stack", "env"], ...).stdout)
    env["MIGRATOR_ETCD_ENDPOINTS"]  # "127.0.0.1:23790"
"""

from __future__ import annotations

import shlex


def parse_stack_env(text: str) -> dict[str, str]:
    """Parse the ``export NAME=value`` lines printed by ``deploy/local/stack env``.

    :param text: the command's standard output.
    :returns: the variables by name; lines that are not exports are ignored.
    """
    variables: dict[str, str] = {}
    for line in text.splitlines():
        words = shlex.split(line)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            name, _, value = words[1].partition("=")
            variables[name] = value
    return variables
