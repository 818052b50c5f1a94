"""Holding one key on a session, with a fencing token.

Like etcd's Go ``concurrency.Mutex``, the identity of a hold is the key's
``create_revision``: etcd's revisions only grow, so a later holder of the same key always
has a larger token than any earlier one. Whoever guards a resource with the key (a
PostgreSQL row, another etcd key) names the token in every write and refuses a token
older than the newest it has seen — a paused holder whose lease expired can then never
overwrite the work of the next one.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime

from leases import _log
from leases.errors import EtcdNoSpace, LeaseError
from leases.etcd import EtcdClient
from leases.session import Session

log = _log.get_logger(__name__)

#: The longest host, actor or message id written into a key's value (characters).
MAX_FIELD_CHARS = 100
#: The most bytes a holder's value can take: three fields of 100 characters of at most 6
#: bytes each (a control character's JSON escape), the pid, the time and the JSON around.
MAX_HOLDER_BYTES = 3 * 6 * MAX_FIELD_CHARS + 160


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _cut(value: object) -> object:
    """A free-form field as written into a key's value: text cut at MAX_FIELD_CHARS."""
    return value[:MAX_FIELD_CHARS] if isinstance(value, str) else value


@dataclass(frozen=True, kw_only=True)
class HolderInfo:
    """Who holds a key: stored as the key's JSON value, shown to operators.

    :param host: host name of the holding process.
    :param pid: its process id.
    :param actor: the actor (or command) that took the key.
    :param message_id: the message being processed, when there is one.
    :param acquired_at: ISO 8601 time the key was taken.
    """

    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    actor: str | None = None
    message_id: str | None = None
    acquired_at: str = field(default_factory=_now)

    def to_json(self) -> bytes:
        """The key's value: compact JSON, at most :data:`MAX_HOLDER_BYTES` (about 160-200
        bytes for a worker's hold). Every hold writes it into etcd's history, so the free-form
        fields are cut at :data:`MAX_FIELD_CHARS`."""
        # By hand, not dataclasses.asdict (its deep copy was 3 % of a worker's CPU in
        # bench/pipeline.py's profile: every create writes one; 28 -> 6 us).
        data = {
            "host": _cut(self.host),
            "pid": self.pid,
            "actor": _cut(self.actor),
            "message_id": _cut(self.message_id),
            "acquired_at": self.acquired_at,
        }
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> HolderInfo:
        """Parse a key's value; a value written by something else is shown, not rejected."""
        try:
            data = json.loads(raw)
            if not isinstance(data, Mapping):
                raise TypeError
            return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})
        except (ValueError, TypeError):
            return cls(host="?", pid=0, actor=raw[:200].decode(errors="replace"), acquired_at="?")

    def describe(self) -> str:
        who = f"{self.host}:{self.pid}"
        what = " ".join(p for p in (self.actor, self.message_id) if p)
        return f"{who} {what} since {self.acquired_at}".replace("  ", " ")


class Hold:
    """A key this process holds on its session's lease, created at revision :attr:`token`.

    Everything a hold needs comes from its session: the client that writes the key and the
    lease it lives on. An operator's key on a standalone lease has no session; it is made
    with :meth:`standalone`.

    :param session: the session whose lease the key is attached to.
    :param key: the etcd key.
    :param token: the key's create_revision: the fencing token.
    :param holder: what was written as the key's value.
    """

    def __init__(self, session: Session, *, key: str, token: int, holder: HolderInfo) -> None:
        self._init(
            client=session.client,
            session=session,
            lease_id=session.lease_id,
            key=key,
            token=token,
            holder=holder,
        )

    @classmethod
    def standalone(
        cls, client: EtcdClient, *, lease_id: int, key: str, token: int, holder: HolderInfo
    ) -> Hold:
        """A hold on a lease nobody keeps alive (see :func:`leases.admin.take`): never lost,
        unbounded :meth:`remaining`; the key goes when released or when the lease expires."""
        hold = cls.__new__(cls)
        hold._init(
            client=client, session=None, lease_id=lease_id, key=key, token=token, holder=holder
        )
        return hold

    def _init(
        self,
        *,
        client: EtcdClient,
        session: Session | None,
        lease_id: int,
        key: str,
        token: int,
        holder: HolderInfo,
    ) -> None:
        self.client = client
        self.session = session
        self.lease_id = lease_id
        self.key = key
        self.token = token
        self.holder = holder
        self.released = False

    def __repr__(self) -> str:
        return f"Hold({self.key!r}, token={self.token})"

    @property
    def lost(self) -> bool:
        """True when the session behind the hold is lost (the key is gone or about to be)."""
        return self.session is not None and self.session.lost

    def remaining(self) -> float:
        """Seconds this hold is sure to last (see :meth:`Session.remaining`); a standalone
        hold (an operator's, on a lease of its own) has no session to ask: unbounded."""
        return self.session.remaining() if self.session is not None else math.inf

    def is_current(self) -> bool:
        """Ask etcd whether the key is still this incarnation (raises EtcdUnavailable)."""
        current = self.client.get(self.key)
        return current is not None and current.create_revision == self.token

    def fenced_put(self, key: str, value: bytes) -> bool:
        """Write ``key`` only while this hold's token is current; False when it is not."""
        if self.lost:
            return False
        return self.client.put_if_created_at(self.key, self.token, key, value)

    def release(self) -> bool:
        """Delete the key if it is still ours; True when it was. Idempotent.

        A key that has since expired and been taken by someone else is left alone.
        """
        if self.released:
            return False
        self.released = True
        try:
            deleted = self.client.delete_if_created_at(self.key, self.token)
        except LeaseError:
            # The key lives on a lease kept alive: the session deletes it in the background
            # (it would otherwise stay as long as the process lives).
            if self.session is not None and not self.session.lost:
                self.session.release_later(self.key, self.token)
            raise
        if self.session is not None:
            self.session.note_deleted(self.key, self.token)
        return deleted

    def __enter__(self) -> Hold:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.release()
        except LeaseError as error:
            log.warning(
                "lease_release_failed",
                key=self.key,
                token=self.token,
                error=str(error),
                consequence="deleted in the background, or with the session's lease",
            )


@dataclass(frozen=True)
class Acquisition:
    """The answer of :func:`try_acquire`: a hold, or who holds the key instead.

    Truthy when acquired.
    """

    hold: Hold | None
    holder: HolderInfo | None = None
    holder_token: int | None = None
    #: The etcd lease the holder's key is attached to (0: none known), for
    #: :meth:`EtcdClient.time_to_live`: how long a holder that died may still block.
    holder_lease_id: int = 0
    #: The store's revision the answer was read at: a wait for the holder's delete watches
    #: from the next one (0 when etcd was not asked).
    revision: int = 0
    #: True when the holder is this session, which answered without asking etcd.
    held_here: bool = False

    def __bool__(self) -> bool:
        return self.hold is not None


def try_acquire(
    session: Session,
    key: str,
    *,
    holder: HolderInfo | None = None,
) -> Acquisition:
    """Take ``key`` on the session's lease if nobody holds it: one etcd transaction, or
    none when this session holds the key already (another thread's hold: busy).

    :param session: a live session; its lease carries the key.
    :param key: the etcd key to hold.
    :param holder: what to store as the value (defaults to this host and pid).
    :returns: an :class:`Acquisition` with the hold, or the current holder when busy.
    :raises SessionLost: the session is lost or closed.
    :raises EtcdUnavailable: etcd could not be reached within the client's timeout.
    """
    session.check()
    mine = session.holding(key)
    if mine is not None:
        # Another thread of this process holds it (runs in parallel read the same
        # candidates): busy, and etcd would only say so at the cost of a write's round.
        return Acquisition(None, mine.holder, mine.token, session.lease_id, held_here=True)
    return _acquire(session, key, holder or HolderInfo())


def _acquire(session: Session, key: str, holder: HolderInfo) -> Acquisition:
    """One create of ``key`` on the session's lease, recorded on the session if taken."""
    acquisition = _create(session.client, session, session.lease_id, key, holder)
    if acquisition.hold is not None:
        session.note_held(acquisition.hold)
    return acquisition


def acquire_within(
    session: Session,
    key: str,
    *,
    timeout: float,
    holder: HolderInfo | None = None,
) -> Acquisition:
    """:func:`try_acquire`, waiting up to ``timeout`` seconds for a holder to let go.

    Waits as etcd's Go ``Mutex`` does: after a failed try, one watch on the key from the
    revision that try read, until etcd reports the key deleted (released, or its lease
    expired); then one more try. No polling: a wait costs a transaction per delete seen plus
    one, and the key is taken within a round trip or two of its delete.

    :param timeout: seconds to keep waiting; the last answer is returned when they pass.
    :raises SessionLost: the session is lost or closed.
    :raises EtcdUnavailable: etcd could not be reached within the client's timeout.
    """
    deadline = time.monotonic() + timeout
    while True:
        # Always etcd's answer: the wait watches from the revision it was read at.
        session.check()
        acquisition = _acquire(session, key, holder or HolderInfo())
        remaining = deadline - time.monotonic()
        if acquisition or remaining <= 0:
            return acquisition
        if acquisition.holder_token is None:
            continue  # deleted between the compare and the read: try again at once
        if not session.client.wait_deleted(
            key, after_revision=acquisition.revision, timeout=remaining
        ):
            return acquisition  # no delete before the deadline: the holder still holds it


def _create(
    client: EtcdClient, session: Session | None, lease_id: int, key: str, holder: HolderInfo
) -> Acquisition:
    # Dated now: each create writes a value of its own, which is how a create whose answer
    # was an error is told from a later one of ours (undo_uncertain_create).
    holder = replace(holder, acquired_at=_now())
    value = holder.to_json()
    try:
        result = client.create(key, value, lease_id=lease_id)
    except EtcdNoSpace:
        # etcd answered, so it can be asked at once.
        undo_uncertain_create(client, session, lease_id, key, value)
        raise
    except LeaseError:
        # A timeout or a broken connection: etcd may not answer a read either, and the
        # caller must not wait for it a second time. The session looks in the background.
        if session is not None and not session.lost:
            session.release_later(key, value=value)
        raise
    current = result.current
    if result.created and current is not None:
        token = current.create_revision
        hold = (
            Hold(session, key=key, token=token, holder=holder)
            if session is not None
            else Hold.standalone(client, lease_id=lease_id, key=key, token=token, holder=holder)
        )
        return Acquisition(hold, revision=result.revision)
    if current is None:  # held a moment ago, gone before the read: report busy, caller retries
        return Acquisition(None, None, None, revision=result.revision)
    return Acquisition(
        None,
        HolderInfo.from_json(current.value),
        current.create_revision,
        current.lease_id,
        revision=result.revision,
    )


def undo_uncertain_create(
    client: EtcdClient, session: Session | None, lease_id: int, key: str, value: bytes
) -> None:
    """Delete ``key`` if a create of ours that raised had in fact landed.

    A create answered with an error may have landed: etcd applies the write that
    crosses its quota and then answers NOSPACE (its quota applier); a timeout or a
    dropped connection tells nothing either way (those the session looks into in the
    background, see :func:`_create`). Such a key is nobody's hold, yet it lives
    on the session's lease, which keep-alive keeps alive: its repository would stay taken
    until the process ends. Delete it if it is there and ours (on our lease, with the value
    we wrote); if etcd cannot say, the session tries again in the background."""
    try:
        token = client.delete_if_ours(key, lease_id=lease_id, value=value)
    except LeaseError as error:
        log.warning("lease_create_uncertain", key=key, error=str(error))
        if session is not None and not session.lost:
            session.release_later(key, value=value)
        return
    if token is not None:
        log.warning(
            "lease_create_undone",
            key=key,
            token=token,
            why="etcd answered the create with an error, but it had landed",
        )


@contextmanager
def acquired(
    session: Session, key: str, *, holder: HolderInfo | None = None
) -> Iterator[Acquisition]:
    """Context-manager form of :func:`try_acquire`: releases the key on exit if taken."""
    acquisition = try_acquire(session, key, holder=holder)
    if acquisition.hold is None:
        yield acquisition
        return
    with acquisition.hold:
        yield acquisition
