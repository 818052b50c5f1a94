"""A session: one etcd lease per process, kept alive in the background.

Modelled on etcd's Go ``concurrency.Session``: every key the process holds is attached to
the session's lease, so a crashed process loses all of them after the TTL, and a graceful
close revokes the lease so they vanish at once.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from leases import _log
from leases.errors import EtcdUnavailable, LeaseError, SessionLost
from leases.etcd import EtcdClient, KeepAliveStream

if TYPE_CHECKING:
    from leases.hold import Hold

log = _log.get_logger(__name__)

MIN_TTL = 2  # etcd rounds a TTL of 1 up to 2 anyway; below that keep-alive can't keep up


class Session:
    """One TTL lease kept alive on a single long-lived stream by a daemon thread.

    The session watches itself: when etcd answers a keep-alive with TTL <= 0 (the lease is
    gone), or no refresh has succeeded for longer than ``ttl - margin`` seconds, it marks
    itself lost. Lost is final: every hold on it reports lost and a new session is needed.

    :param client: the etcd client.
    :param ttl: seconds the lease lives without keep-alive (at least 2).
    :param margin: how long before the TTL runs out, without a successful refresh, the
        session gives up and reports lost (default: a fifth of the TTL, at least 0.5 s).
        Declaring loss before etcd expires the lease keeps the holder from believing in a
        key someone else may already have.
    :param on_lost: called once with the reason when the session finds itself lost (not on
        close), from the keep-alive thread; e.g. to count losses. Must not block.
    :param trust_own_holds_for: seconds after taking a key during which the session itself
        answers "busy" for it (:meth:`holding`), without asking etcd. Bounded because an
        operator may delete a key a live process holds (a stuck holder): after this long,
        this process's other threads ask etcd like everyone else. 0: always ask etcd.
    """

    def __init__(
        self,
        client: EtcdClient,
        *,
        ttl: float = 10,
        margin: float | None = None,
        on_lost: Callable[[str], None] | None = None,
        trust_own_holds_for: float = 2.0,
    ) -> None:
        if ttl < MIN_TTL:
            raise ValueError(f"session TTL must be at least {MIN_TTL} s, got {ttl}")
        self.client = client
        self.ttl = math.ceil(ttl)
        self.margin = max(0.5, self.ttl / 5) if margin is None else margin
        self._lost = threading.Event()
        self._closed = threading.Event()
        self._lost_reason = ""
        self._on_lost = on_lost
        self.lease_id, _ = client.grant(self.ttl)
        self._last_refresh = time.monotonic()
        self._stream: KeepAliveStream | None = None
        self._lock = threading.Lock()  # guards _stream and the lost check-and-set
        # Keys whose release failed, or whose create raised but may have landed, as
        # (key, token or None, value): several per key when several creates of it failed.
        # Deleted in the background (release_later); while the session lives, nothing else
        # would ever remove them.
        self._unreleased: set[tuple[str, int | None, bytes]] = set()
        self._unreleased_changed = threading.Condition()
        self._releaser: threading.Thread | None = None
        # The keys this session holds, by key, with when each was taken: not yet deleted
        # (a hold whose release failed stays until release_later deletes it). A key here is
        # on our lease in etcd, so busy for anyone else, unless an operator deleted it.
        self.trust_own_holds_for = trust_own_holds_for
        self._holds: dict[str, tuple[Hold, float]] = {}
        self._holds_lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._keep_alive, name=f"lease-keepalive-{self.lease_id:x}", daemon=True
        )
        self._thread.start()
        log.debug("lease_session_opened", lease_id=f"{self.lease_id:x}", ttl=self.ttl)

    def __repr__(self) -> str:
        state = "lost" if self.lost else "closed" if self._closed.is_set() else "live"
        return f"Session(lease={self.lease_id:x}, ttl={self.ttl}, {state})"

    @property
    def lost(self) -> bool:
        """True once the lease is gone or could not be refreshed in time (final)."""
        return self._lost.is_set()

    @property
    def lost_reason(self) -> str:
        return self._lost_reason

    @property
    def seconds_since_refresh(self) -> float:
        return time.monotonic() - self._last_refresh

    def remaining(self) -> float:
        """Seconds the lease is sure to live: the TTL from the send of the last keep-alive
        that etcd answered, 0 once lost or closed. A hold must not start anything that can
        outlast it (invariant 8)."""
        if self._lost.is_set() or self._closed.is_set():
            return 0.0
        return max(0.0, self.ttl - self.seconds_since_refresh)

    def check(self) -> None:
        """Raise :class:`SessionLost` when the session is lost or closed."""
        if self._lost.is_set():
            raise SessionLost(f"lease {self.lease_id:x} lost: {self._lost_reason}")
        if self._closed.is_set():
            raise SessionLost(f"lease {self.lease_id:x} closed")

    def holding(self, key: str) -> Hold | None:
        """This session's hold of ``key``, taken less than ``trust_own_holds_for`` seconds
        ago and not released: the key is busy, for this process's other threads too, and
        etcd need not be asked. None: ask etcd."""
        held = self._holds.get(key)
        if held is None or time.monotonic() - held[1] >= self.trust_own_holds_for:
            return None
        return held[0]

    def note_held(self, hold: Hold) -> None:
        """Record ``hold`` (just created on this session's lease) until it is deleted."""
        with self._holds_lock:
            self._holds[hold.key] = (hold, time.monotonic())

    def note_deleted(self, key: str, token: int | None) -> None:
        """Forget the hold of ``key`` created at ``token`` (deleted, or found not ours)."""
        with self._holds_lock:
            held = self._holds.get(key)
            if held is not None and held[0].token == token:
                del self._holds[key]

    def release_later(self, key: str, token: int | None = None, *, value: bytes = b"") -> None:
        """Delete ``key`` in the background if it is still ours: a hold's release failed
        (etcd unreachable, a timeout), or a create whose answer was an error may have landed
        all the same (etcd applies the write that crosses its quota, then answers NOSPACE).
        The key lives on this session's lease, which keep-alive keeps alive: left alone, it
        would stay taken for as long as the process lives, not for a TTL. Tried again every
        TTL / 3 until the delete succeeds, the key is found not ours, or the session ends
        (its keys go with its lease).

        :param key: the key.
        :param token: its create_revision, when known (a newer incarnation is never
            deleted); None: the key is ours if it is on this session's lease with ``value``.
        :param value: with ``token=None``, the value our create wrote.
        """
        with self._unreleased_changed:
            self._unreleased.add((key, token, value))
            if self._releaser is None:
                self._releaser = threading.Thread(
                    target=self._release_unreleased,
                    name=f"lease-releaser-{self.lease_id:x}",
                    daemon=True,
                )
                self._releaser.start()
            self._unreleased_changed.notify()

    def unreleased(self) -> list[tuple[str, int | None]]:
        """The keys waiting for :meth:`release_later`'s delete, with their tokens."""
        with self._unreleased_changed:
            return sorted((key, token) for key, token, _value in self._unreleased)

    def _release_one(self, key: str, token: int | None, value: bytes) -> bool:
        """Delete ``key`` if it is ours; True when it was deleted (False: not ours)."""
        if token is None:
            return self.client.delete_if_ours(key, lease_id=self.lease_id, value=value) is not None
        return self.client.delete_if_created_at(key, token)

    def _release_unreleased(self) -> None:
        interval = self.ttl / 3
        while not self._closed.is_set() and not self._lost.is_set():
            with self._unreleased_changed:
                while not self._unreleased and not self._closed.is_set():
                    self._unreleased_changed.wait(interval)
                pending = list(self._unreleased)
            for key, token, value in pending:
                if self._closed.is_set() or self._lost.is_set():
                    return
                try:
                    deleted = self._release_one(key, token, value)
                except LeaseError as error:
                    log.debug("lease_release_retry_failed", key=key, error=str(error))
                    continue
                with self._unreleased_changed:
                    self._unreleased.discard((key, token, value))
                self.note_deleted(key, token)
                if deleted:
                    log.info("lease_released_late", key=key, token=token)
                else:
                    log.debug("lease_release_not_needed", key=key, token=token)
            with self._unreleased_changed:
                if self._unreleased:
                    self._unreleased_changed.wait(interval)

    def wait_lost(self, timeout: float | None = None) -> bool:
        """Block until the session is lost; True if it was within ``timeout``."""
        return self._lost.wait(timeout)

    def close(self) -> None:
        """Stop the keep-alive and revoke the lease, so every key on it vanishes at once.

        If etcd cannot be reached the keys expire after the TTL instead; close never raises.
        """
        if self._closed.is_set():
            return
        self._closed.set()
        with self._unreleased_changed:
            self._unreleased_changed.notify_all()
        with self._lock:
            if self._stream is not None:
                self._stream.close()
        self._thread.join(timeout=2)
        if not self._lost.is_set():
            try:
                self.client.revoke(self.lease_id)
            except LeaseError as error:
                log.warning(
                    "lease_revoke_failed",
                    lease_id=f"{self.lease_id:x}",
                    error=str(error),
                    consequence=f"keys expire within {self.ttl} s",
                )
        self._mark_lost("closed", notify=False)
        log.debug("lease_session_closed", lease_id=f"{self.lease_id:x}")

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- keep-alive ---------------------------------------------------------------------

    def _mark_lost(self, reason: str, *, notify: bool = True) -> None:
        # The reader and the keep-alive thread may both find the loss: the first one says why.
        with self._lock:
            if self._lost.is_set():
                return
            self._lost_reason = reason
            self._lost.set()
        if notify:
            log.warning("lease_session_lost", lease_id=f"{self.lease_id:x}", reason=reason)
            if self._on_lost is not None:
                try:
                    self._on_lost(reason)
                except Exception as error:  # a callback's bug must not kill the keep-alive
                    log.warning("lease_session_on_lost_failed", error=str(error))

    def _keep_alive(self) -> None:
        interval = self.ttl / 3
        deadline = self.ttl - self.margin
        while not self._closed.is_set() and not self._lost.is_set():
            try:
                stream = self.client.keepalive_stream(self.lease_id)
            except LeaseError as error:
                stream = None
                log.debug("lease_keepalive_stream_failed", error=str(error))
            if stream is not None:
                with self._lock:
                    if self._closed.is_set():
                        stream.close()
                        return
                    self._stream = stream
                # Send times of this stream's unanswered requests, oldest first. Each stream
                # has its own: a reader still draining a closed stream must never take the
                # send time of a request made on the next one.
                sent: collections.deque[float] = collections.deque()
                reader = threading.Thread(
                    target=self._read,
                    args=(stream, sent),
                    name=f"{self._thread.name}-reader",
                    daemon=True,
                )
                reader.start()
                # Send every TTL/3 while the reader sees answers; a broken stream ends the
                # reader, and we open a new one.
                while reader.is_alive() and not self._closed.is_set():
                    sent.append(time.monotonic())
                    stream.send()
                    self._closed.wait(
                        min(interval, max(0.05, deadline - self.seconds_since_refresh))
                    )
                    if self.seconds_since_refresh > deadline:
                        self._mark_lost(
                            f"no keep-alive answer for {self.seconds_since_refresh:.1f} s"
                        )
                        break
                stream.close()
                reader.join(timeout=1)
            if self._closed.is_set() or self._lost.is_set():
                return
            if self.seconds_since_refresh > deadline:
                self._mark_lost(f"no keep-alive answer for {self.seconds_since_refresh:.1f} s")
                return
            self._closed.wait(min(0.2, interval))  # brief pause before reconnecting

    def _read(self, stream: KeepAliveStream, sent: collections.deque[float]) -> None:
        """Take ``stream``'s answers; ``sent`` holds the send times of its requests."""
        try:
            for ttl in stream.responses():
                if ttl <= 0:
                    self._mark_lost("etcd says the lease no longer exists")
                    return
                # Answers come in request order, and a request's send time is recorded
                # before it is sent: an answer proves the lease alive when its request left,
                # not when the answer came back.
                if sent:
                    self._last_refresh = sent.popleft()
        except EtcdUnavailable as error:
            log.debug("lease_keepalive_stream_broken", error=str(error))
