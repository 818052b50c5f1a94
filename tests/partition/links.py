"""A partition harness: one process's links to etcd, PostgreSQL, RabbitMQ and the registry,
each through a TCP proxy of its own that a test can cut, slow down or make lossy, and restore.

Why proxies and not ``tc netem`` in a network namespace: the kernel of this project's
machines (and CI's) has no ``sch_netem`` (``tc qdisc add ... netem`` answers "Specified
qdisc kind is unknown"), so delay and loss cannot be made in the kernel. A proxy in this
test process does it per link, on loopback only, and needs no package: the worker's
``MIGRATOR_*`` addresses point at the proxies (:meth:`ProcessLinks.env`), the rest of the
stack keeps talking to the real servers directly.

What each fault looks like to the process behind the proxy:

- ``cut()`` (a partition): the proxy stops forwarding, in both directions, without closing
  anything. Bytes sent are held, as unacknowledged segments are retransmitted; the peer
  sees silence, so only its own timeouts (keep-alive deadlines, heartbeats, call timeouts)
  tell it. A new connection is accepted (the kernel would answer the handshake of a
  listening port anyway) but gets nowhere. ``restore()`` delivers what was held, in order,
  as TCP does once a partition heals, unless one side gave up and closed meanwhile.
- ``refuse()``: every connection is reset (RST) and new ones are reset at once: a crashed
  peer or a firewall that rejects, rather than silence.
- ``degrade(delay=, jitter=, loss=)``: every chunk is delivered ``delay`` ± ``jitter``
  seconds after it was read, in order (a chunk may not overtake the one before it, as TCP
  delivers in order); with probability ``loss`` a chunk costs a retransmission timeout
  more (200 ms, doubling for consecutive losses: Linux's minimum RTO), which is what
  a lost segment does to a TCP stream as the application sees it.

- ``blackhole()``: a cut the client's *kernel* sees too. A proxy in user space acknowledges
  every byte the client sends and answers its keep-alive probes, so a cut through it never
  trips the client's TCP timeouts (``tcp_user_timeout``, keep-alives); ``blackhole`` also
  drops the packets of the proxy's port in the kernel (``iptables``, loopback only, rules
  named for this process and removed by ``restore``), as a real partition would.

``requests`` records the HTTP request lines a proxy saw from its client (the registry
link): an observer of the worker's registry calls outside the worker itself.
"""

from __future__ import annotations

import collections
import contextlib
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from urllib.parse import urlsplit, urlunsplit

#: Linux's minimum retransmission timeout: what one lost segment costs a TCP stream.
MIN_RTO = 0.2
_HTTP_REQUEST = re.compile(rb"(GET|PUT|POST|DELETE|PATCH) (/\S*) HTTP/1\.[01]\r\n")


@dataclass(frozen=True)
class SeenRequest:
    """An HTTP request line the proxy read from its client.

    :param at: ``time.time()`` when it was read.
    :param method: GET, PUT...
    :param target: the request target (path and query).
    :param held: the link was cut when it was read (it is delivered on restore, if ever).
    """

    at: float
    method: str
    target: str
    held: bool


class BlackholeUnavailable(RuntimeError):
    """``iptables`` is missing or refused the rule (not root, no netfilter): the message
    says which."""


def _iptables(action: str, port: int) -> None:
    """Add (``-I``) or delete (``-D``) the two rules that drop loopback TCP to and from
    ``port``; a rule's comment names this process (``partition-<pid>``)."""
    iptables = shutil.which("iptables")
    if iptables is None:
        raise BlackholeUnavailable("iptables is not installed (.ci/run installs it)")
    for side in ("--dport", "--sport"):
        done = subprocess.run(
            [iptables, "-w", "5", action, "INPUT", "-i", "lo", "-p", "tcp", side, str(port),
             "-m", "comment", "--comment", f"partition-{os.getpid()}", "-j", "DROP"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        if done.returncode != 0 and action == "-I":
            raise BlackholeUnavailable(f"iptables {action} failed: {done.stderr.strip()}")


class _Direction:
    """One direction of one proxied connection: a reader queues chunks, a writer sends
    them when due and while the link is not cut."""

    def __init__(self, proxy: FaultProxy, source: socket.socket, sink: socket.socket, *,
                 upstream: bool) -> None:  # fmt: skip
        self.proxy = proxy
        self.source = source
        self.sink = sink
        self.upstream = upstream
        self.chunks: collections.deque[tuple[float, bytes]] = collections.deque()
        self.ready = threading.Condition()
        self.eof = False
        self.last_due = 0.0
        self.losses = 0

    def start(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._write, daemon=True).start()

    def _read(self) -> None:
        try:
            while data := self.source.recv(65536):
                now = time.monotonic()
                if self.upstream and self.proxy.record_http:
                    self.proxy._saw(data)
                due = now + self.proxy._latency(self)
                with self.ready:
                    self.last_due = due = max(due, self.last_due)
                    self.chunks.append((due, data))
                    self.ready.notify_all()
        except OSError:
            pass
        with self.ready:
            self.eof = True
            self.ready.notify_all()

    def _write(self) -> None:
        proxy = self.proxy
        try:
            while True:
                with self.ready:
                    while not self.chunks and not self.eof:
                        self.ready.wait(0.5)
                    if not self.chunks:  # eof and everything delivered
                        break
                    due, data = self.chunks[0]
                # Hold it while the link is cut; send it when due.
                while proxy.is_cut() or time.monotonic() < due:
                    if proxy.closed:
                        return
                    time.sleep(0.005 if not proxy.is_cut() else 0.02)
                self.sink.sendall(data)
                with self.ready:
                    self.chunks.popleft()
        except OSError:
            pass
        with contextlib.suppress(OSError):
            self.sink.shutdown(socket.SHUT_WR)


class FaultProxy:
    """Forward ``127.0.0.1:<port>`` to ``target`` with faults a test switches on and off.

    :param name: what the link is (``etcd``, ``postgres``...), for messages.
    :param target: ``(host, port)`` of the real server.
    :param record_http: record the HTTP request lines of the client (:attr:`requests`).
    :param seed: seed of the delay and loss draws.
    """

    def __init__(self, *, name: str, target: tuple[str, int], record_http: bool = False,
                 seed: int = 0) -> None:  # fmt: skip
        self.name = name
        self.target = target
        self.record_http = record_http
        self.requests: list[SeenRequest] = []
        #: Called with each request line seen, from the proxy's thread, before the request
        #: is forwarded: a test acts at the very moment a call leaves the process.
        self.on_request: Callable[[SeenRequest], None] | None = None
        self.closed = False
        self._cut = threading.Event()
        self._blackholed = False
        self._refusing = False
        self._delay = 0.0
        self._jitter = 0.0
        self._loss = 0.0
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port: int = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, name=f"proxy-{name}", daemon=True).start()

    def __repr__(self) -> str:
        return f"FaultProxy({self.name} :{self.port} -> {self.target[0]}:{self.target[1]})"

    # -- faults ---------------------------------------------------------------------------

    def is_cut(self) -> bool:
        return self._cut.is_set()

    def cut(self) -> None:
        """Stop forwarding both ways, closing nothing: the peer sees silence."""
        self._cut.set()

    def blackhole(self) -> None:
        """Cut, and drop this link's packets in the kernel too: the client's own TCP
        timeouts see the partition (see the module's docstring).

        :raises BlackholeUnavailable: iptables is missing or refused the rule.
        """
        self.cut()
        if not self._blackholed:
            _iptables("-I", self.port)
            self._blackholed = True

    def refuse(self) -> None:
        """Reset every connection and every new one until :meth:`restore`."""
        self._refusing = True
        self._reset_all()

    def degrade(self, *, delay: float = 0.0, jitter: float = 0.0, loss: float = 0.0) -> None:
        """Deliver each chunk ``delay`` ± ``jitter`` s late; lose (retransmit) ``loss`` of them."""
        if delay < 0 or jitter < 0 or jitter > delay or not 0 <= loss < 1:
            raise ValueError("need 0 <= jitter <= delay and 0 <= loss < 1")
        with self._lock:
            self._delay, self._jitter, self._loss = delay, jitter, loss

    def restore(self) -> None:
        """Forward normally again (held bytes are delivered, in order)."""
        with self._lock:
            self._delay = self._jitter = self._loss = 0.0
        self._refusing = False
        if self._blackholed:
            _iptables("-D", self.port)
            self._blackholed = False
        self._cut.clear()

    def close(self) -> None:
        if self._blackholed:
            _iptables("-D", self.port)
            self._blackholed = False
        self.closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        self._reset_all()

    # -- machinery ------------------------------------------------------------------------

    def _latency(self, direction: _Direction) -> float:
        with self._lock:
            if not (self._delay or self._loss):
                return 0.0
            latency = self._delay + self._random.uniform(-self._jitter, self._jitter)
            if self._loss and self._random.random() < self._loss:
                direction.losses += 1
                latency += MIN_RTO * 2 ** min(direction.losses - 1, 5)
            else:
                direction.losses = 0
            return latency

    def _saw(self, data: bytes) -> None:
        now, held = time.time(), self.is_cut()
        for match in _HTTP_REQUEST.finditer(data):
            seen = SeenRequest(now, match[1].decode(), match[2].decode(errors="replace"), held)
            self.requests.append(seen)
            if self.on_request is not None:
                self.on_request(seen)

    def _reset_all(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            _reset(sock)

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._refusing:
                _reset(client)
                continue
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        with self._lock:
            self._sockets.append(client)
        # A connection made during a cut gets nowhere until the cut ends.
        while self.is_cut() and not self.closed:
            time.sleep(0.02)
        if self._refusing or self.closed:
            _reset(client)
            return
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            _reset(client)
            return
        upstream.settimeout(None)
        with self._lock:
            self._sockets.append(upstream)
        _Direction(self, client, upstream, upstream=True).start()
        _Direction(self, upstream, client, upstream=False).start()


def _reset(sock: socket.socket) -> None:
    """Close with RST (linger 0), as a refusing or crashed peer would."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _with_port(url: str, port: int, *, query: str | None = None) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = netloc[-1].rsplit(":", 1)[0]
    userinfo = netloc[0] + "@" if len(netloc) == 2 else ""
    return urlunsplit(
        parts._replace(
            netloc=f"{userinfo}{host}:{port}", query=parts.query if query is None else query
        )
    )


class ProxyGroup:
    """Several :class:`FaultProxy` faulted together: one link to a cluster (every etcd
    member's endpoint), so that a cut leaves no member to fail over to."""

    def __init__(self, proxies: list[FaultProxy]) -> None:
        self.proxies = proxies

    def cut(self) -> None:
        for proxy in self.proxies:
            proxy.cut()

    def refuse(self) -> None:
        for proxy in self.proxies:
            proxy.refuse()

    def degrade(self, *, delay: float = 0.0, jitter: float = 0.0, loss: float = 0.0) -> None:
        for proxy in self.proxies:
            proxy.degrade(delay=delay, jitter=jitter, loss=loss)

    def restore(self) -> None:
        for proxy in self.proxies:
            proxy.restore()

    def close(self) -> None:
        for proxy in self.proxies:
            proxy.close()


class ProcessLinks:
    """One process's links, each a :class:`FaultProxy` (etcd: a :class:`ProxyGroup`, one
    proxy per member endpoint).

    :param env: the run's ``MIGRATOR_*`` variables (the real addresses): database, etcd
        endpoints, broker and registry URLs.
    :param name: whose links (``worker-0``...), for messages.
    :param broker_heartbeat: the AMQP heartbeat (s) this process asks RabbitMQ for: how soon
        the broker notices a silent partition (about two heartbeats); None keeps the URL's.
    :param services: which links go through proxies (the others stay direct).
    """

    SERVICES = ("etcd", "postgres", "rabbitmq", "registry")

    def __init__(self, env: Mapping[str, str], *, name: str,
                 broker_heartbeat: int | None = None,
                 services: tuple[str, ...] = SERVICES) -> None:  # fmt: skip
        self.name = name
        if not set(services) <= set(self.SERVICES):
            raise ValueError(f"services must be among {self.SERVICES}")
        self.services = services
        self._urls = {
            "postgres": env["MIGRATOR_DATABASE_URL"],
            "rabbitmq": env["MIGRATOR_BROKER_URL"],
            "registry": env["MIGRATOR_REGISTRY_URL"],
        }
        targets = {
            s: (urlsplit(u).hostname or "127.0.0.1", urlsplit(u).port or 0)
            for s, u in self._urls.items()
        }
        self.proxies: dict[str, FaultProxy] = {
            service: FaultProxy(
                name=f"{name}/{service}",
                target=targets[service],
                record_http=service == "registry",
            )
            for service in services
            if service != "etcd"
        }
        self.etcd: ProxyGroup | None = None
        if "etcd" in services:
            self.etcd = ProxyGroup([
                FaultProxy(name=f"{name}/etcd-{i}", target=_host_port(endpoint))
                for i, endpoint in enumerate(env["MIGRATOR_ETCD_ENDPOINTS"].split(","))
            ])  # fmt: skip
        self.broker_heartbeat = broker_heartbeat

    def __getitem__(self, service: str) -> FaultProxy:
        """The proxy of ``service`` (a single one: use :attr:`etcd` for etcd's group)."""
        if service == "etcd" and self.etcd is not None and len(self.etcd.proxies) == 1:
            return self.etcd.proxies[0]
        return self.proxies[service]

    def env(self) -> dict[str, str]:
        """The process's ``MIGRATOR_*`` addresses of the proxied links, each pointing at
        its proxy."""
        out: dict[str, str] = {}
        if self.etcd is not None:
            out["MIGRATOR_ETCD_ENDPOINTS"] = ",".join(
                f"127.0.0.1:{proxy.port}" for proxy in self.etcd.proxies
            )
        if "postgres" in self.proxies:
            out["MIGRATOR_DATABASE_URL"] = _with_port(
                self._urls["postgres"], self.proxies["postgres"].port
            )
        if "rabbitmq" in self.proxies:
            broker = self._urls["rabbitmq"]
            query = None
            if self.broker_heartbeat is not None:
                kept = [
                    q for q in urlsplit(broker).query.split("&")
                    if q and not q.startswith("heartbeat=")
                ]  # fmt: skip
                query = "&".join([*kept, f"heartbeat={self.broker_heartbeat}"])
            out["MIGRATOR_BROKER_URL"] = _with_port(
                broker, self.proxies["rabbitmq"].port, query=query
            )
        if "registry" in self.proxies:
            out["MIGRATOR_REGISTRY_URL"] = _with_port(
                self._urls["registry"], self.proxies["registry"].port
            )
        return out

    def restore(self) -> None:
        for proxy in self.proxies.values():
            proxy.restore()
        if self.etcd is not None:
            self.etcd.restore()

    def close(self) -> None:
        for proxy in self.proxies.values():
            proxy.close()
        if self.etcd is not None:
            self.etcd.close()

    def __enter__(self) -> ProcessLinks:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.close()
