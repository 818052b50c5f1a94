"""The listening socket a launcher hands down (``--fd``): it chose and bound the port
itself and holds it until the child serves on it, so that nothing else on the machine can
take the port in between (a port merely probed free and released can be)."""

from __future__ import annotations

import errno
import socket


def inherited_listener(fd: int) -> socket.socket:
    """The TCP socket inherited as file descriptor ``fd``, listening.

    :param fd: the descriptor (bound by the parent; listening already or not).
    :raises OSError: ``fd`` is not an open TCP socket (EBADF, ENOTSOCK, EINVAL).
    """
    sock = socket.socket(fileno=fd)  # family, type and protocol read from the descriptor
    if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
        sock.detach()
        raise OSError(errno.EINVAL, "not a TCP socket")
    sock.listen(2048)  # a no-op backlog change when the parent listens already
    return sock
