"""Errors of the leases library."""

from __future__ import annotations


class LeaseError(Exception):
    """Base class of every error raised by :mod:`leases`."""


class EtcdUnavailable(LeaseError):
    """etcd did not answer within the deadline, refused the call, or the stream broke.

    Raised within the client's timeout, never after a hang. Nothing is cached about the
    failure: the next call tries etcd again.
    """


class EtcdNoSpace(EtcdUnavailable):
    """etcd refused a write because its database reached its quota (the NOSPACE alarm).

    etcd then accepts only reads, deletes and keep-alives until an operator has compacted
    the history, defragmented every member and disarmed the alarm
    (:func:`leases.admin.recover_space` does all three). A subclass of
    :class:`EtcdUnavailable`: whoever handles an etcd outage handles this one the same way.
    """


class SessionLost(LeaseError):
    """The session's lease expired, was revoked, or could not be refreshed in time.

    Every key held on it is gone or about to be; nothing done under it may be trusted.
    """
