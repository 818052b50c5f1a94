"""Free TCP ports for test servers, chosen where the kernel never assigns one by itself.

A port the kernel picks (a bind to port 0) lies in its ephemeral range
(``net.ipv4.ip_local_port_range``), the range it also draws the local port of every
outgoing connection from. A server stopped and started again on such a port (a chaos
test's RabbitMQ restart) can find it taken by some client's connection meanwhile: the
fresh-clone CI once saw RabbitMQ fail its restart with ``eaddrinuse``. Below that range
only an explicit bind takes a port, so one found free there stays free for its server.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

#: The lowest port handed out: above the well-known and most registered services' ports.
LOWEST = 10000
_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _ephemeral_low() -> int:
    try:
        return int(_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports free on ``host`` now, below the ephemeral range.

    Nothing holds them afterwards, but nothing but an explicit bind can take them.

    :param count: how many ports.
    :param host: the address they are free on.
    :raises OSError: no ``count`` free ports were found below the ephemeral range.
    """
    candidates = list(range(LOWEST, _ephemeral_low()))
    random.SystemRandom().shuffle(candidates)  # two test sessions rarely pick alike
    ports = [port for port in candidates[: count * 50] if _bindable(host, port)][:count]
    if len(ports) < count:
        raise OSError(f"fewer than {count} free ports between {LOWEST} and the ephemeral range")
    return ports


def free_port(host: str = "127.0.0.1") -> int:
    """One port as :func:`free_ports` gives them."""
    return free_ports(1, host)[0]
