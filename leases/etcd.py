"""The etcd client, behind one module.

Everything else in :mod:`leases` speaks to etcd through :class:`EtcdClient` and its
plain data types, so the client library (python-etcd3 0.12 on gRPC today) can be swapped
without touching the lease logic. Every call has a deadline and every failure surfaces as
:class:`~leases.errors.EtcdUnavailable`; there is no per-node lockout after an error, so a
restarted etcd is used again as soon as it answers.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

# Before gRPC is imported (etcd3 imports it): no gRPC fork handlers. They run in every fork()
# child, and with a Session's keep-alive thread inside a gRPC call they sometimes aborted
# the child (SIGABRT, "epoll_wait error: Bad file descriptor") before it could exec: seen
# when a benchmark holding a session started a worker (2 of 60 forks in a loop). Nothing
# here uses a channel across a fork: children exec, or open their own client after it
# (actors.runtime). A value set by the operator still wins.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import etcd3
import etcd3.etcdrpc as rpc
import grpc
from etcd3.etcdrpc import kv_pb2

from leases import _wire
from leases._batch import TxnBatcher
from leases.errors import EtcdNoSpace, EtcdUnavailable

T = TypeVar("T")

# gRPC backs off reconnecting up to 120 s by default; a restarted etcd must be seen in
# about a second, and a dead member of a cluster left for the next one quickly.
# Keep-alive pings find a dead connection under a long-lived call (a Session's keep-alive
# stream). etcd's server enforces: pings at most every --grpc-keepalive-min-time (5 s), and
# none at all on a connection without an open call (PermitWithoutStream false); three
# offending pings and it closes the connection with GOAWAY "too_many_pings" (seen every
# ~30 s on an idle client that pinged without calls). So: ping every 10 s, only while a call
# is open; a call on an idle connection has its own deadline. No limit on pings without
# data: a quiet stream must still be pinged (etcd allows it while the stream is open).
_GRPC_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 2000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
]


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One etcd key as read: value and the revisions that identify its incarnation."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease_id: int


@dataclass(frozen=True, slots=True)
class CreateResult:
    """Outcome of :meth:`EtcdClient.create`: ``created``, the key as it now stands, and the
    store's revision the answer was read at (a watch for the holder's delete starts after it).
    """

    created: bool
    current: KeyValue | None
    revision: int = 0


def _prefix_end(prefix: bytes) -> bytes:
    """The first key after every key starting with ``prefix`` (etcd's range end)."""
    end = bytearray(prefix)
    for i in reversed(range(len(end))):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"


def _kv(kv: Any) -> KeyValue:
    """A ``KeyValue`` from a parsed ``mvccpb.KeyValue`` message."""
    return KeyValue(
        key=kv.key.decode(),
        value=bytes(kv.value),
        create_revision=kv.create_revision,
        mod_revision=kv.mod_revision,
        lease_id=kv.lease,
    )


def _wire_kv(kv: _wire.WireKeyValue) -> KeyValue:
    """A ``KeyValue`` from one decoded by :mod:`leases._wire`."""
    return KeyValue(
        key=kv.key.decode(),
        value=kv.value,
        create_revision=kv.create_revision,
        mod_revision=kv.mod_revision,
        lease_id=kv.lease,
    )


class EtcdClient:
    """A thin, typed etcd v3 client with deadlines on every call.

    :param endpoints: ``(host, port)`` pairs; with several, gRPC picks a live one and moves
        to another when it fails.
    :param timeout: seconds allowed for every unary call.
    :param ca_cert: PEM file of the CA that signed etcd's certificate (enables TLS).
    :param cert_cert: client certificate (PEM) for client-certificate auth.
    :param cert_key: client key (PEM).
    :param user: etcd user name (with ``password``).
    :param password: etcd user password.
    """

    def __init__(
        self,
        endpoints: Sequence[tuple[str, int]],
        *,
        timeout: float = 5.0,
        ca_cert: str | None = None,
        cert_cert: str | None = None,
        cert_key: str | None = None,
        user: str | None = None,
        password: str | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        self.endpoints = tuple(endpoints)
        self.timeout = timeout
        # For per_member(): the same credentials towards each member alone.
        self._options: dict[str, Any] = {
            "timeout": timeout,
            "ca_cert": ca_cert,
            "cert_cert": cert_cert,
            "cert_key": cert_key,
            "user": user,
            "password": password,
        }
        # python-etcd3 formats its target as "host:port"; a gRPC "ipv4:"/"dns:" target with
        # every endpoint gives it the whole cluster in one channel.
        options = list(_GRPC_OPTIONS)
        if len(self.endpoints) == 1:
            host, port = self.endpoints[0]
        else:
            if not all(h.replace(".", "").isdigit() for h, _ in self.endpoints):
                raise ValueError("several etcd endpoints must be IPv4 addresses")
            *head, (last_host, port) = self.endpoints
            host = "ipv4:" + ",".join(f"{h}:{p}" for h, p in head) + f",{last_host}"
            # Keep a connection to every member: when one dies the others are ready at once
            # (pick_first would first have to notice and reconnect).
            options.append(("grpc.lb_policy_name", "round_robin"))
        try:
            self._client = etcd3.client(
                host=host,
                port=port,
                ca_cert=ca_cert,
                cert_cert=cert_cert,
                cert_key=cert_key,
                timeout=timeout,
                user=user,
                password=password,
                grpc_options=options,
            )
        except grpc.RpcError as error:
            raise EtcdUnavailable(f"etcd authentication failed: {_describe(error)}") from error
        self._kv = self._client.kvstub
        # The transactions sent on every hold (create, delete-if-created-at, fenced put) go
        # as bytes encoded by leases._wire and come back decoded by it: protobuf 3.20 is
        # pure Python here, and building, serializing and parsing those nested messages was
        # most of a hold's client CPU. Same method, channel, metadata and deadlines as the
        # stub's Txn; a malformed answer (ValueError in the decoder) fails the call as
        # grpc.RpcError INTERNAL, as a protobuf DecodeError does.
        self._txn = self._client.channel.unary_unary(
            "/etcdserverpb.KV/Txn",
            request_serializer=None,  # the request is already bytes
            response_deserializer=_wire.decode_txn_response,
        )
        # The same method for a batch of them nested in one (leases._batch).
        self._txn_nested = self._client.channel.unary_unary(
            "/etcdserverpb.KV/Txn",
            request_serializer=None,
            response_deserializer=_wire.decode_nested_txn_response,
        )
        # Creates and deletes of a hold, the transactions every step sends twice, go
        # together with those the process's other threads send meanwhile.
        self._batcher = TxnBatcher(
            send_one=lambda request: self._with_fresh_token(
                lambda: self._txn(request, self.timeout, **self._auth)
            ),
            send_many=lambda requests: self._with_fresh_token(
                lambda: self._txn_nested(_wire.nested_txn(requests), self.timeout, **self._auth)
            ),
            alone_after=_refused_by_etcd,
        )
        # A prefix range (the gate's markers, a breaker's state: read on every trigger and
        # notification) the same way: its RangeRequest/RangeResponse in protobuf cost ~0.1 ms.
        self._range = self._client.channel.unary_unary(
            "/etcdserverpb.KV/Range",
            request_serializer=None,  # the request is already bytes
            response_deserializer=_wire.decode_range_response,
        )
        self._lease = self._client.leasestub
        self._watch = rpc.WatchStub(self._client.channel)
        self._maintenance = self._client.maintenancestub
        # Status goes through the decoder of leases._wire: python-etcd3's StatusResponse
        # has no dbSizeInUse (etcd 3.4).
        self._status = self._client.channel.unary_unary(
            "/etcdserverpb.Maintenance/Status",
            request_serializer=None,  # StatusRequest is empty: b""
            response_deserializer=_wire.decode_status_response,
        )
        self._user = user
        self._password = password
        self._auth_lock = threading.Lock()
        # The token goes as plain call metadata only: python-etcd3 also attaches it as gRPC
        # call credentials, which gRPC refuses to send on a plaintext channel
        # (UNAUTHENTICATED: "insufficient security level"), so user/password auth without
        # TLS would fail on every call. Metadata works on both kinds of channel.
        self._auth: dict[str, Any] = {"metadata": self._client.metadata}

    def __repr__(self) -> str:
        return f"EtcdClient({','.join(f'{h}:{p}' for h, p in self.endpoints)})"

    def per_member(self) -> list[EtcdClient]:
        """One new client per endpoint, same credentials: for what must reach each member
        (status, defragment). The caller closes them."""
        return [EtcdClient([endpoint], **self._options) for endpoint in self.endpoints]

    def close(self) -> None:
        """Close the channel; calls in flight fail."""
        self._client.close()

    def __enter__(self) -> EtcdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, what: str, call: Callable[[], T]) -> T:
        try:
            return self._with_fresh_token(call)
        except grpc.RpcError as error:
            raise _unavailable(f"etcd {what} failed", error) from error

    def _send_txn(self, what: str, request: bytes) -> _wire.TxnReply:
        """Send a ``TxnRequest`` encoded by :mod:`leases._wire`; its decoded answer.

        :param what: the operation, for the error message.
        :param request: the encoded request.
        """
        reply: _wire.TxnReply = self._call(
            what, lambda: self._txn(request, self.timeout, **self._auth)
        )
        return reply

    def _send_batched(self, what: str, key: bytes, request: bytes) -> _wire.TxnReply:
        """Send a ``TxnRequest`` on ``key`` through the batcher; its decoded answer.

        :param what: the operation, for the error message.
        """
        try:
            return self._batcher.send(key, request)
        except grpc.RpcError as error:
            raise _unavailable(f"etcd {what} failed", error) from error

    def _with_fresh_token(self, call: Callable[[], T]) -> T:
        """``call()``; once more with a new token when etcd says the token expired.

        etcd's simple tokens expire after ``--auth-token-ttl`` (5 min) without use, and
        every token is refused after the auth store changed: an idle process would
        otherwise fail every call from then on.
        """
        try:
            return call()
        except grpc.RpcError as error:
            if self._user is None or not _token_refused(error):
                raise
            self._reauthenticate()
            return call()

    def _reauthenticate(self) -> None:
        request = rpc.AuthenticateRequest(name=self._user, password=self._password)
        with self._auth_lock:
            response = self._client.auth_stub.Authenticate(request, self.timeout)
            self._auth = {"metadata": (("token", response.token),)}

    # -- leases -------------------------------------------------------------------------

    def grant(self, ttl: int) -> tuple[int, int]:
        """Grant a lease; returns ``(lease_id, granted_ttl)``."""
        response = self._call(
            "lease grant",
            lambda: self._lease.LeaseGrant(
                rpc.LeaseGrantRequest(TTL=ttl), self.timeout, **self._auth
            ),
        )
        return response.ID, response.TTL

    def revoke(self, lease_id: int) -> None:
        """Revoke a lease: every key attached to it is deleted at once."""
        request = rpc.LeaseRevokeRequest(ID=lease_id)
        try:
            self._with_fresh_token(
                lambda: self._lease.LeaseRevoke(request, self.timeout, **self._auth)
            )
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return  # already expired: the keys are gone, which is what revoke wants
            raise _unavailable("etcd lease revoke failed", error) from error

    def time_to_live(self, lease_id: int) -> int:
        """Seconds the lease has left; -1 when it does not exist (expired or revoked)."""
        response = self._call(
            "lease time-to-live",
            lambda: self._lease.LeaseTimeToLive(
                rpc.LeaseTimeToLiveRequest(ID=lease_id), self.timeout, **self._auth
            ),
        )
        return int(response.TTL)

    def keepalive_stream(self, lease_id: int) -> KeepAliveStream:
        """Open one long-lived keep-alive stream for ``lease_id``."""
        return KeepAliveStream(self._lease, lease_id, self._auth)

    # -- keys ---------------------------------------------------------------------------

    def get(self, key: str) -> KeyValue | None:
        """The key, or None when it does not exist."""
        request = rpc.RangeRequest(key=key.encode())
        response = self._call("get", lambda: self._kv.Range(request, self.timeout, **self._auth))
        return _kv(response.kvs[0]) if response.kvs else None

    def get_prefix(self, prefix: str, *, limit: int = 0) -> list[KeyValue]:
        """Every key under ``prefix``, oldest incarnation (create revision) first."""
        raw = prefix.encode()
        request = _wire.range_request(
            raw,
            _prefix_end(raw),
            limit=limit,
            sort_order=_wire.SORT_ASCEND,
            sort_target=_wire.SORT_BY_CREATE,
        )
        kvs: list[_wire.WireKeyValue] = self._call(
            "range", lambda: self._range(request, self.timeout, **self._auth)
        )
        return [_wire_kv(kv) for kv in kvs]

    def last_created_before(
        self, prefix: str, *, max_create_revision: int
    ) -> tuple[KeyValue | None, int]:
        """The key under ``prefix`` created last at or before ``max_create_revision`` (None
        when there is none), and the store's revision the answer was read at.

        An election's candidate waits for the one just ahead of it in line (etcd's Go
        ``waitDeletes``): only that key's delete can make it the leader's successor.
        """
        raw = prefix.encode()
        request = rpc.RangeRequest(
            key=raw,
            range_end=_prefix_end(raw),
            limit=1,
            sort_order=rpc.RangeRequest.DESCEND,
            sort_target=rpc.RangeRequest.CREATE,
            max_create_revision=max_create_revision,
        )
        response = self._call("range", lambda: self._kv.Range(request, self.timeout, **self._auth))
        return (_kv(response.kvs[0]) if response.kvs else None), int(response.header.revision)

    def wait_deleted(
        self, key: str, *, after_revision: int, timeout: float, prefix: bool = False
    ) -> bool:
        """Block until ``key`` (with ``prefix``: any key under it) is deleted at a revision
        after ``after_revision``; True when it was, False when ``timeout`` passed first.

        One watch stream for this wait alone, opened from ``after_revision + 1`` so that a
        delete made between the caller's read and the watch's start is still seen (etcd
        replays it from its history), and closed before returning. Deletes only (etcd's
        NOPUT filter): a put never wakes the waiter. When the history was compacted past
        ``after_revision`` the answer is True: the caller looks again, as after a delete.

        python-etcd3's own watch (``watch``, ``watch_once``, ``add_watch_callback``) is not
        used: it runs every watch of a client on one stream served by a thread that never
        ends, spins when etcd is down (kragniz/python-etcd3#291), raises in that thread after
        :meth:`close` (#997), and keeps the auth token it started with (#1227).

        :param key: the key, or the prefix with ``prefix=True``.
        :param after_revision: the revision the caller read the key at.
        :param timeout: seconds to wait at most (the stream's gRPC deadline).
        :raises EtcdUnavailable: etcd could not be reached or refused the watch.
        """
        if timeout <= 0:
            return False
        raw = key.encode()
        create = rpc.WatchCreateRequest(
            key=raw,
            start_revision=after_revision + 1,
            filters=[rpc.WatchCreateRequest.NOPUT],
        )
        if prefix:
            create.range_end = _prefix_end(raw)

        def watch() -> bool:
            done: queue.SimpleQueue[None] = queue.SimpleQueue()

            def requests() -> Iterator[Any]:
                yield rpc.WatchRequest(create_request=create)
                done.get()  # keep our side open: the watch lives until we cancel it

            call = self._watch.Watch(requests(), timeout, **self._auth)
            try:
                for response in call:
                    if response.compact_revision:
                        return True  # the delete may be in the compacted history: look again
                    if response.canceled:
                        raise EtcdUnavailable(f"etcd cancelled the watch: {response.cancel_reason}")
                    if any(event.type == kv_pb2.Event.DELETE for event in response.events):
                        return True
                return False
            finally:
                done.put(None)
                call.cancel()

        try:
            return self._with_fresh_token(watch)
        except grpc.RpcError as error:
            # The deadline may end the stream from either side: the server's end arrives as
            # UNKNOWN "context deadline exceeded" (seen in CI).
            if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED or (
                error.code() == grpc.StatusCode.UNKNOWN
                and "deadline exceeded" in (error.details() or "")
            ):
                return False
            raise _unavailable("etcd watch failed", error) from error

    def count_prefix(self, prefix: str) -> int:
        """How many keys are under ``prefix`` (no values are sent)."""
        raw = prefix.encode()
        request = rpc.RangeRequest(key=raw, range_end=_prefix_end(raw), count_only=True)
        response = self._call("count", lambda: self._kv.Range(request, self.timeout, **self._auth))
        return int(response.count)

    def create(self, key: str, value: bytes, *, lease_id: int = 0) -> CreateResult:
        """Create ``key`` only if it does not exist, in one transaction, and read it back.

        Either way the answer carries the key as it stands after the transaction: ours with
        its fresh create revision, or the current holder's.
        """
        # compare create_revision(key) == 0; success: put on the lease; failure: read the key.
        raw = key.encode()
        reply = self._send_batched("create", raw, _wire.create_txn(raw, value, lease_id))
        if reply.succeeded:
            # The put is the transaction's only write, so the revision the transaction made is
            # the key's create revision (etcd's Go Mutex reads its token the same way): no
            # read-back, whose request and answer cost more to build and parse than they tell.
            revision = reply.revision
            created = KeyValue(
                key=key,
                value=bytes(value),
                create_revision=revision,
                mod_revision=revision,
                lease_id=lease_id,
            )
            return CreateResult(created=True, current=created, revision=revision)
        kvs = reply.range_kvs
        return CreateResult(
            created=False, current=_wire_kv(kvs[0]) if kvs else None, revision=reply.revision
        )

    def delete_if_created_at(self, key: str, create_revision: int) -> bool:
        """Delete ``key`` only while it is still the incarnation created at ``create_revision``."""
        raw = key.encode()
        reply = self._send_batched(
            "delete", raw, _wire.delete_if_created_at_txn(raw, create_revision)
        )
        return reply.succeeded

    def delete_if_ours(self, key: str, *, lease_id: int, value: bytes) -> int | None:
        """Delete ``key`` if it is the one a create of ours wrote (on ``lease_id``, with
        ``value``), though that create raised: its token (create_revision) when deleted,
        None when the key is absent or not ours (a newer incarnation is never deleted)."""
        current = self.get(key)
        if current is None or current.lease_id != lease_id or current.value != value:
            return None
        if not self.delete_if_created_at(key, current.create_revision):
            return None
        return current.create_revision

    def put_if_created_at(
        self, guard_key: str, create_revision: int, key: str, value: bytes
    ) -> bool:
        """Put ``key`` only while ``guard_key`` is still the incarnation ``create_revision``."""
        request = _wire.put_if_created_at_txn(
            guard_key.encode(), create_revision, key.encode(), value
        )
        reply = self._send_txn("fenced put", request)
        return reply.succeeded

    def put(self, key: str, value: bytes, *, lease_id: int = 0) -> None:
        """Write ``key`` unconditionally (attached to ``lease_id`` when not 0)."""
        request = rpc.PutRequest(key=key.encode(), value=value, lease=lease_id)
        self._call("put", lambda: self._kv.Put(request, self.timeout, **self._auth))

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under ``prefix``; returns how many there were."""
        raw = prefix.encode()
        request = rpc.DeleteRangeRequest(key=raw, range_end=_prefix_end(raw))
        response = self._call(
            "delete range", lambda: self._kv.DeleteRange(request, self.timeout, **self._auth)
        )
        return int(response.deleted)

    def delete(self, key: str) -> bool:
        """Delete ``key`` whoever holds it; True when it existed."""
        request = rpc.DeleteRangeRequest(key=key.encode())
        response = self._call(
            "delete", lambda: self._kv.DeleteRange(request, self.timeout, **self._auth)
        )
        return bool(response.deleted)

    # -- maintenance --------------------------------------------------------------------

    def status(self) -> EtcdStatus:
        """The answering member's status: database size and use, revision, leader.

        With several endpoints any member may answer; use one client per member to read
        each (see :func:`leases.admin.space_report`).
        """
        reply: _wire.StatusReply = self._call(
            "status", lambda: self._status(b"", self.timeout, **self._auth)
        )
        return EtcdStatus(*reply)

    def alarms(self) -> list[tuple[int, str]]:
        """Raised alarms as ``(member_id, "NOSPACE" | "CORRUPT")``; empty when none."""
        request = rpc.AlarmRequest(action=rpc.AlarmRequest.GET, memberID=0, alarm=rpc.NONE)
        response = self._call(
            "alarm list", lambda: self._maintenance.Alarm(request, self.timeout, **self._auth)
        )
        return [(a.memberID, rpc.AlarmType.Name(a.alarm)) for a in response.alarms]

    def disarm_nospace(self) -> int:
        """Disarm every member's NOSPACE alarm; how many were raised.

        Only after the database is below its quota again (compacted and defragmented):
        otherwise the next write raises the alarm again.
        """
        raised = [member for member, alarm in self.alarms() if alarm == "NOSPACE"]
        for member in raised:
            self._disarm(member)
        return len(raised)

    def _disarm(self, member_id: int) -> None:
        request = rpc.AlarmRequest(
            action=rpc.AlarmRequest.DEACTIVATE, memberID=member_id, alarm=rpc.NOSPACE
        )
        self._call(
            "alarm disarm", lambda: self._maintenance.Alarm(request, self.timeout, **self._auth)
        )

    def compact(self, revision: int) -> None:
        """Drop every key version older than ``revision`` (physically, before returning).

        Live keys keep their create revision, so fencing tokens are not affected.
        """
        request = rpc.CompactionRequest(revision=revision, physical=True)
        try:
            self._with_fresh_token(
                lambda: self._kv.Compact(request, max(self.timeout, 60), **self._auth)
            )
        except grpc.RpcError as error:
            if "required revision has been compacted" in _describe(error):
                return  # already compacted at or past it: nothing older is left
            raise _unavailable("etcd compact failed", error) from error

    def defragment(self, *, timeout: float = 120) -> None:
        """Defragment the answering member: give the space compaction freed back to the
        file system. It blocks that member's reads and writes while it runs (seconds per
        GB): do one member at a time, on a client of that member only.
        """
        request = rpc.DefragmentRequest()
        self._call(
            "defragment", lambda: self._maintenance.Defragment(request, timeout, **self._auth)
        )


@dataclass(frozen=True, slots=True)
class EtcdStatus:
    """One member's status (``etcdctl endpoint status``).

    :param member_id: the answering member.
    :param revision: the store's current revision.
    :param db_size: bytes of the database file (what the quota counts).
    :param db_size_in_use: bytes of it in use; the rest is free space a defragmentation
        would give back (0 from etcd before 3.4).
    :param leader: the member id of the leader.
    :param raft_index: the raft index.
    """

    member_id: int
    revision: int
    db_size: int
    db_size_in_use: int
    leader: int
    raft_index: int


class KeepAliveStream:
    """One bidirectional LeaseKeepAlive stream, kept open for the life of a session.

    python-etcd3's ``Lease.refresh`` opens a new stream for every refresh; etcd's own
    clients keep one stream per lease open and send a request on it every TTL/3. Requests
    go in through :meth:`send`, answers (the new TTL, 0 when the lease is gone) come out of
    :meth:`responses`.
    """

    _CLOSE = object()

    def __init__(self, lease_stub: Any, lease_id: int, auth: dict[str, Any]) -> None:
        self.lease_id = lease_id
        self._requests: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._call = lease_stub.LeaseKeepAlive(self._request_iterator(), **auth)
        self._closed = threading.Event()

    def _request_iterator(self) -> Iterator[Any]:
        while True:
            item = self._requests.get()
            if item is self._CLOSE:
                return
            yield rpc.LeaseKeepAliveRequest(ID=self.lease_id)

    def send(self) -> None:
        """Ask etcd to refresh the lease; the answer arrives on :meth:`responses`."""
        if not self._closed.is_set():
            self._requests.put(None)

    def responses(self) -> Iterator[int]:
        """The TTL of each answer, in order; ends (or raises EtcdUnavailable) with the stream."""
        try:
            for response in self._call:
                yield int(response.TTL)
        except grpc.RpcError as error:
            if self._closed.is_set():
                return
            raise _unavailable("etcd keep-alive stream failed", error) from error

    def close(self) -> None:
        """End the stream (idempotent)."""
        if not self._closed.is_set():
            self._closed.set()
            self._requests.put(self._CLOSE)
            self._call.cancel()


def _token_refused(error: grpc.RpcError) -> bool:
    """etcd refused the auth token as expired or stale (a new token will do)."""
    code = getattr(error, "code", None)
    details = getattr(error, "details", None)
    text = (details() if callable(details) else "") or ""
    return (callable(code) and code() == grpc.StatusCode.UNAUTHENTICATED) or (
        "invalid auth token" in text or "revision of auth store is old" in text
    )


def _refused_by_etcd(error: BaseException) -> bool:
    """etcd answered the call with an error (not: the call did not get through in time):
    a batch it refused is tried again one transaction at a time."""
    if not isinstance(error, grpc.RpcError):
        return False
    code = getattr(error, "code", None)
    return callable(code) and code() not in _CALL_FAILED


#: Codes of a call that did not get an answer from etcd (the connection, the deadline).
_CALL_FAILED = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)


def _is_nospace(error: grpc.RpcError) -> bool:
    """etcd refused the request because its database reached its quota (NOSPACE alarm)."""
    code = getattr(error, "code", None)
    details = getattr(error, "details", None)
    text = (details() if callable(details) else "") or ""
    # ErrGRPCNoSpace: RESOURCE_EXHAUSTED "etcdserver: mvcc: database space exceeded" (the
    # same code also says "too many requests", which is a plain, passing overload).
    return (
        callable(code)
        and code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        and "database space exceeded" in text
    )


def _unavailable(what: str, error: grpc.RpcError) -> EtcdUnavailable:
    """The error to raise for a failed call: :class:`EtcdNoSpace` when etcd is full."""
    if _is_nospace(error):
        return EtcdNoSpace(
            f"{what}: etcd is out of space (NOSPACE alarm: compact, defragment, then disarm"
            f" the alarm; leases.admin.recover_space): {_describe(error)}"
        )
    return EtcdUnavailable(f"{what}: {_describe(error)}")


def _describe(error: grpc.RpcError) -> str:
    code = getattr(error, "code", None)
    details = getattr(error, "details", None)
    name = code().name if callable(code) else "UNKNOWN"
    text = details() if callable(details) else str(error)
    return f"{name}: {text}"
