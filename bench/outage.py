"""A registry outage: what does it cost the migration, and how fast does it go on after?

For each fault class (``devtools.registry_outage.FAULTS``): the registry's process stopped, 503
on every start, every answer later than the client's timeout, a rotated token (401, then
``registry-migrator resume``), connections closed mid-answer, answers that are not the
API's. A local migration (simulator, API, scheduler, 2 ``dramatiq actors`` workers x 4
threads; capacity 5; breaker cap and repository backoff cap 4 s; client timeout 1 s) of
repositories with every path marker meets the fault from its first run, for 30 s. Measured:

- repositories skipped and retries charged while the fault lasted (must be 0);
- seconds from the registry's return (or the resume) to the first start it accepted (the
  bound: the breaker's cap + 5 s);
- whether every repository then ended as its path says, and aborts without a repository's
  own cause (must be none).

Usage::

    uv run python bench/outage.py            # a 30 s outage per fault class (~6 min)
    uv run python bench/outage.py --quick    # 8 s outages, 24 repositories (~4 min)
    uv run python bench/outage.py --faults down,401 --outage 60

Prints a table, writes bench/results/outage.json, and the headline as its last line.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import _common, support
from devtools.launcher import LocalMigration
from devtools.registry_outage import (
    BACKOFF_MAX,
    BREAKER_CAP,
    CLIENT_TIMEOUT,
    FAULTS,
    RESUME_BOUND_S,
    SLOW_ANSWER_S,
    migration_options,
    prepare,
    run_outage,
)
from devtools.seeding import seed_spread
from migration.store import Store


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="A registry outage per fault class: repositories skipped and retries "
        "charged meanwhile (must be 0), and seconds from its end to the first accepted start.",
        epilog="Example: uv run python bench/outage.py --quick",
    )
    parser.add_argument("--quick", action="store_true", help="8 s outages, 24 repositories")
    parser.add_argument("--outage", type=float, help="seconds each fault lasts (default 30)")
    parser.add_argument("--repositories", type=int, help="repositories per run (default 60)")
    parser.add_argument(
        "--faults",
        help=f"comma-separated fault classes (default all: {','.join(FAULTS)})",
    )
    args = parser.parse_args(argv)
    args.outage = args.outage if args.outage is not None else (8.0 if args.quick else 30.0)
    args.repositories = args.repositories or (24 if args.quick else 60)
    if args.outage <= 0 or args.repositories < 10:
        parser.error("--outage must be positive and --repositories at least 10")
    args.fault_list = (args.faults or ",".join(FAULTS)).split(",")
    unknown = [name for name in args.fault_list if name not in FAULTS]
    if unknown:
        parser.error(f"unknown fault class {unknown[0]!r}; known: {', '.join(FAULTS)}")
    return args


def one_outage(
    fault: str, args: argparse.Namespace, env: dict[str, str], log_dir: Path
) -> dict[str, Any]:
    """A fresh database and migration, one fault of ``args.outage`` seconds; its figures."""
    options = migration_options()
    with (
        _common.fresh_database(env["MIGRATOR_DATABASE_URL"], label="outage") as url,
        Store(url, max_size=4) as store,
    ):
        seed_spread(store, args.repositories, seed=11)
        prepare(store)
        run = LocalMigration(
            env={**env, "MIGRATOR_DATABASE_URL": url, **options.pop("env")},
            log_dir=log_dir / fault,
            **options,
        )
        run.start(timeout=120)
        try:
            outage = run_outage(run, store, url, FAULTS[fault], hold_s=args.outage)
        finally:
            run.stop(timeout=30)
            run.delete_queues()
    row = outage.row()
    row["what"] = FAULTS[fault].what
    _common.note(f"{fault}: {row}")
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    support.quiet_logs()
    env = _common.stack_env()
    machine = support.machine()
    began = time.monotonic()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-outage-") as logs:
        for fault in args.fault_list:
            rows.append(one_outage(fault, args, env, Path(logs)))
    headers = ["fault", "held s", "skipped", "charged", "claims undone", "resume s", "bound s",
               "terminal", "wrong end", "aborts w/o cause"]  # fmt: skip
    cells = [
        [r["fault"], r["held_s"], r["skipped_during"], r["retries_charged_during"],
         r["claims_undone_during"], r["resume_s"], RESUME_BOUND_S,
         f"{r['terminal']}/{r['total']}", len(r["wrong_end_state"]), r["charged_aborts"]]
        for r in rows
    ]  # fmt: skip
    print(_common.table(headers, cells))
    worst = max(rows, key=lambda r: r["resume_s"])
    skipped = sum(r["skipped_during"] for r in rows)
    charged = sum(r["retries_charged_during"] for r in rows)
    wrong = sum(len(r["wrong_end_state"]) for r in rows)
    bound = "met" if worst["resume_s"] <= RESUME_BOUND_S else "missed"
    headline = (
        f"{worst['resume_s']:.1f} s at most from the registry's return to the first accepted"
        f" start ({worst['fault']}; bound {RESUME_BOUND_S:g} s: {bound}) after {args.outage:g} s"
        f" outages of {len(rows)} fault classes; {skipped} repositories skipped, {charged}"
        f" retries charged during them; {wrong} ended other than their path says"
    )
    support.publish(
        "outage",
        {
            "benchmark": "outage",
            "settings": {
                "outage_s": args.outage,
                "repositories": args.repositories,
                "faults": args.fault_list,
                "breaker_cap_s": BREAKER_CAP,
                "backoff_max_s": BACKOFF_MAX,
                "client_timeout_s": CLIENT_TIMEOUT,
                "slow_answer_s": SLOW_ANSWER_S,
            },
            "machine": machine,
            "duration_s": time.monotonic() - began,
            "outages": rows,
            "headline": headline,
        },
    )
    failed = skipped or charged or wrong or bound == "missed"
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
