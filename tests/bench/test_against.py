"""bench/against.py: the order of the runs, the figures it reads and compares, its arguments
(no servers), and one pair of real runs against this tree's own commit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import against

REPO = Path(__file__).resolve().parents[2]


def test_turns_alternate_which_tree_runs_first() -> None:
    assert against.turns(3) == [(0, 0), (0, 1), (1, 1), (1, 0), (2, 0), (2, 1)]
    # Each tree runs once per pair.
    for pair in range(3):
        assert sorted(side for p, side in against.turns(3) if p == pair) == [0, 1]


def test_lookup_follows_keys_and_list_indices() -> None:
    data = {"per_s": 64.5, "summary": [{"ratio": 3.2}, {"ratio": 5.8}], "ok": True, "n": "7"}
    assert against.lookup(data, "per_s") == 64.5
    assert against.lookup(data, "summary.1.ratio") == 5.8
    # Missing, out of range, or not a number: no value rather than a wrong one.
    assert against.lookup(data, "summary.2.ratio") is None
    assert against.lookup(data, "nope") is None
    assert against.lookup(data, "ok") is None
    assert against.lookup(data, "n") is None
    assert against.lookup(data, "per_s.x") is None


def test_compare_gives_ratios_per_pair_and_their_median() -> None:
    compared = against.compare("per_s", [27.4, 36.8, 27.8, 32.9], [66.8, 80.8, 70.6, 69.2])
    assert [round(r, 2) for r in compared["ratios"]] == [2.44, 2.2, 2.54, 2.1]
    assert round(compared["median"], 2) == 2.32
    assert (round(compared["min"], 2), round(compared["max"], 2)) == (2.1, 2.54)
    # A pair with a side missing (or a zero baseline) gives no ratio and is left out.
    partial = against.compare("x", [2.0, None, 0.0], [3.0, 1.0, 1.0])
    assert partial["ratios"] == [1.5, None, None]
    assert partial["median"] == partial["min"] == partial["max"] == 1.5
    assert against.compare("x", [None], [1.0])["median"] is None


def test_arguments_after_the_script_are_the_script_s() -> None:
    args = against.parse_args(["abc123", "--pairs", "3", "--", "pipeline.py", "--quick"])
    assert (args.baseline, args.pairs, args.script) == ("abc123", 3, "pipeline.py")
    assert args.args == ["--quick"]
    assert args.fields == ["per_s", "cpu_ms_per_repository"]
    named = against.parse_args(["abc123", "--field", "a.b", "claim", "--rounds", "2"])
    assert (named.script, named.fields, named.args) == ("claim.py", ["a.b"], ["--rounds", "2"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["HEAD", "--pairs", "0", "claim.py"], "--pairs must be at least 1"),
        (["HEAD", "nosuch.py"], "no benchmark bench/nosuch.py"),
        (["HEAD", "cli.py"], "cli.py has no default fields"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        against.parse_args(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_an_unknown_commit_is_refused_before_anything_runs() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "against.py"), "no-such-commit", "claim.py"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
        # No reachable services: the refusal must come before the stack is looked for.
        env={**os.environ, "MIGRATOR_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/x"},
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"bench/against.py: 'no-such-commit' names no commit of {REPO}"
    ]


def test_one_pair_against_this_commit(stack: dict[str, str]) -> None:
    """Both trees run claim.py --quick; each writes its result in its own tree, and the
    ratio of the two is computed from those files."""
    began = time.time()
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "against.py"), "HEAD", "--pairs", "1",
         "--", "claim.py", "--quick"],
        cwd=REPO, env={**os.environ, **stack}, capture_output=True, text=True, timeout=240,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((REPO / "bench" / "results" / "against-claim.json").read_text())
    assert result["headline"] == done.stdout.strip().splitlines()[-1]
    (compared,) = result["comparisons"]
    ours = json.loads((REPO / "bench" / "results" / "claim.json").read_text())
    assert (REPO / "bench" / "results" / "claim.json").stat().st_mtime >= began - 1
    # This tree's figure is the one its own run wrote; the baseline's came from the worktree.
    assert compared["ours"] == [ours["cpu_ratio_ours_over_raw"]]
    assert compared["baseline"][0] is not None and compared["baseline"][0] > 0
    assert compared["ratios"] == [compared["ours"][0] / compared["baseline"][0]]
    assert done.stdout.strip().splitlines()[-1].startswith(f"{compared['median']:.2f} x ")
    # The worktree is gone.
    listed = subprocess.run(
        ["git", "worktree", "list"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert "bench-against-" not in listed
