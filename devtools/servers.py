"""Servers that a test runs for itself, apart from the shared stack.

``EtcdCluster`` starts a private etcd cluster on free loopback ports, so a test can kill its
leader or stop it entirely without disturbing anyone else::

    with EtcdCluster(members=3, data_root=tmp_path) as cluster:
        leader = cluster.leader_index()
        cluster.kill(leader)
        new_leader = cluster.leader_index(timeout=15)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from devtools.ports import free_port, free_ports  # noqa: F401 (re-exported for tests)


class EtcdClusterError(RuntimeError):
    """The private etcd cluster did not reach the state a test waited for."""


@dataclass(frozen=True, slots=True)
class EtcdTls:
    """TLS for the members' client URLs (https); peers stay on plain loopback http.

    :param ca: PEM file of the CA that signed ``cert`` and the clients' certificates.
    :param cert: the server certificate (valid for 127.0.0.1).
    :param key: its key.
    :param client_cert_auth: require a client certificate signed by ``ca``.
    """

    ca: Path
    cert: Path
    key: Path
    client_cert_auth: bool = True


class EtcdCluster:
    """A private etcd 3.4 cluster of separate processes on loopback.

    Members are named ``m0``, ``m1``...; member ``i`` listens for clients on
    ``client_ports[i]`` and for peers on ``peer_ports[i]``. Lease checkpointing is on (with the
    zap logger, which 3.4 needs for it), like the shared stack.
    """

    def __init__(
        self,
        *,
        members: int = 3,
        data_root: Path,
        base_client_port: int | None = None,
        base_peer_port: int | None = None,
        etcd_binary: str = "etcd",
        start_timeout: float = 30.0,
        tls: EtcdTls | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        """
        :param members: number of members (1 or more; 3 to survive losing one).
        :param data_root: folder for the members' data and logs (e.g. pytest's ``tmp_path``).
        :param base_client_port: first client port (then +1 per member); free ports if None.
        :param base_peer_port: first peer port (then +1 per member); free ports if None.
        :param etcd_binary: the etcd executable.
        :param start_timeout: seconds to wait for health after a start or restart.
        :param tls: serve clients over https (health is then read from a separate plain
            http metrics listener, ``metrics_ports``).
        :param extra_args: more etcd flags for every member (e.g. ``--auth-token-ttl=2``).
        """
        if members < 1:
            raise ValueError("members must be at least 1")
        binary = shutil.which(etcd_binary)
        if binary is None:
            raise EtcdClusterError(f"{etcd_binary} not found (Debian package etcd-server)")
        self._binary = binary
        self._data_root = Path(data_root)
        self._start_timeout = start_timeout
        picked = iter(free_ports(2 * members))
        self.client_ports = [
            base_client_port + i if base_client_port is not None else next(picked)
            for i in range(members)
        ]
        self.peer_ports = [
            base_peer_port + i if base_peer_port is not None else next(picked)
            for i in range(members)
        ]
        self._processes: list[subprocess.Popen[bytes] | None] = [None] * members
        self.tls = tls
        self._extra_args = list(extra_args)
        self.metrics_ports = free_ports(members) if tls is not None else []

    @property
    def size(self) -> int:
        return len(self.client_ports)

    @property
    def endpoints(self) -> list[str]:
        """``host:port`` client endpoints of all members, in member order."""
        return [f"127.0.0.1:{port}" for port in self.client_ports]

    def log_path(self, index: int) -> Path:
        return self._data_root / f"m{index}.log"

    def _command(self, index: int) -> list[str]:
        cluster = ",".join(
            f"m{i}=http://127.0.0.1:{port}" for i, port in enumerate(self.peer_ports)
        )
        scheme = "https" if self.tls is not None else "http"
        client_url = f"{scheme}://127.0.0.1:{self.client_ports[index]}"
        peer_url = f"http://127.0.0.1:{self.peer_ports[index]}"
        return [
            self._binary,
            f"--name=m{index}",
            f"--data-dir={self._data_root / f'm{index}.data'}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster={cluster}",
            "--initial-cluster-state=new",
            f"--initial-cluster-token=test-{os.getpid()}-{self.client_ports[0]}",
            "--logger=zap",
            f"--log-outputs={self.log_path(index)}",
            "--experimental-enable-lease-checkpoint",
            *self._tls_args(index),
            *self._extra_args,
        ]

    def _tls_args(self, index: int) -> list[str]:
        if self.tls is None:
            return []
        args = [
            f"--cert-file={self.tls.cert}",
            f"--key-file={self.tls.key}",
            f"--trusted-ca-file={self.tls.ca}",
            f"--listen-metrics-urls=http://127.0.0.1:{self.metrics_ports[index]}",
        ]
        if self.tls.client_cert_auth:
            args.append("--client-cert-auth")
        return args

    def _spawn(self, index: int) -> None:
        if self.is_running(index):
            return
        self._data_root.mkdir(parents=True, exist_ok=True)
        with open(self._data_root / f"m{index}.out", "ab") as output:
            self._processes[index] = subprocess.Popen(
                self._command(index),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def start(self) -> None:
        """Start every member and wait until all are healthy."""
        for index in range(self.size):
            self._spawn(index)
        self.wait_healthy(range(self.size))

    def is_running(self, index: int) -> bool:
        process = self._processes[index]
        return process is not None and process.poll() is None

    def running_indices(self) -> list[int]:
        return [i for i in range(self.size) if self.is_running(i)]

    def _http(self, index: int, path: str, body: dict[str, object] | None = None) -> object:
        # With TLS the client port speaks https only; /health is also on the metrics port.
        port = self.metrics_ports[index] if self.tls is not None else self.client_ports[index]
        url = f"http://127.0.0.1:{port}{path}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
        with urllib.request.urlopen(request, timeout=2) as response:  # noqa: S310 (loopback)
            return json.loads(response.read())

    def is_healthy(self, index: int) -> bool:
        """Whether member ``index`` runs and reports itself healthy (it sees a leader)."""
        if not self.is_running(index):
            return False
        try:
            answer = self._http(index, "/health")
        except (OSError, ValueError, urllib.error.URLError):
            return False
        return isinstance(answer, dict) and answer.get("health") == "true"

    def wait_healthy(
        self, indices: range | list[int] | None = None, timeout: float | None = None
    ) -> None:
        """Wait until the given members (default: those running) are healthy.

        :raises EtcdClusterError: on timeout or when a member exits, with its log's tail.
        """
        wanted = list(indices) if indices is not None else self.running_indices()
        deadline = time.monotonic() + (timeout if timeout is not None else self._start_timeout)
        while True:
            for index in wanted:
                if not self.is_running(index):
                    raise EtcdClusterError(f"etcd member m{index} exited\n{self._tail(index)}")
            if all(self.is_healthy(index) for index in wanted):
                return
            if time.monotonic() > deadline:
                raise EtcdClusterError(
                    f"etcd members {wanted} not healthy in time\n{self._tail(wanted[0])}"
                )
            time.sleep(0.1)

    def _tail(self, index: int, lines: int = 20) -> str:
        try:
            text = self.log_path(index).read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _leader_seen_by(self, index: int) -> int | None:
        """The index of the member that member ``index`` says is the leader, if any."""
        try:
            answer = self._http(index, "/v3/maintenance/status", body={})
        except (OSError, ValueError, urllib.error.URLError):
            return None
        if not isinstance(answer, dict):
            return None
        leader_id = answer.get("leader")
        own_id = answer.get("header", {}).get("member_id")
        if leader_id is None or leader_id == "0":
            return None
        return index if leader_id == own_id else None

    def leader_index(self, timeout: float = 10.0) -> int:
        """The index of the running member that is the leader, waiting up to ``timeout`` s.

        :raises EtcdClusterError: when no running member is leader in time.
        """
        deadline = time.monotonic() + timeout
        while True:
            for index in self.running_indices():
                if self._leader_seen_by(index) == index:
                    return index
            if time.monotonic() > deadline:
                raise EtcdClusterError(f"no etcd leader among {self.running_indices()}")
            time.sleep(0.1)

    def _end(self, index: int, sig: signal.Signals, grace: float) -> None:
        process = self._processes[index]
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def kill(self, index: int) -> None:
        """SIGKILL member ``index`` (a crash) and wait until it is gone."""
        self._end(index, signal.SIGKILL, grace=10)

    def stop(self, index: int) -> None:
        """Stop member ``index`` gracefully (SIGTERM, SIGKILL after 10 s)."""
        self._end(index, signal.SIGTERM, grace=10)

    def restart(self, index: int) -> None:
        """Start member ``index`` again with its data and wait until it is healthy."""
        self.stop(index)
        self._spawn(index)
        self.wait_healthy([index])

    def stop_all(self) -> None:
        """Stop every member (data stays in ``data_root``)."""
        for index in range(self.size):
            self.stop(index)

    def __enter__(self) -> EtcdCluster:
        try:
            self.start()
        except BaseException:
            self.stop_all()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop_all()
