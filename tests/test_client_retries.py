"""The client's retry rules, against a scripted worker: `busy` answers are resent with growing backoff, at
most `busy_retries` times and never past the request's deadline; a resend carries only the time left.

The client is the component under test, so the worker here is a plain ROUTER socket that answers from a
script (with the real protocol codec); the real worker's `busy` is tested in test_worker_lifecycle.py
and test_reliability.py.
"""
import threading
import time

import pytest
import zmq

from safety_worker import SafetyClient, WorkerError
from safety_worker import protocol as P


class ScriptedWorker:
    """Answers attempt ``n`` of each request (0 for the first send) with ``script(n)``: ``"busy"`` or ``"ok"``.
    ``attempts`` keeps ``(monotonic time, request)`` of everything but the client's heartbeat pings."""

    def __init__(self, endpoint: str, script):
        self.script, self.attempts = script, []
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.bind(endpoint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        tries: dict[int, int] = {}
        while not self._stop.is_set():
            if not self._sock.poll(20):
                continue
            peer, *frames = self._sock.recv_multipart()
            request = P.decode_request(frames, P.Limits())
            if request.op == "ping":
                reply = P.Reply(request.id, P.STATUS_OK, {"pong": True})
            else:
                self.attempts.append((time.monotonic(), request))
                n = tries[request.id] = tries.get(request.id, -1) + 1
                reply = (P.error_reply(request.id, P.BUSY, "scripted: queue full") if self.script(n) == "busy"
                         else P.Reply(request.id, P.STATUS_OK, {"attempt": n}))
            self._sock.send_multipart([peer, *P.encode_reply(reply)])

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close(linger=0)
        self._ctx.term()


@pytest.fixture
def scripted(tmp_path):
    workers = []

    def start(script):
        workers.append(ScriptedWorker(f"ipc://{tmp_path}/worker.sock", script))
        return workers[-1], f"ipc://{tmp_path}/worker.sock"

    yield start
    for worker in workers:
        worker.close()


def test_busy_is_resent_with_backoff_that_grows_until_the_worker_takes_it(scripted):
    worker, endpoint = scripted(lambda n: "busy" if n < 3 else "ok")
    with SafetyClient(endpoint, timeout=30, busy_retries=6) as client:
        reply = client.request("check_text", {"texts": ["x"]}).result(timeout=30)
        assert reply.result == {"attempt": 3} and client.resends == 3
    sent = [t for t, _ in worker.attempts]
    gaps = [b - a for a, b in zip(sent, sent[1:])]
    # At least 0.1 s, 0.2 s, 0.4 s after each busy (0.05 s x 2^k); scheduling delays only add to them.
    assert len(gaps) == 3 and all(gap >= wait for gap, wait in zip(gaps, (0.1, 0.2, 0.4))), gaps


def test_busy_retries_caps_the_resends_and_the_last_busy_reaches_the_caller(scripted):
    worker, endpoint = scripted(lambda n: "busy")
    with SafetyClient(endpoint, timeout=30, busy_retries=2) as client:
        with pytest.raises(WorkerError) as failed:
            client.request("check_text", {"texts": ["x"]}).result(timeout=30)
        assert failed.value.code == P.BUSY and client.resends == 2
    assert len(worker.attempts) == 3  # the first send and two resends


def test_busy_is_never_resent_past_the_deadline_and_each_resend_carries_the_time_left(scripted):
    """With no cap (the trainer's `busy_retries=None`), a worker that stays full gets resends until the next
    one would land after the request's deadline; then the caller gets the `busy` answer, in time."""
    worker, endpoint = scripted(lambda n: "busy")
    with SafetyClient(endpoint, timeout=2.0, busy_retries=None) as client:
        started = time.monotonic()
        with pytest.raises(WorkerError) as failed:
            client.request("check_text", {"texts": ["x"]}).result(timeout=10)
        elapsed = time.monotonic() - started
    assert failed.value.code == P.BUSY and elapsed < 2.0
    times = [t for t, _ in worker.attempts]
    budgets = [request.timeout_ms for _, request in worker.attempts]
    assert len(times) >= 4  # 0, +0.1, +0.3, +0.7, +1.5 s: the next (+3.1 s) would be past the deadline
    assert budgets[0] == 2000 and all(b < a for a, b in zip(budgets, budgets[1:]))
    for sent, budget in zip(times, budgets):
        left_ms = (started + 2.0 - sent) * 1000  # the request's deadline is a little after started + 2 s
        assert left_ms - 2 <= budget <= left_ms + 200, (left_ms, budget)
