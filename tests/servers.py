"""The private servers live in :mod:`devtools.servers` (``bench/`` starts them too and
imports nothing from ``tests/``); this name stays for the tests that import it from here."""

from devtools.servers import EtcdCluster, EtcdClusterError, EtcdTls, free_ports

__all__ = ["EtcdCluster", "EtcdClusterError", "EtcdTls", "free_ports"]
