"""Leader election on a session, after etcd's Go ``concurrency.Election``.

Each candidate puts ``<name>/<lease id>`` on its session's lease; the leader is the
candidate whose key has the lowest create revision. When the leader dies its key expires
with its lease (TTL) and the next candidate in line leads.
"""

from __future__ import annotations

import threading

from leases import _log
from leases.errors import LeaseError
from leases.hold import Hold, HolderInfo, try_acquire
from leases.session import Session

log = _log.get_logger(__name__)


class Election:
    """One candidacy in the election ``name``.

    :param session: the session that carries the candidacy; leadership ends with it.
    :param name: the election's key prefix, e.g. ``/registry-migrator/elections/scheduler``.
    :param holder: shown to operators as the candidate's value.
    :param wake_interval: the longest :meth:`campaign` waits on one watch before it looks
        at ``stop`` and the session again (it re-opens the watch from the same revision, so
        no delete is missed in between; etcd is not read again).
    """

    def __init__(
        self,
        session: Session,
        name: str,
        *,
        holder: HolderInfo | None = None,
        wake_interval: float = 1.0,
    ) -> None:
        self.session = session
        self.prefix = name.rstrip("/") + "/"
        self.key = f"{self.prefix}{session.lease_id:x}"
        self.holder = holder or HolderInfo(actor="election")
        self.wake_interval = wake_interval
        self._hold: Hold | None = None

    def _candidacy(self) -> Hold | None:
        if self._hold is None or self._hold.released:
            acquisition = try_acquire(self.session, self.key, holder=self.holder)
            if acquisition.hold is None and acquisition.holder_token is not None:
                # The key names this session's lease, so only this session made it, yet no
                # hold of ours has it: a resign whose delete failed, or a create whose
                # answer was lost. Left there it would stand first in line, leading nobody,
                # for as long as the session lives. The session deletes it in the
                # background; the next check stands again, at the end of the line.
                self.session.release_later(self.key, acquisition.holder_token)
            self._hold = acquisition.hold
        return self._hold

    def is_leader(self) -> bool:
        """Enter the election if not yet in it; True when this candidate leads now.

        False (never an exception) when the session is lost or etcd is unreachable: a
        candidate that cannot tell must not act as leader.
        """
        if self.session.lost:
            return False
        try:
            hold = self._candidacy()
            if hold is None:
                return False
            first = self.session.client.get_prefix(self.prefix, limit=1)
        except LeaseError as error:
            log.warning("election_check_failed", election=self.prefix, error=str(error))
            return False
        return bool(first) and first[0].create_revision == hold.token and not self.session.lost

    def campaign(self, stop: threading.Event | None = None) -> bool:
        """Block until this candidate leads (True) or ``stop`` is set / the session lost (False).

        Waits as etcd's Go ``Election.Campaign`` does (``waitDeletes``): for the delete of
        the candidate just ahead in line (the newest key created before ours), watched from
        the revision it was read at; then looks for the next one ahead. One range read per
        candidate that leaves, none while nothing changes; the candidate leads within a
        round trip or two of the leader's key going (released, or expired with its lease).
        """
        stop = stop or threading.Event()
        client = self.session.client
        while not stop.is_set() and not self.session.lost:
            try:
                hold = self._candidacy()
                if hold is None:  # our key vanished between the compare and the read
                    continue
                ahead, revision = client.last_created_before(
                    self.prefix, max_create_revision=hold.token - 1
                )
                if ahead is None:
                    if self.session.lost:
                        break
                    log.info("election_won", election=self.prefix, key=self.key)
                    return True
                while not stop.is_set() and not self.session.lost:
                    if client.wait_deleted(
                        ahead.key, after_revision=revision, timeout=self.wake_interval
                    ):
                        break
            except LeaseError as error:
                log.warning("election_check_failed", election=self.prefix, error=str(error))
                stop.wait(self.wake_interval)
        return False

    def leader(self) -> HolderInfo | None:
        """Who leads now, or None when nobody does."""
        first = self.session.client.get_prefix(self.prefix, limit=1)
        return HolderInfo.from_json(first[0].value) if first else None

    def resign(self) -> None:
        """Leave the election; the next candidate leads at once."""
        if self._hold is not None:
            try:
                self._hold.release()
            except LeaseError as error:
                log.warning("election_resign_failed", election=self.prefix, error=str(error))
            self._hold = None
