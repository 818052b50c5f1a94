"""A circuit breaker shared by every process through etcd.

When a dependency fails for everyone (a registry down), each process finding it out on its
own wastes work and hammers the dependency as it comes back. The breaker keeps that
knowledge in etcd, under one name:

- ``<name>/open``: present while the breaker is open; attached to a lease whose TTL is the
  open window, so it closes itself (to half-open) when the window passes, whoever opened it
  and whether or not that process still lives;
- ``<name>/last``: the last window opened (no lease): present from the first opening until
  a probe succeeds. Without ``open`` it means *half-open*: the next caller probes the
  dependency before using it; success closes the breaker, failure reopens it with the window
  doubled (capped);
- ``<name>/failures/<id>``: one key per consecutive soft failure (a 5xx, a timeout) across
  every process; ``threshold`` of them open the breaker; a success clears them.

While closed, :meth:`SharedBreaker.state` is the only cost: one range read.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass

from leases.etcd import EtcdClient


@dataclass(frozen=True, kw_only=True)
class BreakerState:
    """What a range read of the breaker's keys found.

    :param open: the breaker is open: do not call the dependency.
    :param half_open: the window has passed since the last opening: probe before using it.
    :param window: seconds of the current (or last) window; 0 when closed.
    :param reason: why it was last opened.
    :param opened_at: when it was last opened (Unix time), 0 when closed.
    :param failures: consecutive soft failures counted so far.
    """

    open: bool = False
    half_open: bool = False
    window: float = 0.0
    reason: str = ""
    opened_at: float = 0.0
    failures: int = 0

    @property
    def closed(self) -> bool:
        """Neither open nor half-open."""
        return not self.open and not self.half_open

    @property
    def remaining(self) -> float:
        """Seconds until an open breaker turns half-open (by the local clock; a hint)."""
        return max(0.0, self.opened_at + self.window - time.time()) if self.open else 0.0


class SharedBreaker:
    """A breaker whose state lives in etcd under ``name``; share it between threads.

    :param client: the etcd client.
    :param name: the key prefix, e.g. ``/registry-migrator/breakers/registry``.
    :param threshold: consecutive soft failures (across processes) that open it.
    :param base_window: seconds of the first open window.
    :param max_window: the most a window may grow to by doubling.
    """

    def __init__(
        self,
        client: EtcdClient,
        name: str,
        *,
        threshold: int = 3,
        base_window: float = 5.0,
        max_window: float = 60.0,
    ) -> None:
        if threshold < 1 or base_window <= 0 or max_window <= 0:
            raise ValueError("threshold must be >= 1 and the windows positive")
        self.client = client
        self.name = name.rstrip("/")
        self.threshold = threshold
        self.base_window = base_window
        self.max_window = max_window

    def _key(self, part: str) -> str:
        return f"{self.name}/{part}"

    def state(self) -> BreakerState:
        """Read the breaker (one range read).

        :raises EtcdUnavailable: etcd cannot be read.
        """
        opened: dict[str, object] | None = None
        last: dict[str, object] | None = None
        failures = 0
        for kv in self.client.get_prefix(self.name + "/"):
            if kv.key == self._key("open"):
                opened = _load(kv.value)
            elif kv.key == self._key("last"):
                last = _load(kv.value)
            elif kv.key.startswith(self._key("failures/")):
                failures += 1
        info = opened or last
        if info is None:
            return BreakerState(failures=failures)
        return BreakerState(
            open=opened is not None,
            half_open=opened is None,
            window=float(info.get("window", 0.0)),  # type: ignore[arg-type]
            reason=str(info.get("reason", "")),
            opened_at=float(info.get("opened_at", 0.0)),  # type: ignore[arg-type]
            failures=failures,
        )

    def trip(self, reason: str) -> float | None:
        """Open the breaker now, unless it is open already.

        The first opening since the breaker last closed lasts ``base_window``; an opening
        while half-open (a failed probe) doubles the last window, up to ``max_window``.

        :param reason: why, kept in the key and shown to operators.
        :returns: the window opened, or None when it was open already (its window stands).
        :raises EtcdUnavailable: etcd cannot be read or written.
        """
        state = self.state()
        if state.open:
            return None
        window = min(self.base_window, self.max_window)
        if state.half_open and state.window > 0:
            window = min(state.window * 2, self.max_window)
        value = json.dumps(
            {"reason": reason[:300], "window": window, "opened_at": time.time()}
        ).encode()
        lease_id, _ = self.client.grant(max(1, math.ceil(window)))
        # Created only when absent: when another process has just opened it, its window stands.
        if not self.client.create(self._key("open"), value, lease_id=lease_id).created:
            self.client.revoke(lease_id)
            return None
        self.client.put(self._key("last"), value)
        self.client.delete_prefix(self._key("failures/"))
        return window

    def record_failure(self, reason: str) -> float | None:
        """Count one soft failure; opens the breaker at ``threshold`` in a row.

        :returns: the window when this failure opened the breaker, else None.
        :raises EtcdUnavailable: etcd cannot be written.
        """
        self.client.put(self._key(f"failures/{uuid.uuid4().hex}"), reason[:200].encode())
        if self.client.count_prefix(self._key("failures/")) < self.threshold:
            return None
        return self.trip(f"{self.threshold} failures in a row; last: {reason}")

    def record_success(self) -> None:
        """A call succeeded: the soft failures counted so far are no longer in a row.

        :raises EtcdUnavailable: etcd cannot be written.
        """
        self.client.delete_prefix(self._key("failures/"))

    def close(self) -> None:
        """Close the breaker (a probe or a call succeeded): forget windows and failures.

        :raises EtcdUnavailable: etcd cannot be written.
        """
        self.client.delete_prefix(self.name + "/")


def _load(raw: bytes) -> dict[str, object]:
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
