"""Each migration benchmark runs with ``--quick`` against the local stack and keeps its promises.

A benchmark's promises: exit status 0, ``bench/results/<name>.json`` written during the run
(with the headline it printed), and a last line beginning with the headline number. Speed is
not asserted here. claim.py, pipeline.py and cli.py (each well under a minute) run by default; the
two that start four workers or kill workers (about a minute each) are marked slow.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results"
NUMBER = re.compile(r"^-?\d+(\.\d+)?\b")


def _run(name: str, stack: dict[str, str], timeout: float) -> None:
    began = time.time()
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / f"{name}.py"), "--quick"],
        cwd=REPO,
        env={**os.environ, **stack},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"{name}: exit {done.returncode}\n{done.stderr[-3000:]}"
    lines = done.stdout.strip().splitlines()
    assert lines, f"{name} printed nothing"
    headline = lines[-1]
    assert NUMBER.match(headline), f"{name}: last line does not begin with a number: {headline!r}"
    result = RESULTS / f"{name}.json"
    assert result.stat().st_mtime >= began - 1, f"{result} was not written by this run"
    data = json.loads(result.read_text())
    assert data["headline"] == headline


def test_claim_quick(stack: dict[str, str]) -> None:
    _run("claim", stack, timeout=180)


def test_pipeline_quick(stack: dict[str, str]) -> None:
    _run("pipeline", stack, timeout=180)


def test_cli_quick(stack: dict[str, str]) -> None:
    _run("cli", stack, timeout=300)


@pytest.mark.slow
def test_throughput_quick(stack: dict[str, str]) -> None:
    _run("throughput", stack, timeout=240)


@pytest.mark.slow
def test_recovery_quick(stack: dict[str, str]) -> None:
    _run("recovery", stack, timeout=240)


@pytest.mark.slow
def test_outage_quick(stack: dict[str, str]) -> None:
    _run("outage", stack, timeout=600)


@pytest.mark.slow
def test_etcd_growth_quick(stack: dict[str, str]) -> None:
    _run("etcd_growth", stack, timeout=240)


@pytest.mark.slow
def test_etcd_batch_quick(stack: dict[str, str]) -> None:
    _run("etcd_batch", stack, timeout=120)
