"""How fast does ``registry-migrator`` answer? Each command's wall time over ``python -c pass``.

Every case is a fresh process, as an operator runs it: ``--help``, ``leases --help``,
``leases list`` and ``status --json`` (the last two against the local stack: a fresh
database with a few thousand repositories, three held leases under a private etcd
prefix), and ``python -c pass`` with the same interpreter. The cases are interleaved
within each repetition (the baseline before each of the others), so load on the machine
weighs on all of them alike; each figure is the median over the repetitions. Two figures
per case: wall time (the goals are wall-time ratios) and the process's CPU time (user +
system, from ``wait4``), which a loaded machine shakes much less.

Two modes, because Python's bytecode cache decides much of a start-up:

- ``compiled``: every module's bytecode is cached (a pycache prefix warmed first), as
  in the container image (``UV_COMPILE_BYTECODE=1``) or any second run of a normal
  install. The goals are checked here: ``--help`` ≤ 8 ×, ``leases list`` ≤ 20 ×,
  ``status --json`` ≤ 25 ×.
- ``source``: the standard library's bytecode is cached, nothing else (the project and
  its libraries are compiled at every start), as with ``PYTHONDONTWRITEBYTECODE=1`` and a
  fresh virtualenv: the set-up in which issue 14 measured 72 × for ``--help``.

Usage::

    uv run python bench/cli.py                      # 7 repetitions per mode (~1-2 min)
    uv run python bench/cli.py --quick              # 3 repetitions
    uv run python bench/cli.py --executable /tmp/old/.venv/bin/registry-migrator
                                                    # another checkout (before/after)

Prints a table per mode, writes bench/results/cli.json, and the headline as its last line.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import support
from bench._common import add_repositories, fresh_database, note, stack_env, table

BASELINE = "python -c pass"
#: Case name → the command's arguments (None: the baseline, ``python -c pass``).
CASES: dict[str, list[str] | None] = {
    BASELINE: None,
    "--help": ["--help"],
    "leases --help": ["leases", "--help"],
    "leases list": ["leases", "list"],
    "status --json": ["status", "--json"],
}
#: The goals of issue 14 §5, as ratios to the baseline (compiled mode).
GOALS = {"--help": 8.0, "leases list": 20.0, "status --json": 25.0}
HELD_LEASES = (1, 2, 3)
_IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)")


@dataclass(frozen=True)
class Timing:
    """One run: wall-clock seconds and the child's CPU seconds (user + system)."""

    wall: float
    cpu: float


class Unit:
    """One ``registry-migrator`` installation: its console script and its interpreter.

    :param executable: the console script.
    :param env: the environment of every run (stack addresses, database, etcd prefix).
    """

    def __init__(self, executable: Path, env: dict[str, str]) -> None:
        self.executable = executable
        self.python = executable.parent / "python"
        self.env = env

    def argv(self, case: str) -> list[str]:
        arguments = CASES[case]
        if arguments is None:
            return [str(self.python), "-c", "pass"]
        return [str(self.executable), *arguments]

    def run(self, argv: list[str], mode_env: dict[str, str]) -> Timing:
        """Wall and CPU seconds of ``argv``; exit on a failure (a broken case measures nothing)."""
        env = {**self.env, **mode_env}
        if "PYTHONDONTWRITEBYTECODE" not in mode_env:
            env.pop("PYTHONDONTWRITEBYTECODE", None)
        began = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
        assert proc.stderr is not None
        errors = proc.stderr.read()  # small; read to the end, which is the child's exit
        # wait4: the child's own CPU time (user + system), which the machine's load shakes
        # far less than the wall time.
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - began
        proc.returncode = os.waitstatus_to_exitcode(status)
        proc.stderr.close()
        if proc.returncode != 0:
            raise SystemExit(f"bench: {' '.join(argv)} exited {proc.returncode}: "
                             f"{errors.strip()[-500:]}")  # fmt: skip
        return Timing(wall=wall, cpu=usage.ru_utime + usage.ru_stime)


def _stdlib_modules(unit: Unit, cache: Path) -> list[str]:
    """The modules every case imports (``-X importtime``); the warm-up compiles the stdlib's."""
    names: set[str] = set()
    for case in CASES:
        argv = unit.argv(case)
        if argv[0] != str(unit.python):
            argv = [str(unit.python), *argv]  # the console script is a Python file
        done = subprocess.run([argv[0], "-X", "importtime", *argv[1:]],
                              env={**unit.env, "PYTHONPYCACHEPREFIX": str(cache)},
                              capture_output=True, text=True, check=False, timeout=120)  # fmt: skip
        names.update(m.group(1) for m in map(_IMPORT_LINE.match, done.stderr.splitlines()) if m)
    return sorted(names)


_COMPILE_STDLIB = """
import importlib, importlib.util, py_compile, sys, sysconfig
stdlib = sysconfig.get_paths()["stdlib"] + "/"
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception:
        pass
for module in list(sys.modules.values()):
    path = getattr(module, "__file__", None) or ""
    if path.startswith(stdlib) and "site-packages" not in path and path.endswith(".py"):
        py_compile.compile(path, cfile=importlib.util.cache_from_source(path))
"""


def mode_environments(unit: Unit, workdir: Path) -> dict[str, dict[str, str]]:
    """The two modes' variables, their pycache prefixes warmed."""
    compiled = {"PYTHONPYCACHEPREFIX": str(workdir / "compiled")}
    source = {"PYTHONPYCACHEPREFIX": str(workdir / "stdlib"), "PYTHONDONTWRITEBYTECODE": "1"}
    for rid in HELD_LEASES:  # something for `leases list` and `status` to list
        unit.run([str(unit.executable), "leases", "take", str(rid), "--ttl", "600"], compiled)
    note("warming the bytecode caches (every case once per mode)")
    for case in CASES:
        unit.run(unit.argv(case), compiled)
    names = _stdlib_modules(unit, workdir / "scratch")
    # Bytecode of the standard library only: import the modules the cases import, then
    # compile those that live in the stdlib into the prefix (nothing else is written).
    subprocess.run([str(unit.python), "-c", _COMPILE_STDLIB, *names],
                   env={**unit.env, **source}, capture_output=True, check=True,
                   timeout=300)  # fmt: skip
    for case in CASES:
        unit.run(unit.argv(case), source)
    return {"compiled": compiled, "source": source}


def measure(unit: Unit, mode_env: dict[str, str], repeat: int) -> dict[str, list[Timing]]:
    """Timings per case, ``repeat`` interleaved rounds.

    The baseline runs before every other case: at 30 ms it is the figure most shaken by
    the machine's load, and every ratio divides by it.
    """
    timings: dict[str, list[Timing]] = {case: [] for case in CASES}
    for _ in range(repeat):
        for case in CASES:
            if case != BASELINE:
                timings[BASELINE].append(unit.run(unit.argv(BASELINE), mode_env))
                timings[case].append(unit.run(unit.argv(case), mode_env))
    return timings


def summarize(timings: dict[str, list[Timing]]) -> list[dict[str, Any]]:
    """Per case: median wall and CPU seconds and their ratios to the baseline's medians."""
    base_wall = statistics.median(t.wall for t in timings[BASELINE])
    base_cpu = statistics.median(t.cpu for t in timings[BASELINE])
    rows = []
    for case, values in timings.items():
        wall = statistics.median(t.wall for t in values)
        cpu = statistics.median(t.cpu for t in values)
        goal = GOALS.get(case)
        rows.append({"case": case, "median_s": wall, "min_s": min(t.wall for t in values),
                     "max_s": max(t.wall for t in values), "ratio": wall / base_wall,
                     "cpu_median_s": cpu, "cpu_ratio": cpu / base_cpu, "goal": goal,
                     "met": None if goal is None else wall / base_wall <= goal,
                     "wall_s": [t.wall for t in values],
                     "cpu_s": [t.cpu for t in values]})  # fmt: skip
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Wall time of registry-migrator commands as ratios to `python -c pass`."
    )
    parser.add_argument("--quick", action="store_true", help="3 repetitions per mode")
    parser.add_argument("--repeat", type=int, help="repetitions per mode (default 7, --quick 3)")
    parser.add_argument("--modes", default="compiled,source",
                        help="comma-separated: compiled, source (default both)")  # fmt: skip
    parser.add_argument("--executable", type=Path,
                        default=Path(sys.executable).parent / "registry-migrator",
                        help="the console script to time (default: this virtualenv's)")  # fmt: skip
    parser.add_argument("--repositories", type=int, default=5000,
                        help="rows in the database status reads (default 5000)")  # fmt: skip
    args = parser.parse_args(argv)
    args.repeat = args.repeat or (3 if args.quick else 7)
    if args.repeat <= 0:
        parser.error("--repeat must be positive")
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.mode_list or set(args.mode_list) - {"compiled", "source"}:
        parser.error(f"--modes: expected compiled and/or source, got {args.modes!r}")
    if not args.executable.exists():
        parser.error(f"--executable: {args.executable} does not exist")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    support.quiet_logs()
    stack = stack_env()
    machine = support.machine()
    began = time.monotonic()
    prefix = f"/bench-cli-{uuid.uuid4().hex[:8]}"
    results: dict[str, list[dict[str, Any]]] = {}
    with fresh_database(stack["MIGRATOR_DATABASE_URL"], label="cli") as url, \
            tempfile.TemporaryDirectory(prefix="bench-cli-") as workdir:  # fmt: skip
        add_repositories(
            url, (f"bench-cli/group-{n % 50}/app-{n}" for n in range(args.repositories))
        )
        env = {**os.environ, **stack, "MIGRATOR_DATABASE_URL": url, "MIGRATOR_ETCD_PREFIX": prefix}
        unit = Unit(args.executable, env)
        try:
            modes = mode_environments(unit, Path(workdir))
            for mode in args.mode_list:
                note(f"{mode}: {args.repeat} rounds of {len(CASES)} cases")
                results[mode] = summarize(measure(unit, modes[mode], args.repeat))
        finally:
            for rid in HELD_LEASES:
                subprocess.run([str(args.executable), "leases", "release", str(rid)], env=env,
                               capture_output=True, check=False, timeout=60)  # fmt: skip

    for mode, rows in results.items():
        print(f"\n{mode} ({args.repeat} rounds; ratio = median / median of python -c pass)")
        print(table(["case", "wall s", "min s", "max s", "ratio", "goal", "", "CPU s",
                     "CPU ratio"],
                    [[r["case"], r["median_s"], r["min_s"], r["max_s"], f"{r['ratio']:.1f} ×",
                      f"≤ {r['goal']:g} ×" if r["goal"] else "",
                      "" if r["met"] is None else "met" if r["met"] else "MISSED",
                      r["cpu_median_s"], f"{r['cpu_ratio']:.1f} ×"]
                     for r in rows]))  # fmt: skip
    first = "compiled" if "compiled" in results else args.mode_list[0]
    by_case = {r["case"]: r for r in results[first]}
    headline = ", ".join(f"{by_case[c]['ratio']:.1f} × {c}" for c in GOALS) + f" ({first}"
    if first == "compiled":
        missed = [c for c in GOALS if not by_case[c]["met"]]
        headline += "; goals " + ("met" if not missed else "missed: " + ", ".join(missed))
    headline += ")"
    print()
    support.publish("cli", {
        "benchmark": "cli",
        "settings": {"repeat": args.repeat, "modes": args.mode_list,
                     "executable": str(args.executable), "repositories": args.repositories,
                     "held_leases": len(HELD_LEASES)},
        "machine": machine,
        "duration_s": time.monotonic() - began,
        "results": results,
        "headline": headline,
    })  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
