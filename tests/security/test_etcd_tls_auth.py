"""The lease library against etcd with TLS client certificates, and with user/password.

Each server is the module's own (``tests/security/conftest.py``); the operations are the
ones the migration relies on: a session, try_acquire, busy, release, a fenced write, an
election and the enqueue dedup gate.
"""

from __future__ import annotations

import time

import pytest

from leases import (
    DedupGate,
    Election,
    EtcdClient,
    EtcdUnavailable,
    HolderInfo,
    Session,
    try_acquire,
)
from migration.config import Config
from tests.security.conftest import AUTH_TOKEN_TTL, AuthEtcd, TlsEtcd

TTL = 2


def exercise_leases(client: EtcdClient, prefix: str) -> None:
    """The core lease operations on ``client`` under ``prefix``; asserts each outcome."""
    key = f"{prefix}/leases/container_repository/1"
    with Session(client, ttl=TTL) as first, Session(client, ttl=TTL) as second:
        mine = try_acquire(first, key, holder=HolderInfo(actor="test", message_id="m-1"))
        assert mine.hold is not None
        busy = try_acquire(second, key)
        assert busy.hold is None
        assert busy.holder is not None and busy.holder.message_id == "m-1"
        assert busy.holder_token == mine.hold.token
        assert mine.hold.fenced_put(f"{prefix}/resource", b"written under the lease")
        assert client.get(f"{prefix}/resource").value == b"written under the lease"  # type: ignore[union-attr]
        assert mine.hold.release()
        assert not mine.hold.fenced_put(f"{prefix}/resource", b"stale")
        theirs = try_acquire(second, key)
        assert theirs.hold is not None and theirs.hold.token > mine.hold.token

        election = f"{prefix}/elections/scheduler"
        leader = Election(first, election, holder=HolderInfo(actor="leader"))
        follower = Election(second, election, holder=HolderInfo(actor="follower"))
        assert leader.is_leader()
        assert not follower.is_leader()
        leader.resign()
        assert follower.is_leader()

        gate = DedupGate(client, f"{prefix}/gates/enqueue", slots=2, ttl=10)
        tickets = [gate.enter(), gate.enter(), gate.enter()]
        assert tickets[0] is not None and tickets[1] is not None and tickets[2] is None
        assert gate.pending() == 2
        assert gate.leave(tickets[0])
        assert gate.pending() == 1


def assert_refused_quickly(make_and_use: object, *, within: float) -> EtcdUnavailable:
    started = time.monotonic()
    with pytest.raises(EtcdUnavailable) as caught:
        make_and_use()  # type: ignore[operator]
    assert time.monotonic() - started < within, "a refused client must fail within its timeout"
    return caught.value


# -- TLS with client certificates ----------------------------------------------------------


def test_lease_operations_over_tls_with_a_client_certificate(
    tls_etcd: TlsEtcd, unique: str
) -> None:
    with EtcdClient(
        [tls_etcd.endpoint],
        timeout=3,
        ca_cert=str(tls_etcd.ca.cert),
        cert_cert=str(tls_etcd.client.cert),
        cert_key=str(tls_etcd.client.key),
    ) as client:
        exercise_leases(client, f"/tls-{unique}")


@pytest.mark.parametrize("credentials", ["no client certificate", "another CA's", "plaintext"])
def test_a_client_without_a_trusted_certificate_is_refused(
    tls_etcd: TlsEtcd, credentials: str
) -> None:
    options: dict[str, str] = {}
    if credentials != "plaintext":
        options["ca_cert"] = str(tls_etcd.ca.cert)
    if credentials == "another CA's":
        options["cert_cert"] = str(tls_etcd.stranger.cert)
        options["cert_key"] = str(tls_etcd.stranger.key)

    def use() -> None:
        with EtcdClient([tls_etcd.endpoint], timeout=2, **options) as client:
            client.get("/anything")

    error = assert_refused_quickly(use, within=2 + 3)
    assert "UNAVAILABLE" in str(error)


def test_config_from_env_wires_the_tls_files_into_the_etcd_client(
    tls_etcd: TlsEtcd, unique: str
) -> None:
    env = {
        "MIGRATOR_ETCD_ENDPOINTS": f"{tls_etcd.endpoint[0]}:{tls_etcd.endpoint[1]}",
        "MIGRATOR_ETCD_CA_CERT": str(tls_etcd.ca.cert),
        "MIGRATOR_ETCD_CERT": str(tls_etcd.client.cert),
        "MIGRATOR_ETCD_KEY": str(tls_etcd.client.key),
    }
    config = Config.from_env(env)
    with config.etcd_client(timeout=3) as client:
        exercise_leases(client, f"/tls-config-{unique}")
    without_cert = Config.from_env(
        {k: v for k, v in env.items() if k.endswith("CA_CERT")}
        | {"MIGRATOR_ETCD_ENDPOINTS": env["MIGRATOR_ETCD_ENDPOINTS"]}
    )

    def use() -> None:
        with without_cert.etcd_client(timeout=2) as client:
            client.get("/anything")

    assert_refused_quickly(use, within=5)


# -- user and password ---------------------------------------------------------------------


def test_lease_operations_with_user_and_password(auth_etcd: AuthEtcd, unique: str) -> None:
    with EtcdClient(
        [auth_etcd.endpoint], timeout=3, user=auth_etcd.user, password=auth_etcd.password
    ) as client:
        exercise_leases(client, f"{auth_etcd.prefix}/{unique}")


def test_the_role_confines_the_user_to_its_prefix(auth_etcd: AuthEtcd) -> None:
    with (
        EtcdClient(
            [auth_etcd.endpoint], timeout=3, user=auth_etcd.user, password=auth_etcd.password
        ) as client,
        pytest.raises(EtcdUnavailable, match="PERMISSION_DENIED"),
    ):
        client.create("/outside/the/prefix", b"x")


def test_a_wrong_password_is_refused_quickly(auth_etcd: AuthEtcd) -> None:
    def use() -> None:
        EtcdClient([auth_etcd.endpoint], timeout=3, user=auth_etcd.user, password="wrong")

    error = assert_refused_quickly(use, within=3)
    assert "authentication failed" in str(error)
    assert "wrong" not in str(error)


def test_no_credentials_are_refused(auth_etcd: AuthEtcd) -> None:
    def use() -> None:
        with EtcdClient([auth_etcd.endpoint], timeout=3) as client:
            client.get(f"{auth_etcd.prefix}/x")

    assert_refused_quickly(use, within=3)


def test_an_expired_token_is_renewed(auth_etcd: AuthEtcd, unique: str) -> None:
    """After the token's TTL without use, calls go on (the client authenticates again)."""
    prefix = f"{auth_etcd.prefix}/{unique}"
    with EtcdClient(
        [auth_etcd.endpoint], timeout=3, user=auth_etcd.user, password=auth_etcd.password
    ) as client:
        assert client.create(f"{prefix}/before", b"1").created
        time.sleep(AUTH_TOKEN_TTL + 2)  # etcd drops an unused simple token after its TTL
        assert client.get(f"{prefix}/before") is not None
        with Session(client, ttl=TTL) as session:
            assert try_acquire(session, f"{prefix}/k").hold is not None


def test_config_from_env_wires_user_and_password(auth_etcd: AuthEtcd, unique: str) -> None:
    env = {
        "MIGRATOR_ETCD_ENDPOINTS": f"{auth_etcd.endpoint[0]}:{auth_etcd.endpoint[1]}",
        "MIGRATOR_ETCD_USER": auth_etcd.user,
        "MIGRATOR_ETCD_PASSWORD": auth_etcd.password,
    }
    config = Config.from_env(env)
    assert auth_etcd.password not in repr(config)
    with config.etcd_client(timeout=3) as client:
        exercise_leases(client, f"{auth_etcd.prefix}/config-{unique}")
    wrong = Config.from_env({**env, "MIGRATOR_ETCD_PASSWORD": "not-it"})
    with pytest.raises(EtcdUnavailable, match="authentication failed"):
        wrong.etcd_client(timeout=3)
