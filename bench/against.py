"""One benchmark in two trees, taking turns: this tree's figures over another commit's.

    uv run python bench/against.py d2a6310 --pairs 4 -- pipeline.py --no-profile --repositories 1000

The other commit is checked out in a temporary ``git worktree`` (removed at the end) and both
trees run the same script with the same arguments, pair after pair, against the same local
stack. The order alternates (baseline first in the first pair, this tree first in the next)
so that a machine that slows or speeds up during the runs weighs on both sides alike: on two
shared cores the same code's figures move by 15 % and more within an hour (bench/README), so
a ratio means something only when its two sides ran side by side.

Each run writes ``bench/results/<script>.json`` in its own tree; the figures compared are
values of that file (``--field``, a dotted path; list items by index), by default the
script's headline figures (:data:`DEFAULT_FIELDS`). Printed: each pair's values and their
ratio (this tree over the baseline), then the median ratio and the range. Both trees run
with this tree's Python environment (the project's dependencies as ``uv sync`` installed
them), each importing its own code (``PYTHONPATH``): a baseline that needs other versions
of the libraries is not comparable this way.

Writes ``bench/results/against-<script>.json``; the last line is the headline, beginning with
the median ratio of the first field.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import _common, support

#: The figures compared when no ``--field`` is given: what each script's headline is about.
DEFAULT_FIELDS: dict[str, tuple[str, ...]] = {
    "pipeline": ("per_s", "cpu_ms_per_repository"),
    "claim": ("cpu_ratio_ours_over_raw",),
    # summary[1] is the start-bound workload (summary[0] the migration-bound one).
    "throughput": ("summary.1.ratio", "summary.0.ratio"),
}


class RunFailed(Exception):
    """A benchmark run exited non-zero or wrote no result. ``str()`` is one line."""


@dataclass(frozen=True)
class Side:
    """One of the two trees: ``label`` for the tables, ``root`` the checkout."""

    label: str
    root: Path


def turns(pairs: int) -> list[tuple[int, int]]:
    """The order of the runs: ``(pair, side)`` with side 0 the baseline, 1 this tree; the
    baseline first in even pairs, this tree first in odd ones."""
    order: list[tuple[int, int]] = []
    for pair in range(pairs):
        first = pair % 2
        order += [(pair, first), (pair, 1 - first)]
    return order


def lookup(data: Any, dotted: str) -> float | None:
    """The number at ``dotted`` (keys and list indices joined by dots) in ``data``; None
    when the path is missing there or its value is not a number."""
    value = data
    for part in dotted.split("."):
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def compare(field: str, baseline: Sequence[float | None], ours: Sequence[float | None]) -> dict:
    """One field's values side by side: per pair the ratio ours / baseline (None where
    either side has no value or the baseline's is 0), and their median, min and max."""
    ratios = [
        o / b if o is not None and b is not None and b != 0 else None
        for b, o in zip(baseline, ours, strict=True)
    ]
    known = [r for r in ratios if r is not None]
    return {
        "field": field,
        "baseline": list(baseline),
        "ours": list(ours),
        "ratios": ratios,
        "median": statistics.median(known) if known else None,
        "min": min(known) if known else None,
        "max": max(known) if known else None,
    }


def resolve(ref: str) -> str:
    """The commit ``ref`` names; :class:`RunFailed` when it names none."""
    found = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
        cwd=support.REPO_ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if found.returncode != 0:
        raise RunFailed(f"{ref!r} names no commit of {support.REPO_ROOT}")
    return found.stdout.strip()


@contextlib.contextmanager
def worktree(commit: str, *, label: str) -> Iterator[Side]:
    """``commit`` checked out, detached, in a temporary worktree of this repository;
    removed on the way out."""
    with tempfile.TemporaryDirectory(prefix="bench-against-") as parent:
        root = Path(parent) / commit[:10]
        subprocess.run(
            ["git", "worktree", "add", "--detach", "--quiet", str(root), commit],
            cwd=support.REPO_ROOT, check=True, capture_output=True,
        )  # fmt: skip
        try:
            yield Side(label=label, root=root)
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(root)],
                cwd=support.REPO_ROOT, check=False, capture_output=True,
            )  # fmt: skip


def run_once(side: Side, script: str, args: Sequence[str], env: dict[str, str]) -> dict:
    """Run ``bench/<script>`` of ``side`` with ``args``; its result file's contents."""
    path = side.root / "bench" / script
    if not path.is_file():
        raise RunFailed(f"{side.label} has no bench/{script}")
    result = side.root / "bench" / "results" / f"{Path(script).stem}.json"
    began = time.time()
    done = subprocess.run(
        [sys.executable, str(path), *args], cwd=side.root, capture_output=True, text=True,
        env={**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(side.root),
                                                                 env.get("PYTHONPATH")]))},
        check=False,
    )  # fmt: skip
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RunFailed(f"bench/{script} of {side.label} exited {done.returncode}: {last}")
    if not result.is_file() or result.stat().st_mtime < began - 1:
        raise RunFailed(f"bench/{script} of {side.label} wrote no {result.name}")
    data: dict = json.loads(result.read_text())
    return data


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/against.py",
        description=(
            "Run one benchmark script in this tree and in another commit's, taking turns, "
            "and print this tree's figures over the other's (ratios per pair, their median)."
        ),
        epilog=(
            "example: bench/against.py d2a6310 --pairs 4 -- pipeline.py --no-profile "
            "--repositories 1000. Default fields: "
            + "; ".join(
                f"{name}.py: {', '.join(fields)}" for name, fields in DEFAULT_FIELDS.items()
            )
        ),
    )
    parser.add_argument("baseline", help="the commit to compare with (any git revision)")
    parser.add_argument(
        "--pairs", type=int, default=2, help="runs of each tree, taking turns (default 2)"
    )
    parser.add_argument(
        "--field",
        action="append",
        dest="fields",
        metavar="PATH",
        help="a number in the result file to compare, as a dotted path (repeatable; "
        "default: the script's headline figures)",
    )
    parser.add_argument("script", help="the benchmark, a file in bench/ (e.g. pipeline.py)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments, after --")
    args = parser.parse_args(argv)
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    if args.args[:1] == ["--"]:
        args.args = args.args[1:]
    if not args.script.endswith(".py"):
        args.script += ".py"
    if not (support.BENCH_DIR / args.script).is_file():
        parser.error(f"no benchmark bench/{args.script}")
    stem = Path(args.script).stem
    if not args.fields:
        if stem not in DEFAULT_FIELDS:
            parser.error(f"{args.script} has no default fields: name them with --field")
        args.fields = list(DEFAULT_FIELDS[stem])
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stem = Path(args.script).stem
    try:
        commit = resolve(args.baseline)
    except RunFailed as error:
        print(f"bench/against.py: {error}", file=sys.stderr)
        return 2
    # Resolved once here: the baseline's own stack script might look elsewhere for them.
    env = {**os.environ, **_common.stack_env()}
    ours = Side(label="this tree", root=support.REPO_ROOT)
    began = time.monotonic()
    values: list[list[dict]] = [[{} for _ in range(args.pairs)] for _ in range(2)]
    try:
        with worktree(commit, label=args.baseline) as baseline:
            sides = (baseline, ours)
            for n, (pair, side) in enumerate(turns(args.pairs), start=1):
                data = run_once(sides[side], args.script, args.args, env)
                values[side][pair] = data
                figures = ", ".join(
                    f"{field} {_figure(lookup(data, field))}" for field in args.fields
                )
                _common.note(
                    f"run {n}/{2 * args.pairs} ({sides[side].label}, pair {pair + 1}): {figures}"
                )
    except RunFailed as error:
        print(f"bench/against.py: {error}", file=sys.stderr)
        return 1
    comparisons = [
        compare(
            field,
            [lookup(v, field) for v in values[0]],
            [lookup(v, field) for v in values[1]],
        )
        for field in args.fields
    ]
    rows = []
    for c in comparisons:
        for pair in range(args.pairs):
            rows.append([c["field"], pair + 1, c["baseline"][pair], c["ours"][pair],
                         c["ratios"][pair]])  # fmt: skip
        rows.append([c["field"], "median", "", "", c["median"]])
    print(_common.table(["field", "pair", args.baseline, "this tree", "this / baseline"], rows))
    first = comparisons[0]
    if first["median"] is None:
        print(f"bench/against.py: no run gave {first['field']}", file=sys.stderr)
        return 1
    rest = "; ".join(
        f"{c['field']} {c['median']:.2f} x ({c['min']:.2f}-{c['max']:.2f})"
        for c in comparisons[1:]
        if c["median"] is not None
    )
    headline = (
        f"{first['median']:.2f} x {args.script}'s {first['field']} in this tree over "
        f"{args.baseline}'s (median of {args.pairs} pair(s) taken in turn, "
        f"{first['min']:.2f}-{first['max']:.2f})" + (f"; {rest}" if rest else "")
    )
    support.publish(
        f"against-{stem}",
        {
            "benchmark": "against",
            "settings": {
                "baseline": args.baseline,
                "baseline_commit": commit,
                "script": args.script,
                "args": args.args,
                "pairs": args.pairs,
                "fields": args.fields,
            },
            "machine": support.machine(),
            "duration_s": time.monotonic() - began,
            "comparisons": comparisons,
            "headline": headline,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
