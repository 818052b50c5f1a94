"""Run a whole migration on this machine: simulator, API, workers and schedulers as processes.

Tests, the demo, the chaos test and the benchmarks all need the same thing: the real
programs (``registry-migrator simulator``, ``registry-migrator api``, ``dramatiq actors``,
``registry-migrator scheduler``) started against the local stack, each in its own process
group, with their output in files, and stopped without leaving anything behind::

    with LocalMigration(env=stack_env | {"MIGRATOR_DATABASE_URL": url}, log_dir=tmp) as run:
        run.kill_worker(0)            # SIGKILL one worker (main process and child)
        print(run.report()["max_concurrent_imports"])

Each worker is its own ``dramatiq actors --processes 1`` in a new session, so one worker can
be killed, paused or restarted alone (Dramatiq's main process shuts down all its children
when one dies, which would otherwise take every worker down with it).

Children are asked to die with the process that started them (``PR_SET_PDEATHSIG``), so a
test runner killed outright does not leave workers consuming from its queue. Linux sends
that signal when the *thread* that started the child exits: call :meth:`LocalMigration.start`
and :meth:`LocalMigration.restart_worker` from a thread that outlives the run (the main
thread, usually), or pass ``die_with_parent=False``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from devtools.ports import free_port  # tests import it from here too
from migration.config import Config, split_broker_urls

#: A line every Dramatiq worker process logs once it consumes.
WORKER_READY = b"Worker process is ready for action"
#: The scheduler's line once its runtime is up (it campaigns right after).
SCHEDULER_READY = b"scheduler_started"
_PR_SET_PDEATHSIG = 1


class LaunchError(RuntimeError):
    """A process of the local migration did not start (the message names it, with its log)."""


def reserve_port(host: str = "127.0.0.1", port: int = 0, *, timeout: float = 0) -> socket.socket:
    """A TCP socket listening on ``host:port`` (port 0: the kernel's pick), held by this
    process: no other bind can take the port while it is open.

    :param timeout: seconds to retry while the port is in use (a restart on the same
        port, whose last connections may linger); 0: fail at once.
    :raises OSError: the port could not be bound (EADDRINUSE past ``timeout``).
    """
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            # The server's accepted connections inherit it: without it, those of a stopped
            # server (TIME_WAIT) keep its port from being bound again for a minute. A
            # listening socket conflicts with every other bind all the same.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(2048)
            return sock
        except OSError as error:
            sock.close()
            if error.errno != errno.EADDRINUSE or time.monotonic() >= deadline:
                raise
            time.sleep(0.2)


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    """A ``preexec_fn`` that makes the child get SIGKILL when its parent thread exits."""

    def setup() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl: do not linger
            os._exit(1)

    return setup


@dataclass
class _Child:
    """One started program: its process, log file and how to tell it is ready."""

    name: str
    command: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    log_offset: int = 0
    exit_codes: list[int | None] = field(default_factory=list)
    #: Variables of this process alone, over the run's (see :meth:`LocalMigration.set_env`).
    env: dict[str, str] = field(default_factory=dict)
    #: The port it serves on, held by the launcher until the process is spawned (None: it
    #: listens on nothing the launcher chose).
    port: int | None = None
    #: The launcher's socket on :attr:`port`, until it is handed down (or, for a program
    #: that cannot inherit it, closed just before the program binds the port itself).
    listener: socket.socket | None = None
    #: The program takes ``--fd N`` (the listener inherited) rather than binding the port.
    inherits_listener: bool = True

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_since_start(self) -> bytes:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self.log_offset)
                return log.read()
        except OSError:
            return b""

    def tail(self, lines: int = 25) -> str:
        text = self.log_since_start().decode(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


class LocalMigration:
    """The processes of one migration run on this machine.

    :param env: ``MIGRATOR_*`` variables for the children (database, etcd, RabbitMQ...);
        added to this process's environment. The database must have had ``Store.upgrade()``.
    :param log_dir: folder for the children's output (``simulator.log``, ``api.log``,
        ``worker-0.log``, ``scheduler-0.log``...), created if missing.
    :param workers: worker programs (``dramatiq actors --processes 1``), each its own group.
    :param threads: worker threads per worker program.
    :param schedulers: scheduler replicas (one leads).
    :param simulator_args: extra ``registry-migrator simulator`` options, e.g.
        ``["--pre-import-seconds", "0.1", "0.3", "--start-latency", "2"]`` (the launcher sets
        ``--port``, ``--notify-url``, ``--secret`` and ``--ready-file`` itself).
    :param lease_ttl: ``MIGRATOR_LEASE_TTL`` of every child, seconds.
    :param etcd_prefix: ``MIGRATOR_ETCD_PREFIX``; None: a new unique one.
    :param queue_name: ``MIGRATOR_QUEUE_NAME``; None: a new unique one.
    :param secret: ``MIGRATOR_NOTIFICATION_SECRET``; None: a new random one.
    :param api: start the notification API (the simulator notifies it).
    :param scheduler: start the scheduler replicas.
    :param die_with_parent: children get SIGKILL when the thread that started them exits.
    :param worker_shutdown_timeout: seconds a stopping worker waits for its running messages.
    :param worker_env: extra variables of worker i (``worker_env[i]``), e.g. the port and
        folder of Dramatiq's Prometheus middleware (``dramatiq_prom_port``, ``dramatiq_prom_db``).
    :param scheduler_metrics_ports: ``--metrics-port`` of scheduler i; none: no metrics.
    :param command_for: how the API, the workers and the schedulers are started: given a
        process's name (``api``, ``worker-0``, ``scheduler-0``) and its command line with
        the bare program name first (``["dramatiq", "actors", ...]``), the command line to
        run. None runs this virtualenv's programs; ``tests/image`` runs the image's with
        ``podman run``. The simulator always runs from this virtualenv.
    """

    def __init__(
        self,
        *,
        env: Mapping[str, str],
        log_dir: Path,
        workers: int = 2,
        threads: int = 8,
        schedulers: int = 1,
        simulator_args: Sequence[str] = (),
        lease_ttl: float = 3,
        etcd_prefix: str | None = None,
        queue_name: str | None = None,
        secret: str | None = None,
        api: bool = True,
        scheduler: bool = True,
        die_with_parent: bool = True,
        worker_shutdown_timeout: float = 20,
        worker_env: Sequence[Mapping[str, str]] = (),
        scheduler_metrics_ports: Sequence[int] = (),
        command_for: Callable[[str, list[str]], list[str]] | None = None,
    ) -> None:
        if workers < 0 or schedulers < 0 or threads < 1:
            raise ValueError("workers and schedulers must be >= 0, threads >= 1")
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.threads = threads
        self.die_with_parent = die_with_parent
        run_id = uuid.uuid4().hex[:10]
        # The ports are held from here until the programs serve on them (each gets its
        # socket as an inherited descriptor, --fd): a port only probed free could be taken
        # meanwhile, as a partition test's proxy once took the API's.
        # Below the ephemeral range (devtools.ports): a simulator restart rebinds its port,
        # which no client connection can have taken meanwhile.
        simulator_socket = reserve_port(port=free_port())
        api_socket = reserve_port(port=free_port()) if api else None
        simulator_port = simulator_socket.getsockname()[1]
        api_port = api_socket.getsockname()[1] if api_socket is not None else 0
        self.simulator_url = f"http://127.0.0.1:{simulator_port}"
        self.api_url = f"http://127.0.0.1:{api_port}" if api else ""
        self.env: dict[str, str] = {
            **env,
            "MIGRATOR_ETCD_PREFIX": etcd_prefix or f"/local-migration-{run_id}",
            "MIGRATOR_QUEUE_NAME": queue_name or f"local_migration_{run_id}",
            "MIGRATOR_NOTIFICATION_SECRET": secret or uuid.uuid4().hex,
            "MIGRATOR_REGISTRY_URL": self.simulator_url,
            "MIGRATOR_LEASE_TTL": f"{lease_ttl:g}",
        }
        # Dramatiq's Prometheus middleware binds one fixed port: off unless asked for.
        self.env.setdefault("MIGRATOR_PROMETHEUS", "0")
        if die_with_parent:  # read by the worker child (actors.runtime.RuntimeMiddleware)
            self.env["MIGRATOR_DIE_WITH_PARENT"] = "1"
        executables = Path(sys.executable).parent

        def local(name: str, command: list[str]) -> list[str]:
            return [str(executables / command[0]), *command[1:]]

        program = command_for or local
        cli = str(executables / "registry-migrator")
        self._ready_file = self.log_dir / f"simulator-{run_id}.url"
        # The registry's state survives stop_simulator/start_simulator: an outage, not a wipe.
        self.simulator_state_file = self.log_dir / f"simulator-{run_id}.state"
        simulator_command = [
            cli, "simulator", "--host", "127.0.0.1", "--port", str(simulator_port),
            "--secret", self.env["MIGRATOR_NOTIFICATION_SECRET"],
            "--ready-file", str(self._ready_file),
            "--state-file", str(self.simulator_state_file), *simulator_args,
        ]  # fmt: skip
        if api:
            simulator_command += ["--notify-url", self.api_url]
        self._simulator = _Child(
            "simulator", simulator_command, self.log_dir / "simulator.log",
            port=simulator_port, listener=simulator_socket,
        )  # fmt: skip
        self._api = (
            _Child(
                "api",
                program("api", ["registry-migrator", "api", "--port", str(api_port)]),
                self.log_dir / "api.log",
                port=api_port,
                listener=api_socket,
                # A program run in a container (command_for) gets no descriptor of ours.
                inherits_listener=command_for is None,
            )
            if api
            else None
        )
        worker_command = [
            "dramatiq", "actors", "--processes", "1",
            "--threads", str(threads),
            "--worker-shutdown-timeout", str(int(worker_shutdown_timeout * 1000)),
        ]  # fmt: skip
        self._workers = [
            _Child(
                f"worker-{i}",
                program(f"worker-{i}", list(worker_command)),
                self.log_dir / f"worker-{i}.log",
                env=dict(worker_env[i]) if i < len(worker_env) else {},
            )
            for i in range(workers)
        ]
        self._schedulers = [
            _Child(
                f"scheduler-{i}",
                program(f"scheduler-{i}", self._scheduler_command(i, scheduler_metrics_ports)),
                self.log_dir / f"scheduler-{i}.log",
            )
            for i in range(schedulers if scheduler else 0)
        ]

    @staticmethod
    def _scheduler_command(index: int, metrics_ports: Sequence[int]) -> list[str]:
        port = metrics_ports[index] if index < len(metrics_ports) else 0
        return ["registry-migrator", "scheduler", "--health-port", "0", "--metrics-port", str(port)]

    # -- processes ------------------------------------------------------------------------

    def _children(self) -> list[_Child]:
        api = [self._api] if self._api is not None else []
        return [self._simulator, *api, *self._workers, *self._schedulers]

    def _listener_for(self, child: _Child) -> socket.socket | None:
        """The socket ``child`` is to serve on: the one reserved at construction, or, for a
        restart, a new one on the same port (retried while its last connections linger)."""
        if child.port is None:
            return None
        listener, child.listener = child.listener, None
        if listener is None:
            try:
                listener = reserve_port(port=child.port, timeout=10)
            except OSError as error:
                raise LaunchError(f"{child.name}: port {child.port}: {error}") from error
        return listener

    def _spawn(self, child: _Child) -> None:
        if child.running():
            return
        child.log_offset = child.log_path.stat().st_size if child.log_path.exists() else 0
        environment = {**os.environ, **self.env, **child.env, "PYTHONUNBUFFERED": "1"}
        command = child.command
        listener = self._listener_for(child)
        inherited: tuple[int, ...] = ()
        if listener is not None and child.inherits_listener:
            inherited = (listener.fileno(),)
            command = [*command, "--fd", str(listener.fileno())]
        elif listener is not None:
            listener.close()  # the program binds the port itself, a moment from now
            listener = None
        try:
            self._popen(child, command, environment, inherited)
        finally:
            if listener is not None:  # the child has its copy; ours would keep it open
                listener.close()

    def _popen(self, child: _Child, command: list[str], environment: dict[str, str],
               inherited: tuple[int, ...]) -> None:  # fmt: skip
        with open(child.log_path, "ab") as log:
            log.write(f"--- {time.strftime('%H:%M:%S')} starting {child.name}\n".encode())
            log.flush()
            child.log_offset = log.tell()
            child.process = subprocess.Popen(
                command,
                pass_fds=inherited,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment,
                start_new_session=True,
                preexec_fn=_die_with_parent(os.getpid()) if self.die_with_parent else None,  # noqa: PLW1509 - prctl only
            )

    def _wait_ready(self, child: _Child, ready: Callable[[], bool], deadline: float) -> None:
        while not ready():
            if not child.running():
                code = child.process.poll() if child.process else None
                raise LaunchError(f"{child.name} exited (status {code}):\n{child.tail()}")
            if time.monotonic() > deadline:
                raise LaunchError(f"{child.name} not ready in time:\n{child.tail()}")
            time.sleep(0.05)

    def _logged(self, child: _Child, line: bytes) -> Callable[[], bool]:
        return lambda: line in child.log_since_start()

    def _api_healthy(self) -> bool:
        try:
            return httpx.get(f"{self.api_url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def start(self, *, timeout: float = 60) -> None:
        """Start every process; return once each is ready.

        Ready means: the simulator wrote its ready file, the API answers ``/healthz``, each
        worker logged that it is ready for action, each scheduler logged
        ``scheduler_started``. On failure everything started is stopped again.

        :raises LaunchError: a process exited or was not ready within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        try:
            with contextlib.suppress(FileNotFoundError):
                self._ready_file.unlink()
            self._spawn(self._simulator)
            self._wait_ready(self._simulator, self._ready_file.exists, deadline)
            if self._api is not None:
                self._spawn(self._api)
            for child in self._workers + self._schedulers:
                self._spawn(child)
            if self._api is not None:
                self._wait_ready(self._api, self._api_healthy, deadline)
            for child in self._workers:
                self._wait_ready(child, self._logged(child, WORKER_READY), deadline)
            for child in self._schedulers:
                self._wait_ready(child, self._logged(child, SCHEDULER_READY), deadline)
        except BaseException:
            self.stop(timeout=10)
            raise

    @staticmethod
    def _signal_group(child: _Child, sig: int) -> None:
        if child.process is None:
            return
        # start_new_session: the group id is the main process's id.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.process.pid, sig)

    def _finish(self, children: list[_Child], deadline: float) -> None:
        """SIGTERM each main process, wait until ``deadline``, then SIGKILL the groups."""
        for child in children:
            if child.running():
                assert child.process is not None
                # The main process only: Dramatiq's forwards it to its child, and a second
                # SIGTERM reaching that child would make it exit without finishing.
                child.process.send_signal(signal.SIGCONT)  # a paused worker can't stop
                self._signal_group(child, signal.SIGCONT)
                child.process.send_signal(signal.SIGTERM)
        for child in children:
            if child.process is None:
                continue
            try:
                child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._signal_group(child, signal.SIGKILL)
                child.process.wait(timeout=10)
            # Whatever is left of the group (an orphaned Dramatiq child) goes too.
            self._signal_group(child, signal.SIGKILL)
            child.exit_codes.append(child.process.returncode)

    def stop(self, *, timeout: float = 30) -> dict[str, int | None]:
        """Stop every process (schedulers, workers and API, then the simulator).

        :param timeout: seconds the processes get to exit after SIGTERM before SIGKILL.
        :returns: each process's exit status by name (None: never started).
        """
        deadline = time.monotonic() + timeout
        api = [self._api] if self._api is not None else []
        self._finish([*self._schedulers, *self._workers, *api], deadline)
        self._finish([self._simulator], max(deadline, time.monotonic() + 5))
        codes = {
            child.name: (child.process.returncode if child.process is not None else None)
            for child in self._children()
        }
        for child in self._children():
            child.process = None
            if child.listener is not None:  # reserved, never handed down
                child.listener.close()
                child.listener = None
        return codes

    def __enter__(self) -> LocalMigration:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def set_env(self, name: str, env: Mapping[str, str]) -> None:
        """Variables for process ``name`` alone (``worker-0``, ``api``...), over the run's
        ``env``, from its next start: e.g. one worker's ``MIGRATOR_ETCD_ENDPOINTS`` pointed
        at a proxy that a test can cut (``tests/partition``).

        :raises KeyError: no process is called ``name``.
        """
        for child in self._children():
            if child.name == name:
                child.env = {**child.env, **env}
                return
        raise KeyError(name)

    # -- workers and schedulers -----------------------------------------------------------

    def worker_pids(self) -> list[int]:
        """The main process id of each running worker (its process group id), by index."""
        return [c.process.pid for c in self._workers if c.process is not None and c.running()]

    def worker_group(self, index: int) -> list[int]:
        """Every process id in worker ``index``'s group (main process and its child)."""
        child = self._workers[index]
        if child.process is None:
            return []
        return _group_members(child.process.pid)

    def worker_index_of(self, pid: int) -> int | None:
        """The index of the worker whose group has process ``pid`` (e.g. a lease holder)."""
        for index in range(len(self._workers)):
            if pid in self.worker_group(index):
                return index
        return None

    def kill_worker(self, index: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` (default SIGKILL) to worker ``index``'s whole group; wait if SIGKILL."""
        child = self._workers[index]
        self._signal_group(child, sig)
        if sig == signal.SIGKILL and child.process is not None:
            child.process.wait(timeout=10)
            child.exit_codes.append(child.process.returncode)

    def pause_worker(self, index: int) -> None:
        """SIGSTOP worker ``index``'s group (its keep-alive stops too: its leases expire)."""
        self._signal_group(self._workers[index], signal.SIGSTOP)

    def resume_worker(self, index: int) -> None:
        """SIGCONT worker ``index``'s group."""
        self._signal_group(self._workers[index], signal.SIGCONT)

    def restart_worker(self, index: int, *, timeout: float = 60) -> None:
        """Stop worker ``index`` (gracefully when it runs) and start it again; wait until ready."""
        child = self._workers[index]
        if child.running():
            self._finish([child], time.monotonic() + 30)
        self._spawn(child)
        self._wait_ready(child, self._logged(child, WORKER_READY), time.monotonic() + timeout)

    def stop_simulator(self, *, timeout: float = 15) -> int | None:
        """Stop the registry (SIGTERM; it saves its state): calls are refused until
        :meth:`start_simulator`. Returns its exit status."""
        self._finish([self._simulator], time.monotonic() + timeout)
        return self._simulator.exit_codes[-1] if self._simulator.exit_codes else None

    def start_simulator(self, *, timeout: float = 60) -> None:
        """Start the registry again on its port, from its saved state; return once it listens.

        :raises LaunchError: it exited or did not listen within ``timeout`` seconds.
        """
        with contextlib.suppress(FileNotFoundError):
            self._ready_file.unlink()
        self._spawn(self._simulator)
        self._wait_ready(self._simulator, self._ready_file.exists, time.monotonic() + timeout)

    def configure_simulator(self, **changes: Any) -> dict[str, Any]:
        """``POST /simulator/config`` (e.g. ``fault="status:503", fault_seconds=5``).

        :raises ValueError: the simulator refused a knob (its reason).
        """
        response = httpx.post(f"{self.simulator_url}/simulator/config", json=changes, timeout=10)
        if response.status_code == 400:
            raise ValueError(response.json()["detail"])
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def kill_scheduler(self, index: int) -> None:
        """SIGKILL scheduler ``index`` (a crash: its candidacy expires with its lease)."""
        child = self._schedulers[index]
        self._signal_group(child, signal.SIGKILL)
        if child.process is not None:
            child.process.wait(timeout=10)

    # -- observation ----------------------------------------------------------------------

    def report(self, *, events: bool = False) -> dict[str, Any]:
        """The simulator's ``/simulator/report`` (``events`` adds its timestamped log)."""
        response = httpx.get(
            f"{self.simulator_url}/simulator/report",
            params={"events": "true" if events else "false"},
            timeout=10,
        )
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def queue_depth(self) -> int:
        """Messages ready in this run's RabbitMQ queue now (not counting those being worked)."""
        return queue_depth(self.env, self.env["MIGRATOR_QUEUE_NAME"])

    def delete_queues(self) -> None:
        """Delete this run's queues (the queue, its delay and dead-letter queues) from RabbitMQ.

        They are durable and named for this run only; call it after :meth:`stop`.
        """
        queue = self.env["MIGRATOR_QUEUE_NAME"]
        with _amqp(self.env) as channel:
            for name in (queue, f"{queue}.DQ", f"{queue}.XQ"):
                channel.queue_delete(queue=name)

    def alive(self) -> dict[str, bool]:
        """Whether each process (by name) is running."""
        return {child.name: child.running() for child in self._children()}

    def log_path(self, name: str) -> Path:
        """The log file of the process called ``name`` (``worker-0``, ``api``...)."""
        for child in self._children():
            if child.name == name:
                return child.log_path
        raise KeyError(name)

    def digest(self, *, lines: int = 12, width: int = 400) -> str:
        """What each process did, in a few lines: its events counted (the most frequent
        first), whether it runs, and its last ``lines`` lines cut at ``width`` characters.
        For a failed test's report, where the log files are out of reach (CI)."""
        out = [f"=== run digest ({self.log_dir})"]
        for child in self._children():
            counts: dict[str, int] = {}
            for line in self.log_events(child.name):
                key = f"{str(line.get('event'))[:50]}:{line.get('level')}"
                counts[key] = counts.get(key, 0) + 1
            frequent = sorted(counts.items(), key=lambda item: -item[1])[:15]
            out.append(f"--- {child.name} running={child.running()} exits={child.exit_codes}")
            out.append("events: " + ", ".join(f"{key} {n}" for key, n in frequent))
            out.extend(line[:width] for line in child.tail(lines).splitlines())
        return "\n".join(out)

    def log_events(self, name: str, event: str | None = None) -> list[dict[str, Any]]:
        """The JSON log lines of process ``name`` (all its runs), optionally one ``event``."""
        found = []
        with open(self.log_path(name), "rb") as log:
            for raw in log:
                if not raw.startswith(b"{"):
                    continue
                try:
                    line = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(line, dict) and (event is None or line.get("event") == event):
                    found.append(line)
        return found


@contextlib.contextmanager
def _amqp(env: Mapping[str, str]) -> Iterator[BlockingChannel]:
    """A channel to the run's RabbitMQ (``MIGRATOR_BROKER_URL``), closed afterwards."""
    urls = split_broker_urls(env.get("MIGRATOR_BROKER_URL", Config().broker_url))
    connection = pika.BlockingConnection([pika.URLParameters(url) for url in urls])
    try:
        yield connection.channel()
    finally:
        connection.close()


def queue_depth(env: Mapping[str, str], queue: str) -> int:
    """Messages ready in RabbitMQ queue ``queue`` (0 when it was never declared).

    :param env: holds ``MIGRATOR_BROKER_URL`` (the default URL when it does not).
    """
    try:
        with _amqp(env) as channel:
            declared = channel.queue_declare(queue=queue, passive=True)
            return int(declared.method.message_count)
    except pika.exceptions.ChannelClosedByBroker as error:
        if error.reply_code == 404:  # nothing published or consumed yet
            return 0
        raise


def _group_members(pgid: int) -> list[int]:
    """Process ids whose process group is ``pgid`` (read from /proc)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        # After the command: state, ppid, pgrp, ...
        if int(fields[2]) == pgid:
            members.append(int(entry))
    return sorted(members)
