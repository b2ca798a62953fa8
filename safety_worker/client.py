"""SafetyClient: a DEALER socket that talks to a safety worker (no torch, no cosmos_guardrail).

One I/O thread owns the socket (ZeroMQ sockets are not thread-safe); callers from any thread hand
it encoded requests through a queue and wake it through a socketpair, and get a
`concurrent.futures.Future` back. Replies are matched to requests by id, so many requests can be
in flight at once and replies may come back in any order. A request that gets no reply within its
timeout fails with `WorkerTimeout`; the worker is told the same timeout and skips the request if it
has not started it by then.
"""
from __future__ import annotations

import collections
import itertools
import os
import socket
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import zmq

from . import protocol as P

_MAX_POLL_MS = 1000  # the I/O thread re-checks deadlines at least this often


class WorkerError(RuntimeError):
    """The worker answered with an error (`code` is one of safety_worker.protocol.ERROR_CODES)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"safety worker error {code}: {message}")
        self.code = code
        self.message = message


class WorkerTimeout(TimeoutError):
    """No reply within the timeout: the worker is dead, hung, overloaded or the endpoint is wrong."""


class ClientClosed(RuntimeError):
    """The client was closed while the request was pending."""


@dataclass(frozen=True)
class Verdict:
    """A safety decision. `frames` holds the sanitized (face-pixelated) frames when the input had
    frames and is safe, else None. `stage` says what blocked it ("text", "video", "timeout")."""

    safe: bool
    reason: str
    frames: np.ndarray | None = None
    stage: str | None = None


def _verdict(reply: P.Reply) -> Verdict:
    r = reply.result
    return Verdict(safe=bool(r["safe"]), reason=str(r["reason"]), frames=reply.arrays[0] if reply.arrays else None,
                   stage=r.get("stage"))


class SafetyClient:
    """Client of one safety worker endpoint; thread-safe; use as a context manager or call close()."""

    def __init__(self, endpoint: str, timeout: float = 60.0):
        self.endpoint = endpoint
        self.timeout = timeout
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.IDENTITY, os.urandom(8) + os.getpid().to_bytes(4, "little"))
        self._sock.connect(endpoint)
        self._ids = itertools.count(1)
        self._outbox: collections.deque = collections.deque()
        self._pending: dict[int, tuple[Future, float, Callable[[P.Reply], Any]]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._wake_rx, self._wake_tx = socket.socketpair()
        self._wake_rx.setblocking(False)
        self._thread = threading.Thread(target=self._io_loop, name=f"SafetyClient({endpoint})", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ public API

    def hello(self) -> dict[str, Any]:
        """The worker's self-description: pid, versions, models, limits, grad mode, loaded modules."""
        return self._call("hello")

    def ping(self) -> dict[str, Any]:
        return self._call("ping")

    def stats(self) -> dict[str, Any]:
        return self._call("stats")

    def check_text(self, texts: str | Sequence[str]) -> Verdict | list[Verdict]:
        """Check one prompt (returns a Verdict) or a list of prompts (returns a list, same order)."""
        single = isinstance(texts, str)
        verdicts = self._call("check_text", {"texts": [texts] if single else list(texts)},
                              decode=lambda rep: [Verdict(bool(v["safe"]), str(v["reason"])) for v in rep.result["verdicts"]])
        return verdicts[0] if single else verdicts

    def check_video(self, frames: np.ndarray) -> Verdict:
        """Check uint8 [T, H, W, 3] frames; the verdict carries the face-pixelated frames if safe."""
        return self._wait(self.submit_video(frames))

    def check_sample(self, text: str, frames: np.ndarray | None = None) -> Verdict:
        """Check a prompt and its frames in one round trip (text first; blocked text skips the video)."""
        return self._wait(self.submit_sample(text, frames))

    def submit_video(self, frames: np.ndarray) -> Future:
        return self._submit("check_video", {}, [frames], _verdict)

    def submit_sample(self, text: str, frames: np.ndarray | None = None) -> Future:
        """Non-blocking `check_sample`: returns a Future[Verdict]; keep as many in flight as you like."""
        return self._submit("check_sample", {"text": text}, [] if frames is None else [frames], _verdict)

    def echo(self, *arrays: np.ndarray) -> list[np.ndarray]:
        """Transport only (no checking): the worker sends the arrays straight back."""
        return self._call("echo", arrays=arrays, decode=lambda rep: rep.arrays)

    def shutdown(self, token: str) -> dict[str, Any]:
        """Ask the worker to drain and exit; only the owner's token (see spawn_worker) is accepted."""
        return self._call("shutdown", {"token": token})

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wake_tx.send(b"x")
        self._thread.join(timeout=5)
        with self._lock:
            pending, self._pending = self._pending, {}
        for fut, _, _ in pending.values():
            if not fut.done():
                fut.set_exception(ClientClosed(f"SafetyClient({self.endpoint}) was closed"))
        # Close sockets before terminating the context, or term() can hang.
        self._sock.close(linger=0)
        self._ctx.term()
        self._wake_rx.close()
        self._wake_tx.close()

    def __enter__(self) -> "SafetyClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ plumbing

    def _call(self, op: str, args: dict | None = None, arrays: Sequence[np.ndarray] = (),
              decode: Callable[[P.Reply], Any] = lambda rep: rep.result):
        return self._wait(self._submit(op, args or {}, list(arrays), decode))

    def _wait(self, fut: Future):
        # The I/O thread fails the future at its deadline; the margin only guards against a stuck thread.
        return fut.result(timeout=self.timeout + 10)

    def _submit(self, op: str, args: dict, arrays: list, decode: Callable[[P.Reply], Any]) -> Future:
        if self._closed:
            raise ClientClosed(f"SafetyClient({self.endpoint}) is closed")
        rid = next(self._ids)
        frames = P.encode_request(P.Request(id=rid, op=op, args=args, arrays=arrays, timeout_ms=int(self.timeout * 1000)))
        fut: Future = Future()
        with self._lock:
            self._pending[rid] = (fut, time.monotonic() + self.timeout, decode)
        self._outbox.append((rid, frames))
        self._wake_tx.send(b"x")
        return fut

    def _io_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_rx.fileno(), zmq.POLLIN)
        while not self._closed:
            with self._lock:
                next_deadline = min((d for _, d, _ in self._pending.values()), default=None)
            wait = _MAX_POLL_MS if next_deadline is None else max(0, min(_MAX_POLL_MS, (next_deadline - time.monotonic()) * 1000))
            events = dict(poller.poll(wait))
            if self._wake_rx.fileno() in events:
                try:
                    while self._wake_rx.recv(4096):
                        pass
                except BlockingIOError:
                    pass
            while self._outbox:
                rid, frames = self._outbox.popleft()
                try:
                    self._sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                except zmq.ZMQError as e:
                    self._fail(rid, WorkerError("send_failed", f"could not send to {self.endpoint}: {e}"))
            if self._sock in events:
                self._receive_all()
            self._expire()

    def _receive_all(self) -> None:
        while True:
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                reply = P.decode_reply(frames)
            except P.ProtocolError:
                continue  # not a reply we can attribute to a request; its caller times out
            with self._lock:
                entry = self._pending.pop(reply.id, None)
            if entry is None:
                continue  # late reply for a request that already timed out
            fut, _, decode = entry
            if reply.status == P.STATUS_ERROR:
                fut.set_exception(WorkerError(reply.error["code"], reply.error["message"]))
                continue
            try:
                fut.set_result(decode(reply))
            except Exception as e:  # a reply that does not match the op's schema
                fut.set_exception(WorkerError(P.BAD_MESSAGE, f"malformed {type(e).__name__} in reply: {e}"))

    def _expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            expired = [rid for rid, (_, d, _) in self._pending.items() if d <= now]
        for rid in expired:
            self._fail(rid, WorkerTimeout(
                f"no reply from the safety worker at {self.endpoint} within {self.timeout:g}s "
                "(is it running? `python -m safety_worker status --endpoint ...`)"))

    def _fail(self, rid: int, exc: BaseException) -> None:
        with self._lock:
            entry = self._pending.pop(rid, None)
        if entry is not None:
            entry[0].set_exception(exc)
