"""leases._batch.TxnBatcher's logic with stand-in senders (no server): who sends, what goes
together, who gets which answer or error. Against etcd: tests/leases/test_batch.py."""

from __future__ import annotations

import threading
import time

from leases._batch import MAX_BATCH, TxnBatcher
from leases._wire import TxnReply


class Refused(Exception):
    """An error etcd gave the whole batch."""


class Recorder:
    """Senders that record their calls; ``gate`` holds the first call until released."""

    def __init__(self) -> None:
        self.calls: list[list[bytes]] = []
        self.gate = threading.Event()
        self.first_in = threading.Event()
        self.refuse_batches = False
        self.fail_with: Exception | None = None

    def _wait(self) -> None:
        if not self.first_in.is_set():
            self.first_in.set()
            assert self.gate.wait(10)

    def send_one(self, request: bytes) -> TxnReply:
        self.calls.append([request])
        self._wait()
        if self.fail_with is not None:
            raise self.fail_with
        return TxnReply(True, len(self.calls), [])

    def send_many(self, requests: list[bytes]) -> list[TxnReply]:
        self.calls.append(list(requests))
        self._wait()
        if self.fail_with is not None:
            raise self.fail_with
        if self.refuse_batches:
            raise Refused("refused as a whole")
        return [TxnReply(r.startswith(b"ok"), len(self.calls), []) for r in requests]


def batcher(recorder: Recorder) -> TxnBatcher:
    return TxnBatcher(
        send_one=recorder.send_one,
        send_many=recorder.send_many,
        alone_after=lambda error: isinstance(error, Refused),
    )


def queue_behind_a_call(
    recorder: Recorder, batch: TxnBatcher, items: list[tuple[bytes, bytes]]
) -> dict[bytes, TxnReply | BaseException]:
    """Send ``first`` (held in its call), queue ``items`` behind it, release, collect."""
    answers: dict[bytes, TxnReply | BaseException] = {}

    def send(key: bytes, request: bytes) -> None:
        try:
            answers[request] = batch.send(key, request)
        except Exception as error:
            answers[request] = error

    first = threading.Thread(target=send, args=(b"k0", b"ok-first"))
    first.start()
    assert recorder.first_in.wait(10)
    others = [threading.Thread(target=send, args=item) for item in items]
    for thread in others:
        thread.start()
    deadline = time.monotonic() + 10
    while len(batch._queue) < len(items) and time.monotonic() < deadline:
        time.sleep(0.005)
    recorder.gate.set()
    for thread in [first, *others]:
        thread.join(10)
    return answers


def test_an_idle_caller_sends_alone_at_once() -> None:
    recorder = Recorder()
    recorder.gate.set()
    batch = batcher(recorder)
    assert batch.send(b"k", b"ok-1") == TxnReply(True, 1, [])
    assert recorder.calls == [[b"ok-1"]]


def test_callers_queued_behind_a_call_go_together_each_with_its_answer() -> None:
    recorder = Recorder()
    batch = batcher(recorder)
    items = [(f"k{i}".encode(), f"{'ok' if i % 2 else 'no'}-{i}".encode()) for i in range(1, 6)]
    answers = queue_behind_a_call(recorder, batch, items)
    assert recorder.calls[0] == [b"ok-first"]
    assert sorted(recorder.calls[1]) == sorted(r for _, r in items)  # one batch of five
    assert len(recorder.calls) == 2
    for _, request in items:
        reply = answers[request]
        assert isinstance(reply, TxnReply)
        assert reply.succeeded is request.startswith(b"ok")  # its own answer, not another's


def test_one_key_is_never_twice_in_a_batch() -> None:
    recorder = Recorder()
    batch = batcher(recorder)
    items = [(b"same", b"ok-a"), (b"same", b"ok-b"), (b"other", b"ok-c")]
    answers = queue_behind_a_call(recorder, batch, items)
    assert all(isinstance(answers[r], TxnReply) for _, r in items)
    for call in recorder.calls:
        assert not {b"ok-a", b"ok-b"} <= set(call)
    assert sum(len(c) for c in recorder.calls) == 4


def test_a_batch_etcd_refused_is_sent_again_one_by_one() -> None:
    recorder = Recorder()
    recorder.refuse_batches = True
    batch = batcher(recorder)
    items = [(b"k1", b"ok-1"), (b"k2", b"ok-2")]
    answers = queue_behind_a_call(recorder, batch, items)
    replies = [answers[r] for _, r in items]
    assert all(isinstance(reply, TxnReply) and reply.succeeded for reply in replies)
    assert [b"ok-1"] in recorder.calls and [b"ok-2"] in recorder.calls


def test_a_call_that_failed_gives_each_caller_the_error() -> None:
    recorder = Recorder()
    recorder.fail_with = ConnectionError("etcd gone")
    batch = batcher(recorder)
    items = [(b"k1", b"ok-1"), (b"k2", b"ok-2")]
    answers = queue_behind_a_call(recorder, batch, items)
    assert all(isinstance(answers[r], ConnectionError) for _, r in [(b"k0", b"ok-first"), *items])
    assert len(recorder.calls) == 2  # the batch was not sent again one by one
    # And the batcher is free again: the next caller sends at once.
    recorder.fail_with = None
    assert batch.send(b"k", b"ok-after").succeeded


def test_a_batch_holds_at_most_max_batch() -> None:
    recorder = Recorder()
    batch = batcher(recorder)
    items = [(f"k{i}".encode(), f"ok-{i}".encode()) for i in range(MAX_BATCH + 5)]
    answers = queue_behind_a_call(recorder, batch, items)
    assert all(isinstance(answers[r], TxnReply) for _, r in items)
    assert max(len(c) for c in recorder.calls) == MAX_BATCH


def test_many_threads_each_get_their_own_answer() -> None:
    threads = 16
    lock = threading.Lock()
    calls: list[int] = []

    def send_one(request: bytes) -> TxnReply:
        with lock:
            calls.append(1)
        time.sleep(0.001)
        return TxnReply(True, int(request), [])

    def send_many(requests: list[bytes]) -> list[TxnReply]:
        with lock:
            calls.append(len(requests))
        time.sleep(0.001)
        return [TxnReply(True, int(r), []) for r in requests]

    batch = TxnBatcher(send_one=send_one, send_many=send_many, alone_after=lambda e: False)
    wrong: list[tuple[int, int]] = []

    def work(index: int) -> None:
        for n in range(200):
            value = index * 1000 + n
            reply = batch.send(str(value).encode(), str(value).encode())
            if reply.revision != value:
                wrong.append((value, reply.revision))

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert wrong == []
    assert sum(calls) == threads * 200
    assert batch.transactions == threads * 200
    assert batch.batches < batch.transactions / 2  # they went together
