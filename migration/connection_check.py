"""The connection pool's check, without a round trip for a connection that is fine.

``ConnectionPool.check_connection`` sends an empty query every time a connection leaves
the pool: one PostgreSQL round trip per ``Store`` call, about a third of a migrated
repository's round trips (bench/pipeline.py). What that check finds is a connection the
server has ended while it sat idle in the pool — a restart, ``pg_terminate_backend``, an
idle timeout — and every such end leaves something on the socket: the server's FATAL
message, or the end of the stream when the process or the host's TCP stack closed it. An
idle connection in autocommit with no ``LISTEN`` receives nothing otherwise. So a socket
with nothing to read is handed out as is, and only one with something to read gets the full
check (which raises for a dead one, so that the pool discards it and takes another).

What neither check can see before a query is a peer that vanished without a word (a
partition): the full check would wait on it as long as the query does.
"""

from __future__ import annotations

import select
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool


def check_quietly(conn: psycopg.Connection[Any]) -> None:
    """Raise when ``conn`` is not usable; a round trip only when its socket has news.

    :param conn: a connection the pool is about to hand out.
    :raises psycopg.OperationalError: the connection is closed or broken.
    """
    if conn.closed or conn.broken:
        raise psycopg.OperationalError("the connection is closed")
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
    if poller.poll(0):
        ConnectionPool.check_connection(conn)
