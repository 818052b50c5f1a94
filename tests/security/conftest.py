"""Security fixtures: private etcd servers with TLS (client certificates) or user/password.

Each is a one-member :class:`~tests.servers.EtcdCluster` of this test module's own, so
turning auth on never touches the shared stack's etcd.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devtools.servers import EtcdCluster, EtcdTls
from tests.fixtures import clean_store, database_url, store
from tests.security.certs import CertificateAuthority, CertificatePair

__all__ = ["clean_store", "database_url", "store"]

#: Seconds an etcd simple token lives unused on the auth server; short, so the tests see
#: tokens expire (production default: 300).
AUTH_TOKEN_TTL = 2


@dataclass(frozen=True)
class TlsEtcd:
    """A private etcd requiring client certificates signed by ``ca``."""

    endpoint: tuple[str, int]
    ca: CertificateAuthority
    client: CertificatePair
    #: a client certificate from another CA, which etcd must refuse
    stranger: CertificatePair


@dataclass(frozen=True)
class AuthEtcd:
    """A private etcd with auth on; ``user`` may read and write under ``prefix`` only."""

    endpoint: tuple[str, int]
    user: str
    password: str
    prefix: str
    root_password: str


@pytest.fixture(scope="module")
def tls_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsEtcd]:
    root = tmp_path_factory.mktemp("etcd-tls")
    ca = CertificateAuthority(root / "pki")
    server = ca.issue("server", server=True)
    client = ca.issue("client", server=False)
    stranger = CertificateAuthority(root / "other-pki", name="other-ca").issue(
        "stranger", server=False
    )
    tls = EtcdTls(ca=ca.cert, cert=server.cert, key=server.key, client_cert_auth=True)
    with EtcdCluster(members=1, data_root=root / "data", tls=tls) as cluster:
        yield TlsEtcd(
            endpoint=("127.0.0.1", cluster.client_ports[0]),
            ca=ca,
            client=client,
            stranger=stranger,
        )


def etcdctl(endpoint: tuple[str, int], *args: str, user: str | None = None) -> str:
    """Run ``etcdctl`` (API v3) against ``endpoint``; its output, or fail the test."""
    command = ["etcdctl", f"--endpoints=http://{endpoint[0]}:{endpoint[1]}", *args]
    if user is not None:
        command.insert(2, f"--user={user}")
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=30, env={"ETCDCTL_API": "3"}, check=False
    )
    if done.returncode != 0:
        raise AssertionError(f"etcdctl {' '.join(args[:3])} failed: {done.stderr.strip()}")
    return done.stdout


@pytest.fixture(scope="module")
def auth_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthEtcd]:
    root = tmp_path_factory.mktemp("etcd-auth")
    extra = [f"--auth-token-ttl={AUTH_TOKEN_TTL}"]
    with EtcdCluster(members=1, data_root=root, extra_args=extra) as cluster:
        endpoint = ("127.0.0.1", cluster.client_ports[0])
        root_password = uuid.uuid4().hex
        password = uuid.uuid4().hex
        prefix = "/migrator-app"
        etcdctl(endpoint, "user", "add", f"root:{root_password}")
        etcdctl(endpoint, "auth", "enable")
        admin = f"root:{root_password}"
        etcdctl(endpoint, "role", "add", "migrator", user=admin)
        etcdctl(
            endpoint, "role", "grant-permission", "migrator", "--prefix=true", "readwrite",
            f"{prefix}/", user=admin,
        )  # fmt: skip
        etcdctl(endpoint, "user", "add", f"app:{password}", user=admin)
        etcdctl(endpoint, "user", "grant-role", "app", "migrator", user=admin)
        yield AuthEtcd(
            endpoint=endpoint,
            user="app",
            password=password,
            prefix=prefix,
            root_password=root_password,
        )


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:10]


def pem(path: Path) -> str:
    return str(path)
