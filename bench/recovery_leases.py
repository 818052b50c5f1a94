"""How soon is a key free again after its holder dies? SIGKILL and graceful close.

A child process takes a key on its own Session (kept alive in the background) and keeps it.
The benchmark then either kills the child with SIGKILL, or asks it to close its session
gracefully, and measures the time until a session in this process acquires the key, trying
every 20 ms. After a SIGKILL the key goes with the child's lease, at most TTL seconds after
the child's last keep-alive (the design's invariant 4 allows TTL + 1 s); a graceful close
revokes the lease at once.

Usage::

    uv run python bench/recovery_leases.py           # TTL 3 and 10, 3 trials each (~1 min)
    uv run python bench/recovery_leases.py --quick   # TTL 3 only, 2 trials

Prints a table, writes bench/results/recovery_leases.json, and the headline as its last line.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from bench import support
from leases import EtcdClient, HolderInfo, Session, try_acquire

POLL_INTERVAL = 0.02


def child(key: str, ttl: int, endpoints: str) -> int:
    """Hold ``key`` on a session of ``ttl`` until killed, or until 'close' on stdin."""
    client = EtcdClient(support.etcd_endpoints(endpoints), timeout=5)
    session = Session(client, ttl=ttl)
    acquisition = try_acquire(session, key, holder=HolderInfo(actor="recovery-bench-child"))
    if acquisition.hold is None:
        print("busy", flush=True)
        return 1
    print(f"acquired {acquisition.hold.token}", flush=True)
    for line in sys.stdin:
        if line.strip() == "close":
            session.close()  # revokes the lease: the key vanishes at once
            print("closed", flush=True)
            return 0
    return 0


class Holder:
    """A child process holding one key."""

    def __init__(self, *, key: str, ttl: int, endpoints: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--child", key, "--ttl", str(ttl)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "MIGRATOR_ETCD_ENDPOINTS": endpoints},
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.startswith("acquired"):
            self.proc.kill()
            raise SystemExit(f"bench: the child did not take {key}: {line!r}")
        self.token = int(line.split()[1])

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)

    def ask_close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("close\n")
        self.proc.stdin.flush()

    def reap(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def wait_acquire(session: Session, key: str, *, since: float, limit: float) -> tuple[float, int]:
    """Try ``key`` every 20 ms until taken; ``(seconds since since, attempts)``."""
    attempts = 0
    next_try = time.perf_counter()
    while True:
        attempts += 1
        acquisition = try_acquire(session, key, holder=HolderInfo(actor="recovery-bench"))
        taken = time.perf_counter()
        if acquisition.hold is not None:
            acquisition.hold.release()
            return taken - since, attempts
        if taken - since > limit:
            raise SystemExit(f"bench: {key} still held {limit:.0f} s after its holder went away")
        next_try += POLL_INTERVAL
        time.sleep(max(0.0, next_try - time.perf_counter()))


def trial(
    *, session: Session, endpoints: str, prefix: str, ttl: int, graceful: bool, number: int
) -> dict[str, Any]:
    key = f"{prefix}/{'close' if graceful else 'kill'}-ttl{ttl}-{number}"
    holder = Holder(key=key, ttl=ttl, endpoints=endpoints)
    try:
        # Strike at a random point of the child's keep-alive cycle (it refreshes every TTL/3).
        time.sleep(0.5 + random.uniform(0, ttl / 3))
        if try_acquire(session, key).hold is not None:
            raise SystemExit(f"bench: {key} was free while the child held it")
        since = time.perf_counter()
        if graceful:
            holder.ask_close()
        else:
            holder.kill()
        seconds, attempts = wait_acquire(session, key, since=since, limit=ttl + 15)
    finally:
        holder.reap()
    return {
        "scenario": "graceful close" if graceful else "SIGKILL",
        "ttl": ttl,
        "trial": number,
        "seconds": seconds,
        "attempts": attempts,
        "within_ttl_plus_1s": seconds <= ttl + 1,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time from a lease holder's SIGKILL (or graceful close) until another "
        "session acquires its key.",
        epilog="Example: uv run python bench/recovery_leases.py --quick",
    )
    parser.add_argument("--quick", action="store_true", help="TTL 3 only, 2 trials each")
    parser.add_argument("--trials", type=int, help="trials per TTL (default 3, --quick 2)")
    parser.add_argument("--ttls", help="comma-separated TTLs in seconds (default 3,10)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the kill timing")
    parser.add_argument("--child", metavar="KEY", help=argparse.SUPPRESS)
    parser.add_argument("--ttl", type=int, default=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.trials is None:
        args.trials = 2 if args.quick else 3
    if args.trials <= 0:
        parser.error("--trials must be positive")
    args.ttl_list = support.parse_ttls(parser, args.ttls or ("3" if args.quick else "3,10"))
    return args


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, int], list[float]] = {}
    for row in rows:
        groups.setdefault((row["scenario"], row["ttl"]), []).append(row["seconds"])
    return [
        {
            "scenario": scenario,
            "ttl": ttl,
            "trials_s": values,
            "min_s": min(values),
            "median_s": statistics.median(values),
            "max_s": max(values),
            "all_within_ttl_plus_1s": all(v <= ttl + 1 for v in values),
        }
        for (scenario, ttl), values in groups.items()
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    support.quiet_logs()
    if args.child:
        return child(args.child, args.ttl, os.environ["MIGRATOR_ETCD_ENDPOINTS"])
    random.seed(args.seed)
    env = support.ensure_stack(["MIGRATOR_ETCD_ENDPOINTS"], with_redis=False)
    endpoints = env["MIGRATOR_ETCD_ENDPOINTS"]
    prefix = f"/bench-recovery-{uuid.uuid4().hex[:8]}"
    machine = support.machine()
    began = time.monotonic()
    rows: list[dict[str, Any]] = []
    client = EtcdClient(support.etcd_endpoints(endpoints), timeout=5)
    with Session(client, ttl=10) as session:
        for number in range(args.trials):
            for ttl in args.ttl_list:
                rows.append(
                    trial(
                        session=session,
                        endpoints=endpoints,
                        prefix=prefix,
                        ttl=ttl,
                        graceful=False,
                        number=number,
                    )
                )
                print(
                    f"bench: SIGKILL at TTL {ttl}, trial {number + 1}: {rows[-1]['seconds']:.2f} s",
                    file=sys.stderr,
                )
            rows.append(
                trial(
                    session=session,
                    endpoints=endpoints,
                    prefix=prefix,
                    ttl=min(args.ttl_list),
                    graceful=True,
                    number=number,
                )
            )
    client.close()

    summary = summarize(rows)
    print(
        f"{'scenario':<15} {'TTL s':>5} {'median s':>9} {'min s':>7} {'max s':>7} "
        f"{'<= TTL+1 s':>10}  trials s"
    )
    for group in summary:
        print(
            f"{group['scenario']:<15} {group['ttl']:>5} {group['median_s']:>9.2f} "
            f"{group['min_s']:>7.2f} {group['max_s']:>7.2f} "
            f"{'yes' if group['all_within_ttl_plus_1s'] else 'NO':>10}  "
            + ", ".join(f"{v:.2f}" for v in group["trials_s"])
        )
    kills = {g["ttl"]: g["median_s"] for g in summary if g["scenario"] == "SIGKILL"}
    closes = [g["median_s"] for g in summary if g["scenario"] == "graceful close"]
    first, *others = sorted(kills)
    headline = f"{kills[first]:.1f} s SIGKILL-to-reacquire at TTL {first}"
    if others:
        headline += " (" + ", ".join(f"{kills[t]:.1f} s at TTL {t}" for t in others) + ")"
    headline += f"; {closes[0]:.2f} s after graceful close"
    support.publish(
        "recovery_leases",
        {
            "benchmark": "recovery_leases",
            "settings": {
                "trials": args.trials,
                "ttls": args.ttl_list,
                "poll_interval_s": POLL_INTERVAL,
                "seed": args.seed,
                "etcd_endpoints": endpoints,
            },
            "machine": machine,
            "duration_s": time.monotonic() - began,
            "trials": rows,
            "summary": summary,
            "headline": headline,
        },
    )
    return 0 if all(g["all_within_ttl_plus_1s"] for g in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
