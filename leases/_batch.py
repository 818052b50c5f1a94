"""Group commit for the transactions of one process: what its threads send together goes as one.

Each lease hold is two etcd transactions (a create, a delete by create revision). Under load
a worker's threads wait on etcd together (in bench/pipeline.py's run, counted once by hand:
4-5 of a worker's 8 threads in an etcd call at a call's start, mean), and etcd spends most
of a small transaction's CPU on the call and the raft entry, not on the compare and the
write: the same transactions nested in one cost it about half per transaction in fours, a
third in eights (bench/etcd_batch.py).

:class:`TxnBatcher` needs no thread of its own: a caller who finds no call under way sends
its own transaction at once, alone (no hand-off when the process is idle); callers who come
while one is under way queue, and when it returns the first of them sends everything queued
as one nested transaction, its own included, and hands each caller its answer.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from leases._wire import TxnReply

#: Transactions sent in one at most (etcd refuses more than --max-txn-ops, 128 by default,
#: operations in a transaction; each nested one counts).
MAX_BATCH = 32


class _Pending:
    """One caller's transaction, waiting for its answer or its turn to send."""

    __slots__ = ("answered", "done", "error", "key", "leads", "reply", "request")

    def __init__(self, key: bytes, request: bytes) -> None:
        self.key = key
        self.request = request
        self.answered = False
        self.reply: TxnReply | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        #: Set with ``done`` when this caller is to send the next batch.
        self.leads = False

    def answer(self, reply: TxnReply | None, error: BaseException | None) -> None:
        self.reply, self.error, self.answered = reply, error, True
        self.done.set()


class TxnBatcher:
    """Sends the transactions of many threads together, one key at most once per batch.

    :param send_one: sends one encoded ``TxnRequest``; its answer (raises on failure).
    :param send_many: sends several as one nested transaction; their answers in their
        order (raises on failure).
    :param alone_after: whether a failed batch of several is tried again one by one (an
        error etcd gave the whole that may not concern each: out of space refuses the batch
        for its puts, where a delete alone would pass). A batch that failed for the
        connection is not: each caller has its error, as it would alone.
    """

    def __init__(
        self,
        *,
        send_one: Callable[[bytes], TxnReply],
        send_many: Callable[[list[bytes]], list[TxnReply]],
        alone_after: Callable[[BaseException], bool],
    ) -> None:
        self._send_one = send_one
        self._send_many = send_many
        self._alone_after = alone_after
        self._lock = threading.Lock()
        self._queue: deque[_Pending] = deque()
        self._sending = False
        #: Batches sent and transactions in them (for the benchmarks).
        self.batches = 0
        self.transactions = 0

    def send(self, key: bytes, request: bytes) -> TxnReply:
        """Send ``request`` (a transaction on ``key``) with whatever else is queued; its answer.

        Waits for the call under way, if any, then for its own (each has the client's
        deadline); behind more than MAX_BATCH queued, or behind another transaction on its
        key, also for the calls that send those first.
        Two transactions on one key never share a batch (etcd refuses a transaction that
        writes a key twice, and would evaluate both compares before either write).

        :raises: what the call raised (``send_one``'s or ``send_many``'s error).
        """
        mine = _Pending(key, request)
        with self._lock:
            self._queue.append(mine)
            leads = not self._sending
            self._sending = True
        if not leads:
            mine.done.wait()
            if not mine.leads:
                return self._result(mine)
        try:
            while not mine.answered:
                self._send_batch(self._take())
        finally:
            self._hand_over()
        return self._result(mine)

    @staticmethod
    def _result(pending: _Pending) -> TxnReply:
        if pending.error is not None:
            raise pending.error
        assert pending.reply is not None
        return pending.reply

    def _take(self) -> list[_Pending]:
        """The next batch: queued transactions in their order, one per key, at most MAX_BATCH."""
        batch: list[_Pending] = []
        keys: set[bytes] = set()
        with self._lock:
            kept: deque[_Pending] = deque()
            while self._queue and len(batch) < MAX_BATCH:
                pending = self._queue.popleft()
                if pending.key in keys:
                    kept.append(pending)
                else:
                    keys.add(pending.key)
                    batch.append(pending)
            kept.extend(self._queue)
            self._queue = kept
        return batch

    def _hand_over(self) -> None:
        """Wake the first caller still queued to send the next batch, or stop sending."""
        with self._lock:
            if not self._queue:
                self._sending = False
                return
            following = self._queue[0]
        following.leads = True
        following.done.set()

    def _send_batch(self, batch: list[_Pending]) -> None:
        self.batches += 1
        self.transactions += len(batch)
        if len(batch) == 1:
            self._send_alone(batch[0])
            return
        try:
            replies = self._send_many([p.request for p in batch])
        except Exception as error:  # handed to each caller, raised there
            if self._alone_after(error):
                for pending in batch:
                    self._send_alone(pending)
            else:
                for pending in batch:
                    pending.answer(None, error)
            return
        if len(replies) != len(batch):  # not etcd's answer to this request: ask one by one
            for pending in batch:
                self._send_alone(pending)
            return
        for pending, reply in zip(batch, replies, strict=True):
            pending.answer(reply, None)

    def _send_alone(self, pending: _Pending) -> None:
        try:
            reply = self._send_one(pending.request)
        except Exception as error:  # handed to its caller, raised there
            pending.answer(None, error)
            return
        pending.answer(reply, None)
