"""``TryLater``: a message that cannot be done now, retried later without a traceback."""

from __future__ import annotations

import random

import dramatiq

#: Retries of a message the registry keeps from finishing (a status it cannot confirm, a
#: recovery it cannot answer for): at 2-30 s apiece (the breaker's window), 40 minutes to
#: hours of registry outage before a dead letter (invariant 7: the registry's failures are
#: not the message's). The guard is the net after that.
REGISTRY_RETRIES = 1_000


class TryLater(dramatiq.Retry):
    """The message cannot be done now (the registry's breaker is open, its status
    unreadable, the next start failed; an interrupted delivery not reconciled; our lease at
    risk): retry it later, without a traceback in the log (it is no error of ours).

    :param why: one line, logged.
    :param after: seconds to wait (jittered up to half again).
    """

    def __init__(self, why: str, *, after: float) -> None:
        super().__init__(why, delay=int(after * (1 + random.random() / 2) * 1000))
