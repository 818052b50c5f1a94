"""A separate process that uses the leases library, driven by the lease tests.

Prints one JSON object per line on stdout so the test can follow it. Modes:

- ``hold KEY``: take KEY on a session and keep it; every 0.1 s try a fenced write of
  ``KEY/resource`` and report whether it was accepted and whether the session is lost.
- ``race KEY ROUNDS``: compete for KEY in rounds, synchronised through stdin lines.
- ``elect NAME``: campaign in election NAME and report when leading.
"""

from __future__ import annotations

import json
import os
import sys
import time

from leases import Election, EtcdClient, HolderInfo, LeaseError, Session, try_acquire


def say(**fields: object) -> None:
    print(json.dumps({"pid": os.getpid(), "t": time.time(), **fields}), flush=True)


def main() -> None:
    endpoints = [
        (host, int(port))
        for host, port in (
            item.rsplit(":", 1) for item in os.environ["LEASE_TEST_ENDPOINTS"].split(",")
        )
    ]
    ttl = float(os.environ.get("LEASE_TEST_TTL", "2"))
    mode, name = sys.argv[1], sys.argv[2]
    client = EtcdClient(endpoints, timeout=2)
    session = Session(client, ttl=ttl)
    say(event="session", lease_id=session.lease_id)

    if mode == "hold":
        acquisition = try_acquire(session, name, holder=HolderInfo(actor="test-holder"))
        if acquisition.hold is None:
            say(event="busy")
            return
        hold = acquisition.hold
        say(event="acquired", token=hold.token)
        while True:
            try:
                accepted = hold.fenced_put(f"{name}/resource", f"written by {os.getpid()}".encode())
            except LeaseError as error:
                accepted = None
                say(event="error", error=str(error))
            say(event="write", accepted=accepted, lost=session.lost)
            time.sleep(0.1)

    elif mode == "race":
        rounds = int(sys.argv[3])
        for round_number in range(rounds):
            line = sys.stdin.readline()  # the test releases both racers at once
            if not line:
                return
            acquisition = try_acquire(session, name)
            token = acquisition.hold.token if acquisition.hold else None
            say(event="round", round=round_number, won=acquisition.hold is not None, token=token)
            sys.stdin.readline()  # both have tried: the winner lets go
            if acquisition.hold is not None:
                acquisition.hold.release()
            say(event="released", round=round_number)
        session.close()

    elif mode == "elect":
        election = Election(session, name, holder=HolderInfo(actor="test-candidate"))
        election.campaign()
        say(event="leader")
        while not session.lost:
            time.sleep(0.1)
            say(event="still_leader", leader=election.is_leader())


if __name__ == "__main__":
    main()
