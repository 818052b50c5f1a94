"""Errors of the leases library."""

from __future__ import annotations


class LeaseError(Exception):
    """Base class of every error raised by :mod:`leases`."""


class EtcdUnavailable(LeaseError):
    """etcd did not answer within the deadline, refused the call, or the stream broke.

    Raised within the client's timeout, never after a hang. Nothing is cached about the
    failure: the next call tries etcd again.
    """


class SessionLost(LeaseError):
    """The session's lease expired, was revoked, or could not be refreshed in time.

    Every key held on it is gone or about to be; nothing done under it may be trusted.
    """
