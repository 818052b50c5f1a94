"""etcd bytes and revisions per migrated repository, before and after compaction.

Every hold, release and gate marker is an etcd write, and etcd keeps every write's old
version until its history is compacted. This migrates N repositories (the simulator, 2
workers, the API, a scheduler; PostgreSQL and RabbitMQ of the local stack) against a
**private** one-member etcd without auto-compaction, so that nobody else's writes are
counted, and reads etcd's maintenance status before and after:

- revisions per repository (each is one write), split by key (leases, gate markers,
  scheduler election) from the history itself (a watch from the first revision);
- database bytes (``dbSize``, what ``--quota-backend-bytes`` counts) per repository;
- then compacts at the last revision: bytes in use per repository (``dbSizeInUse``), and
  after a defragmentation the database's bytes per repository again.

From these it projects a 1,000,000-repository migration without compaction, and the bound
the local stack's auto-compaction (revision mode, 10,000 revisions kept, every 5 minutes)
sets at the measured rate.

Usage::

    uv run python bench/etcd_growth.py            # 600 repositories, about 2 minutes
    uv run python bench/etcd_growth.py --quick    # 150 repositories, under a minute

Prints a table, writes bench/results/etcd_growth.json, and the headline as its last line.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import etcd3

from bench import _common, support
from devtools.launcher import LocalMigration
from devtools.servers import EtcdCluster
from leases import EtcdClient, EtcdStatus
from migration.store import Store

WORKERS = 2
THREADS = 4
CAPACITY = 20
#: The local stack's etcd (deploy/local/stack): revision auto-compaction keeping this many
#: revisions, which etcd 3.4 applies every 5 minutes.
STACK_RETENTION = 10_000
COMPACTION_PERIOD_S = 300
#: etcd's default --quota-backend-bytes (2 GiB).
DEFAULT_QUOTA = 2 * 1024**3


def history_by_key(host: str, port: int, prefix: str, first: int, last: int) -> Counter[str]:
    """Writes under ``prefix`` from revision ``first`` to ``last``, by the key's kind
    (the path part after the prefix: leases, gates, elections), from a watch of the history."""
    kinds: Counter[str] = Counter()
    client = etcd3.client(host=host, port=port)
    events, cancel = client.watch_prefix(prefix, start_revision=first)
    done = threading.Event()

    def stop_later() -> None:  # a watch only ends when cancelled
        if not done.wait(60):
            cancel()

    threading.Thread(target=stop_later, daemon=True).start()
    try:
        for event in events:
            kinds[event.key.decode()[len(prefix) :].lstrip("/").split("/", 1)[0]] += 1
            if event.mod_revision >= last:
                break
    finally:
        done.set()
        cancel()
        # Not closed: python-etcd3's watcher thread would re-open its stream on the closed
        # channel and die with a traceback; the daemon thread ends with the process.
    return kinds


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="etcd revisions and bytes per migrated repository, before and after "
        "compaction, against a private etcd.",
        epilog="Example: uv run python bench/etcd_growth.py --quick",
    )
    parser.add_argument("--quick", action="store_true", help="150 repositories")
    parser.add_argument("--repositories", type=int, help="default 600 (--quick 150)")
    args = parser.parse_args(argv)
    args.repositories = args.repositories or (150 if args.quick else 600)
    if args.repositories < 1:
        parser.error("--repositories must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    support.quiet_logs()
    env = _common.stack_env()
    machine = support.machine()
    began = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="bench-etcd-growth-") as scratch,
        EtcdCluster(members=1, data_root=Path(scratch) / "etcd") as etcd,
        _common.fresh_database(env["MIGRATOR_DATABASE_URL"], label="etcd_growth") as url,
        Store(url, max_size=4) as store,
    ):
        host, port_text = etcd.endpoints[0].rsplit(":", 1)
        client = EtcdClient([(host, int(port_text))], timeout=10)
        store.update_settings(
            enabled=False, capacity=CAPACITY, enqueue_interval=1, guard_interval=30,
            max_step_duration=120,
        )  # fmt: skip
        ids = _common.add_repositories(
            url, (f"bench/etcd-growth/repo-{i}" for i in range(args.repositories))
        )
        run = LocalMigration(
            env={
                **env,
                "MIGRATOR_DATABASE_URL": url,
                "MIGRATOR_ETCD_ENDPOINTS": etcd.endpoints[0],
                "MIGRATOR_LOG_LEVEL": "info",
            },
            log_dir=Path(scratch) / "logs", workers=WORKERS, threads=THREADS, lease_ttl=10,
            simulator_args=["--pre-import-seconds", "0.05", "0.2", "--import-seconds", "0.05",
                            "0.2", "--log-level", "warning"],
        )  # fmt: skip
        prefix = run.env["MIGRATOR_ETCD_PREFIX"]
        _common.note(f"migrating {len(ids)} repositories against a private etcd...")
        run.start(timeout=120)
        try:
            start = client.status()
            store.update_settings(enabled=True)
            _common.wait_until(
                lambda: _common.terminal_count(url, ids) == len(ids),
                timeout=120 + 2 * len(ids),
                what="every repository terminal",
                interval=0.5,
            )
        finally:
            run.stop(timeout=30)  # revokes the sessions: their deletes count too
            run.delete_queues()
        end = client.status()
        span = _common.event_span(url, ids)
        seconds = (span[1] - span[0]).total_seconds() if span else 0.0
        kinds = history_by_key(host, int(port_text), prefix, start.revision + 1, end.revision)
        client.compact(end.revision)
        compacted = client.status()
        client.defragment()
        defragmented = client.status()
        client.close()
    count = len(ids)
    revisions = end.revision - start.revision
    grown = end.db_size - start.db_size
    per_repo = revisions / count
    bytes_per_repo = grown / count
    bytes_per_revision = grown / revisions if revisions else 0.0
    rate = count / seconds if seconds else 0.0
    # Without compaction: the history of every repository stays.
    million_bytes = 1_000_000 * bytes_per_repo
    full_after = DEFAULT_QUOTA / bytes_per_repo if bytes_per_repo else 0.0
    # With the stack's compaction: at most the retained revisions plus 5 minutes of writes.
    bound_revisions = STACK_RETENTION + rate * COMPACTION_PERIOD_S * per_repo
    bound_bytes = bound_revisions * bytes_per_revision

    def row(label: str, status: EtcdStatus) -> list[object]:
        return [
            label,
            status.revision,
            status.db_size,
            status.db_size_in_use,
            (status.db_size - start.db_size) / count,
            (status.db_size_in_use - start.db_size_in_use) / count,
        ]

    print(f"\n{count} repositories migrated in {seconds:.1f} s ({rate:.1f}/s), private etcd")
    print(_common.table(
        ["etcd", "revision", "db bytes", "in use", "db B/repo", "in use B/repo"],
        [row("before the run", start), row("after the run", end),
         row("compacted", compacted), row("defragmented", defragmented)],
    ))  # fmt: skip
    print(_common.table(
        ["writes by key", "count", "per repository"],
        [[k, n, n / count] for k, n in kinds.most_common()],
    ))  # fmt: skip
    print(
        f"\nwithout compaction: {per_repo:.1f} revisions and {bytes_per_repo:.0f} bytes per"
        f" repository ({bytes_per_revision:.0f} B a revision); 1,000,000 repositories:"
        f" {million_bytes / 1e9:.1f} GB; the default 2 GiB quota is full after"
        f" {full_after:,.0f} repositories"
    )
    print(
        f"with the local stack's auto-compaction (revision, {STACK_RETENTION} kept, every"
        f" {COMPACTION_PERIOD_S} s) at {rate:.1f} repositories/s: at most"
        f" {bound_revisions:,.0f} revisions, about {bound_bytes / 1e6:.1f} MB of history,"
        f" whatever the number of repositories"
    )
    headline = (
        f"{bytes_per_repo:.0f} etcd bytes and {per_repo:.1f} revisions per migrated repository"
        f" without compaction ({million_bytes / 1e9:.1f} GB per million); after compaction and"
        f" defragmentation {(defragmented.db_size - start.db_size) / count:.0f} B per repository"
    )
    data: dict[str, Any] = {
        "benchmark": "etcd_growth",
        "settings": {"repositories": count, "workers": WORKERS, "threads": THREADS},
        "machine": machine,
        "duration_s": time.monotonic() - began,
        "seconds": seconds,
        "per_s": rate,
        "status": {
            name: {
                "revision": s.revision,
                "db_size": s.db_size,
                "db_size_in_use": s.db_size_in_use,
            }
            for name, s in (
                ("start", start),
                ("end", end),
                ("compacted", compacted),
                ("defragmented", defragmented),
            )
        },
        "revisions_per_repository": per_repo,
        "bytes_per_repository": bytes_per_repo,
        "bytes_per_revision": bytes_per_revision,
        "writes_by_key": dict(kinds),
        "million_repositories_bytes": million_bytes,
        "default_quota_full_after_repositories": full_after,
        "stack_compaction_bound_bytes": bound_bytes,
        "headline": headline,
    }
    support.publish("etcd_growth", data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
