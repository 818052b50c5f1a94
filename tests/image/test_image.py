"""The image of deploy/Containerfile, built, then run the way the Kubernetes manifests run it.

``deploy/local/image build`` (what ``make image`` runs) builds it. podman then runs, from the
image, ``registry-migrator db upgrade`` on a fresh database, a worker (``dramatiq actors``
with its Prometheus exporter keeping its files under /tmp, as deploy/k8s/base/worker.yaml
sets it), the notification API and the scheduler against the shared local stack. Each runs
as uid 10001 with a read-only root file system, only /tmp writable (a tmpfs, as the
manifests' emptyDir) and every capability dropped. The simulator runs from this virtualenv.

Slow (``--long``): where no registry can be reached, a cold build makes a Debian 12 base with
debootstrap and downloads every locked dependency: 5 to 10 minutes on the shared development
machine (the whole module 655 s cold), too much for CI's budget. With the image's layers
cached the build takes 9-18 s and the module about a minute.
"""

from __future__ import annotations

import errno
import os
import resource
import shutil
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from devtools.launcher import LocalMigration, free_port
from migration.states import State
from migration.store import Store, schema_files
from tests.conftest import REPO_ROOT
from tests.fixtures import seed_spread, wait_until
from tests.invariants import all_terminal, stale_accepted_writes
from tests.k8s.manifest_checks import RUN_AS_USER

# A cold build (the module's fixture) alone can take 8 minutes here: more than the
# default 300 s of pytest-timeout, which counts a test's fixture set-up too.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

IMAGE_SCRIPT = REPO_ROOT / "deploy" / "local" / "image"
CONTAINER_PREFIX = "migrator-image-test"


@dataclass(frozen=True)
class Podman:
    """``podman run`` of the built image with the manifests' restrictions.

    :param image: the image's name (``registry-migrator:VERSION``).
    :param run_id: part of every container's name, so a teardown removes only its own.
    :param options: the ``podman run`` options every container gets.
    """

    image: str
    run_id: str
    options: tuple[str, ...]

    def container(self, name: str) -> str:
        return f"{CONTAINER_PREFIX}-{self.run_id}-{name}"

    def command(self, name: str, command: Sequence[str], *, env: Sequence[str] = ()) -> list[str]:
        """The command line that runs ``command`` in a new container called after ``name``.

        :param env: ``NAME=value`` entries for this container only; they win over the
            ``MIGRATOR_*`` variables passed from the caller's environment.
        """
        return [
            "podman", "run", "--rm", "--name", self.container(name), *self.options,
            *(f"--env={entry}" for entry in env), self.image, *command,
        ]  # fmt: skip

    def containers(self, *, running_only: bool = True) -> list[str]:
        """The names of this run's containers (running ones, or all)."""
        listed = subprocess.run(
            ["podman", "ps", *(() if running_only else ("--all",)), "--format", "{{.Names}}",
             "--filter", f"name={CONTAINER_PREFIX}-{self.run_id}-"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        return sorted(listed.stdout.split())

    def remove_all(self) -> None:
        """Remove this run's containers (one can outlive its ``podman run`` if that was killed)."""
        names = self.containers(running_only=False)
        if names:
            subprocess.run(
                ["podman", "rm", "--force", "--time", "0", *names],
                capture_output=True,
                timeout=120,
                check=False,
            )


def _run_options() -> tuple[str, ...]:
    user = f"{RUN_AS_USER}:{RUN_AS_USER}"
    hard_nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nofile = 1048576 if hard_nofile == resource.RLIM_INFINITY else hard_nofile
    options = [
        # The stack and the simulator listen on 127.0.0.1 of this machine.
        "--network=host",
        f"--user={user}",
        "--read-only",
        "--read-only-tmpfs=false",  # podman would also make /run and /var/tmp writable
        "--tmpfs=/tmp:rw,size=16m,mode=1777",  # the manifests' emptyDir (sizeLimit 16Mi)
        "--cap-drop=ALL",
        "--security-opt=no-new-privileges",
        # podman's default limits (nofile 1048576...) are above what root may set on the
        # development machine (no CAP_SYS_RESOURCE): the container would not start.
        f"--ulimit=nofile={nofile}:{nofile}",
        "--ulimit=nproc=4096:4096",
        # The MIGRATOR_* variables of the launching process (the stack's, the run's).
        "--env=MIGRATOR_*",
    ]
    # crun refuses cgroup v1 hosts with a v2 hierarchy mounted (the development machine);
    # deploy/local/image installs runc with podman.
    if shutil.which("runc"):
        options.append("--runtime=runc")
    return tuple(options)


@pytest.fixture(scope="module")
def podman() -> Iterator[Podman]:
    """The image built by ``deploy/local/image build``, and how to run it."""
    if shutil.which("podman") is None and os.geteuid() != 0:
        pytest.skip("needs podman, or root to install it from Debian's packages")
    environment = {**os.environ, "IMAGE_ENGINE": "podman"}
    built = subprocess.run(
        [str(IMAGE_SCRIPT), "build"],
        env=environment, capture_output=True, text=True, timeout=1800, check=False,
    )  # fmt: skip
    if built.returncode != 0:
        pytest.fail(
            f"deploy/local/image build failed (exit {built.returncode}):\n"
            f"{built.stdout}{built.stderr}",
            pytrace=False,
        )
    print(built.stdout + built.stderr)  # the base it used, the build time and the image size
    name = subprocess.run(
        [str(IMAGE_SCRIPT), "name"], capture_output=True, text=True, timeout=60, check=True
    ).stdout.strip()
    runner = Podman(image=name, run_id=uuid.uuid4().hex[:8], options=_run_options())
    yield runner
    runner.remove_all()


_PROBE = """
import os
print("uid", os.getuid(), os.getgid())
for path in ("/probe", "/app/probe", "/app/.venv/probe", "/tmp/probe"):
    try:
        with open(path, "w") as file:
            file.write("x")
        print(path, "written")
    except OSError as error:
        print(path, error.errno)
"""


def test_image_runs_as_uid_10001_with_only_tmp_writable(podman: Podman) -> None:
    probe = subprocess.run(
        podman.command("probe", ["python3", "-c", _PROBE]),
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    lines = probe.stdout.splitlines()
    assert lines[0] == f"uid {RUN_AS_USER} {RUN_AS_USER}"
    # EROFS, not EACCES: the file system refuses the write whoever asks.
    assert lines[1:] == [
        f"/probe {errno.EROFS}",
        f"/app/probe {errno.EROFS}",
        f"/app/.venv/probe {errno.EROFS}",
        "/tmp/probe written",
    ]


def test_image_upgrades_the_database_and_migrates_50_repositories(
    podman: Podman, stack: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    env = {**stack, "MIGRATOR_DATABASE_URL": database_url, "MIGRATOR_LOG_LEVEL": "info"}
    # The Job of deploy/k8s/base/db-upgrade-job.yaml, on a database that has no schema yet.
    upgrade = subprocess.run(
        podman.command("db-upgrade", ["registry-migrator", "db", "upgrade"]),
        env={**os.environ, **env}, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr

    metrics_port = free_port()

    def in_image(name: str, command: list[str]) -> list[str]:
        extra: tuple[str, ...] = ()
        if name.startswith("worker"):
            # As worker.yaml: the exporter on, its multi-process files under /tmp.
            extra = (
                "MIGRATOR_PROMETHEUS=1",
                f"dramatiq_prom_port={metrics_port}",
                "dramatiq_prom_db=/tmp/dramatiq-prometheus",
            )
        return podman.command(name, command, env=extra)

    with Store(database_url, max_size=10) as store:
        # The image's files applied every schema version this checkout has.
        assert store.schema_versions() == [version for version, _ in schema_files()]
        ids = seed_spread(store, 50)
        store.update_settings(
            capacity=8, enqueue_interval=1, guard_interval=2, max_step_duration=20
        )
        run = LocalMigration(env=env, log_dir=tmp_path, workers=1, threads=8, command_for=in_image)
        try:
            run.start(timeout=240)
            wait_until(lambda: all_terminal(store), timeout=300, interval=1, what="all terminal")
            containers = podman.containers()
            metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
            report = run.report()
            codes = run.stop(timeout=60)
        finally:
            run.stop(timeout=30)
            run.delete_queues()

        counts = store.counts_by_state()
        assert counts.get(State.IMPORT_DONE, 0) + counts.get(State.IMPORT_SKIPPED, 0) == len(ids)
        for repository_id in ids:
            repository = store.get(repository_id)
            assert repository is not None
            path = repository.path
            if "native" in path:
                assert repository.migration_skipped_reason == "native_import", path
            elif "missing" in path:
                assert repository.migration_skipped_reason == "not_found", path
            elif "fail-always" in path:
                assert repository.migration_skipped_reason == "too_many_retries", path
            else:
                assert repository.migration_state is State.IMPORT_DONE, (path, repository)
    # The API, the worker and the scheduler were the image's, in containers.
    assert containers == [podman.container(n) for n in ("api", "scheduler-0", "worker-0")]
    assert report["overlapping_repositories"] == []
    assert report["max_concurrent_imports"] <= 8
    assert stale_accepted_writes(database_url) == []
    # The worker's exporter served the messages it processed from its files under /tmp.
    assert 'actor_name="enqueue_next_migration"' in metrics, metrics[:2000]
    # Each container stopped on SIGTERM (forwarded by podman) with status 0.
    assert all(code == 0 for code in codes.values()), codes
    print(f"image {podman.image}: 50 repositories; outcomes {report['outcomes']}")
