"""SafetyClient: a DEALER socket that talks to a safety worker (no torch, no cosmos_guardrail).

One I/O thread owns the socket (ZeroMQ sockets are not thread-safe); callers from any thread hand
it encoded requests through a queue and wake it through a socketpair, and get a
`concurrent.futures.Future` back. Replies are matched to requests by id, so many requests can be
in flight at once and replies may come back in any order. A request that gets no reply within its
timeout fails with `WorkerTimeout`; the worker is told the same timeout and skips the request if it
has not started it by then.

Liveness (docs/RELIABILITY.md): the I/O thread pings the worker while replies are owed
(`heartbeat`); if the worker stays silent for `dead_after` seconds it is declared dead, every
pending request fails with `WorkerDead` and so does every later call (no request is ever answered
"safe" by default). When the connection drops and comes back (a supervised worker restarted on the
same endpoint, see `safety_worker.liveness.Supervisor`) every request still owed is sent again:
checks are idempotent and a second reply to the same id is ignored. A `busy` answer is retried with
exponential backoff (Lazy Pirate), at most `busy_retries` times (None: no limit) and never past the
request's deadline.
"""
from __future__ import annotations

import collections
import itertools
import math
import os
import socket
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Sequence

import numpy as np
import zmq

from . import protocol as P
from .liveness import DEAD_AFTER_S, HEARTBEAT_S

_MAX_POLL_MS = 1000  # the I/O thread re-checks deadlines at least this often
_SEND_RETRY_MS = 20  # how soon a request that found no connected worker is sent again


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


class WorkerDead(ConnectionError):
    """The worker stopped answering (died or hung) for `dead_after` seconds; this client is unusable.

    Raised for every request that was pending and for every later call: open a new client once a
    worker is serving again (a worker from `spawn_worker` is restarted by its supervisor)."""


Verdict = P.Verdict  # defined next to the codec: the worker, this client, the proxy and trainers share it


def _verdict(reply: P.Reply) -> Verdict:
    return Verdict.from_wire(reply.result, reply.arrays[0] if reply.arrays else None)


def _wire_ms(seconds: float) -> int:
    """`timeout_ms` for a wait of `seconds` (a uint64 on the wire: a longer wait is sent as the largest)."""
    return max(0, min(P.MAX_ID, int(seconds * 1000)))


def drain_wakeups(sock: socket.socket) -> None:
    """Empty a non-blocking wake-up socketpair end (its bytes only mean "look at your queue")."""
    try:
        while sock.recv(4096):
            pass
    except BlockingIOError:
        pass


class SafetyClient:
    """Client of one safety worker endpoint; thread-safe; use as a context manager or call close()."""

    def __init__(self, endpoint: str, timeout: float = 60.0, *, heartbeat: float | None = HEARTBEAT_S,
                 dead_after: float | None = DEAD_AFTER_S, busy_retries: int | None = 6, curve_server_key: bytes | str | None = None,
                 curve_keys_dir: str | None = None):
        """`timeout`: seconds one request may take. `heartbeat`: ping interval while replies are owed
        (None: no pings). `dead_after`: seconds of silence, while replies are owed, after which the worker
        is declared dead (None: never; each request still times out). `busy_retries`: resends of a request
        the worker answered `busy` (None: as many as fit before its deadline; the backoff grows to 2 s
        between resends). `curve_server_key`: the worker's CURVE public key (z85) for a tcp://
        worker serving with keys; the client's own key pair comes from `curve_keys_dir` (see
        `python -m safety_worker keys`) or is generated for this client alone."""
        self.endpoint = endpoint
        self.timeout = timeout
        self.heartbeat = heartbeat
        self.dead_after = dead_after
        self.busy_retries = busy_retries
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.IDENTITY, os.urandom(8) + os.getpid().to_bytes(4, "little"))
        if curve_server_key is not None:
            from .security import configure_curve_client

            configure_curve_client(self._sock, curve_server_key, curve_keys_dir)
        # Connection events tell us when a restarted worker is back, so owed requests can be resent.
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self._sock.connect(endpoint)
        self._ids = itertools.count(1)
        self._outbox: collections.deque = collections.deque()
        # id -> (future, reply deadline, decode, request, busy retries used, start deadline)
        self._pending: dict[int, list] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._dead: WorkerDead | None = None
        self._last_heard = time.monotonic()
        self._owed_since: float | None = None  # when the client started waiting on the worker
        self._ping_id: int | None = None
        self._ping_sent = 0.0
        self._disconnected = False
        self._retry_at: list[tuple[float, int]] = []  # (when, id) of busy requests waiting to be resent
        self.resends = 0  # requests sent again after a reconnect or a `busy` (for tests and stats)
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
        verdicts = self._wait(self.submit_text([texts] if single else list(texts)))
        return verdicts[0] if single else verdicts

    def check_video(self, frames: np.ndarray) -> Verdict:
        """Check uint8 [T, H, W, 3] frames; the verdict carries the face-pixelated frames if safe."""
        return self._wait(self.submit_video(frames))

    def check_sample(self, text: str, frames: np.ndarray | None = None) -> Verdict:
        """Check a prompt and its frames in one round trip (text first; blocked text skips the video)."""
        return self._wait(self.submit_sample(text, frames))

    # The submit_* forms return at once with a Future; keep as many in flight as you like. A future cannot
    # be cancelled (the request is already sent): drop it if you no longer need it. `timeout`: seconds for
    # this request (default: the client's), after which the future fails with WorkerTimeout.

    def submit_text(self, texts: Sequence[str], timeout: float | None = None) -> Future:
        """Non-blocking `check_text` of a list of prompts: a Future[list[Verdict]], same order."""
        return self._submit("check_text", {"texts": list(texts)}, [],
                            lambda rep: [Verdict.from_wire(v) for v in rep.result["verdicts"]], timeout=timeout)

    def submit_video(self, frames: np.ndarray, timeout: float | None = None) -> Future:
        """Non-blocking `check_video`: a Future[Verdict]."""
        return self._submit("check_video", {}, [frames], _verdict, timeout=timeout)

    def submit_sample(self, text: str, frames: np.ndarray | None = None, timeout: float | None = None) -> Future:
        """Non-blocking `check_sample`: a Future[Verdict]."""
        return self._submit("check_sample", {"text": text}, [] if frames is None else [frames], _verdict,
                            timeout=timeout)

    def echo(self, *arrays: np.ndarray) -> list[np.ndarray]:
        """Transport only (no checking): the worker sends the arrays straight back."""
        return self._call("echo", arrays=arrays, decode=lambda rep: rep.arrays)

    def shutdown(self, token: str) -> dict[str, Any]:
        """Ask the worker to drain and exit; only the owner's token (see spawn_worker) is accepted."""
        return self._call("shutdown", {"token": token})

    def request(self, op: str, args: dict | None = None, arrays: Sequence[np.ndarray] = (),
                timeout: float | None = None, start_within: float | None = None) -> Future:
        """Any op, non-blocking: a Future of the raw `protocol.Reply` (ok replies only; an error reply
        raises `WorkerError`). For tools that pass requests on, like the `--replicas` front.
        `timeout`: seconds to wait for the reply (default: the client's). `start_within`: seconds the
        worker may take to start it (its `timeout_ms`; default: `timeout`)."""
        return self._submit(op, args or {}, list(arrays), lambda rep: rep, timeout=timeout, start_within=start_within)

    @property
    def outstanding(self) -> int:
        """Requests sent and not yet answered (or failed)."""
        with self._lock:
            return len(self._pending)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wake_tx.send(b"x")
        self._thread.join(timeout=5)
        with self._lock:
            pending, self._pending = self._pending, {}
        for entry in pending.values():
            if not entry[0].done():
                entry[0].set_exception(ClientClosed(f"SafetyClient({self.endpoint}) was closed"))
        # Close sockets before terminating the context, or term() can hang.
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
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

    def _submit(self, op: str, args: dict, arrays: list, decode: Callable[[P.Reply], Any],
                timeout: float | None = None, start_within: float | None = None) -> Future:
        timeout = self.timeout if timeout is None else timeout
        start_within = timeout if start_within is None else start_within
        if self._closed:
            raise ClientClosed(f"SafetyClient({self.endpoint}) is closed")
        if self._dead is not None:
            raise WorkerDead(str(self._dead))
        rid = next(self._ids)
        now = time.monotonic()
        req = P.Request(id=rid, op=op, args=args, arrays=arrays, timeout_ms=_wire_ms(start_within))
        frames = P.encode_request(req)
        fut: Future = Future()
        # The request is on its way to the worker and cannot be taken back: mark the future running so
        # that `cancel()` returns False instead of leaving a cancelled future for the I/O thread to
        # resolve (set_result on it raises, which would kill the thread and every later call).
        fut.set_running_or_notify_cancel()
        with self._lock:
            if not self._pending:
                self._owed_since = now
            self._pending[rid] = [fut, now + timeout, decode, req, 0, now + start_within]
        self._outbox.append((rid, frames))
        self._wake_tx.send(b"x")
        return fut

    def _resend(self, rid: int) -> None:
        """Send a request again with the time it has left (the worker skips it past that)."""
        with self._lock:
            entry = self._pending.get(rid)
        if entry is None:
            return
        req: P.Request = entry[3]
        left_ms = max(1, _wire_ms(entry[5] - time.monotonic()))
        self.resends += 1
        self._outbox.append((rid, P.encode_request(P.Request(req.id, req.op, req.args, req.arrays, left_ms))))

    def _io_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_rx.fileno(), zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        while not self._closed:
            with self._lock:
                next_deadline = min((e[1] for e in self._pending.values()), default=None)
            if self._retry_at:
                next_deadline = min(next_deadline or math.inf, min(self._retry_at)[0])
            wait = _MAX_POLL_MS if next_deadline is None else max(0, min(_MAX_POLL_MS, (next_deadline - time.monotonic()) * 1000))
            if self.heartbeat is not None:
                wait = min(wait, self.heartbeat * 1000 / 2)
            if self._outbox:  # requests waiting for a worker to connect
                wait = min(wait, _SEND_RETRY_MS)
            events = dict(poller.poll(wait))
            if self._monitor in events:
                self._on_monitor_events()
            self._due_retries()
            if self._wake_rx.fileno() in events:
                drain_wakeups(self._wake_rx)
            self._flush_outbox()
            if self._sock in events:
                self._receive_all()
            self._expire()
            self._check_liveness()

    def _on_monitor_events(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)["event"]
            if event == zmq.EVENT_DISCONNECTED:
                self._disconnected = True
            elif event == zmq.EVENT_CONNECTED and self._disconnected:
                # A worker is back on the endpoint (restarted): whatever it had is lost; send it all again.
                self._disconnected = False
                self._last_heard = time.monotonic()
                self._ping_id = None
                with self._lock:
                    owed = sorted(self._pending)
                for rid in owed:
                    self._resend(rid)
                self._flush_outbox()

    def _due_retries(self) -> None:
        now = time.monotonic()
        due = [rid for when, rid in self._retry_at if when <= now]
        if due:
            self._retry_at = [(w, r) for w, r in self._retry_at if w > now]
            for rid in due:
                self._resend(rid)

    def _check_liveness(self) -> None:
        """Ping while replies are owed; declare the worker dead after `dead_after` seconds of silence."""
        with self._lock:
            owed = bool(self._pending)
        if not owed or self._dead is not None:
            return
        now = time.monotonic()
        silent_for = now - max(self._last_heard, self._owed_since or 0.0)
        if self.dead_after is not None and silent_for > self.dead_after:
            self._declare_dead(f"the safety worker at {self.endpoint} did not answer for {silent_for:.1f}s "
                               f"(dead_after={self.dead_after:g}s): it died or hung. Checks fail closed; start or "
                               "restart the worker and open a new SafetyClient.")
            return
        if self.heartbeat is not None and silent_for > self.heartbeat and (
                self._ping_id is None or now - self._ping_sent > self.heartbeat):
            rid = next(self._ids)
            self._ping_id, self._ping_sent = rid, now
            # Pings are not in _pending: any reply (to a ping or not) just proves the worker alive.
            self._outbox.append((rid, P.encode_request(P.Request(id=rid, op="ping", timeout_ms=int(self.heartbeat * 1000)))))
            self._flush_outbox()

    def _declare_dead(self, message: str) -> None:
        self._dead = WorkerDead(message)
        with self._lock:
            pending, self._pending = self._pending, {}
        self._retry_at = []
        for entry in pending.values():
            if not entry[0].done():
                entry[0].set_exception(WorkerDead(message))

    def _flush_outbox(self) -> None:
        while self._outbox:
            rid, frames = self._outbox[0]
            if rid != self._ping_id and rid not in self._pending:
                self._outbox.popleft()  # timed out while it waited for a worker: nobody wants the reply
                continue
            try:
                self._sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                # No worker connected right now (starting, restarting, or it refused our CURVE handshake):
                # keep the request queued; the I/O loop retries, and its deadline still fails it in time.
                return
            except zmq.ZMQError as e:
                self._outbox.popleft()
                self._fail(rid, WorkerError("send_failed", f"could not send to {self.endpoint}: {e}"))
                continue
            self._outbox.popleft()

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
            self._last_heard = time.monotonic()
            if reply.id == self._ping_id:
                self._ping_id = None
            with self._lock:
                entry = self._pending.get(reply.id)
                if (entry is not None and reply.status == P.STATUS_ERROR and reply.error["code"] == P.BUSY
                        and (self.busy_retries is None or entry[4] < self.busy_retries)):
                    # Lazy Pirate: back off and send again, unless the deadline comes first.
                    entry[4] += 1
                    when = time.monotonic() + min(2.0, 0.05 * 2 ** min(entry[4], 6))
                    if when < entry[1]:
                        self._retry_at.append((when, reply.id))
                        continue
                entry = self._pending.pop(reply.id, None)
            if entry is None:
                continue  # late or duplicate reply (resent request, or one that already timed out)
            fut, _, decode = entry[:3]
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
            expired = [rid for rid, e in self._pending.items() if e[1] <= now]
        for rid in expired:
            self._fail(rid, WorkerTimeout(
                f"no reply from the safety worker at {self.endpoint} in time (timeout {self.timeout:g}s) "
                "(is it running? `python -m safety_worker status --endpoint ...`)"))

    def _fail(self, rid: int, exc: BaseException) -> None:
        with self._lock:
            entry = self._pending.pop(rid, None)
        if entry is not None:
            entry[0].set_exception(exc)
