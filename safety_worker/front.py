"""The worker front: the one ROUTER loop behind every worker endpoint (`serve` and `serve --replicas N`).

A client written from docs/PROTOCOL.md must not be able to tell a single worker from a replica
front, so everything the protocol says about the endpoint itself lives here, once:

- the router loop: poll the ROUTER and a wake-up socket, take a bounded burst of messages so that
  finished work is not starved, stop once draining is done;
- envelopes: a DEALER peer's message is `[identity, tag, header, ...]`; a REQ peer puts an empty
  delimiter frame after its identity and accepts only a reply that carries it back, so the
  delimiter is kept in the envelope every reply is sent with;
- decoding and validation (`protocol.decode_request`); a malformed request is answered here;
- the owner rule for `shutdown`, draining (`shutting_down` to new requests), SIGTERM/SIGINT;
- `hello` and `ping`, answered by the process that owns the endpoint: `hello.pid` is the pid in the
  endpoint's lock file, `hello.metrics_url` the port this process serves, `instance_id` changes only
  when the endpoint's process does (a replica restarted behind a front does not change it);
- the parent watch (`--parent-pid`): a worker whose spawner died stops instead of lingering.

`WorkerFront` subclasses say only what differs: how a request is answered (`_handle`: check it in
this process, `server.SafetyWorker`, or forward it to a replica, `proxy.ReplicaProxy`), what the
checker is (`_checker_hello`), when draining is done (`_drained`) and what to close (`_close_back_end`).
Light: no torch, no cosmos_guardrail.
"""
from __future__ import annotations

import hmac
import logging
import os
import signal
import socket
import time
import uuid
from typing import Any, Callable, Iterable

import zmq

from . import protocol as P
from .client import drain_wakeups
from .endpoint import LINGER_MS, WorkerStartError, bind_router, release_endpoint

logger = logging.getLogger("safety_worker")

_POLL_MS = 100  # how often the loop looks at signals, the parent, drains and timeouts
_RECV_BURST = 256  # messages taken per turn before finished work is sent back


class WorkerFront:
    """Serves docs/PROTOCOL.md on `endpoint` until SIGTERM/SIGINT, owner `shutdown` or the parent's exit.

    `lock_file`: the endpoint's claim (`endpoint.claim_endpoint`), released when serving ends."""

    name = "safety worker"  # for logs

    def __init__(self, endpoint: str, *, limits: P.Limits, owner_token: str | None, parent_pid: int | None,
                 curve_dir: str | None, lock_file):
        self.endpoint = endpoint
        self.limits = limits
        self.instance_id = uuid.uuid4().hex
        self.started_at = time.time()
        self._owner_token = owner_token
        self._parent_pid = parent_pid
        self._lock_file = lock_file
        self._stopping = False
        self._metrics_server, self.metrics_url = None, None
        # Back-end threads (the checker, replica clients' I/O threads) only say "look at your queue":
        # the ROUTER is not thread-safe, so only the serving thread sends replies.
        self._wake_rx, self._wake_tx = socket.socketpair()
        self._wake_rx.setblocking(False)
        self._wake_tx.setblocking(False)
        self._ctx = zmq.Context()
        self._router, self._auth = bind_router(self._ctx, endpoint, limits.max_message_bytes, curve_dir)

    # -- what a front says differently (subclasses)

    def _handle(self, envelope: list, req: P.Request) -> None:
        """Answer (now or later, with `_send`) a well-formed request other than hello/ping/shutdown."""
        raise NotImplementedError

    def _checker_hello(self) -> dict[str, Any]:
        """`hello`'s description of the checker: versions, device, models, policy, limits, batching,
        grad_enabled, modules_loaded."""
        raise NotImplementedError

    def _send_done(self) -> None:
        """Send the replies the back end finished since the last wake-up."""

    def _tick(self) -> None:
        """Once per loop turn (e.g. answer checks that overran their timeout)."""

    def _drained(self) -> bool:
        """True when stopping may end the loop: every request received has been answered."""
        return True

    def _close_back_end(self) -> None:
        """Stop what serves the checks (the checker thread, the replicas)."""

    def _count_request(self, op: str) -> None:
        pass

    def _count_reply(self, op: str | None, reply: P.Reply) -> None:
        pass

    def _count_unroutable(self) -> None:
        pass

    # -- lifecycle

    def serve_metrics(self, port: int, sources: Callable[[], Iterable], extra: Callable[[], list] | None = None) -> str:
        """Serve Prometheus metrics (`metrics.serve_metrics`); the URL becomes `hello.metrics_url`."""
        from .metrics import serve_metrics

        try:
            self._metrics_server, self.metrics_url = serve_metrics(port, sources, extra)
        except OSError as e:
            raise WorkerStartError(f"--metrics-port {port}: {e}; pick a free port (0: any)") from None
        return self.metrics_url

    def announce_ready(self, **extra) -> None:
        """Print the one line `spawn_worker` (and a person) waits for: the endpoint accepts requests."""
        fields = {"endpoint": self.endpoint, "pid": os.getpid(), "instance": self.instance_id, **extra}
        if self.metrics_url:
            fields["metrics"] = self.metrics_url
        print("safety-worker ready " + " ".join(f"{k}={v}" for k, v in fields.items()), flush=True)

    def request_stop(self, *_) -> None:
        """Stop accepting work; finish what was received, then return from serve()."""
        self._stopping = True

    def wake(self) -> None:
        """Wake the serving thread (from any thread) to send finished replies."""
        try:
            self._wake_tx.send(b"x")
        except OSError:  # the buffer is full (a wake-up is pending anyway) or serving has ended
            pass

    def serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._wake_rx.fileno(), zmq.POLLIN)
        try:
            while True:
                events = dict(poller.poll(_POLL_MS))
                if self._wake_rx.fileno() in events:
                    drain_wakeups(self._wake_rx)
                self._send_done()
                if self._router in events:
                    for _ in range(_RECV_BURST):
                        try:
                            frames = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._on_message(frames)
                self._tick()
                self._watch_parent()
                if self._stopping and self._drained():
                    break
        finally:
            if self._metrics_server is not None:
                self._metrics_server.shutdown()
            self._close_back_end()
            self._router.close(linger=LINGER_MS)
            if self._auth is not None:
                self._auth.stop()
            self._ctx.term()
            self._wake_rx.close()
            self._wake_tx.close()
            release_endpoint(self.endpoint, self._lock_file)
            logger.info("%s stopped", self.name)

    def _watch_parent(self) -> None:
        if self._parent_pid is not None and os.getppid() != self._parent_pid:
            # Our parent died (even by SIGKILL) and we were re-parented: do not linger as an orphan.
            logger.warning("parent process %d is gone; stopping", self._parent_pid)
            self._parent_pid = None
            self.request_stop()

    # -- requests

    def _on_message(self, frames: list) -> None:
        # REQ peers put an empty delimiter after their identity: it stays in the envelope, so it goes back.
        split = 2 if len(frames) >= 2 and len(frames[1]) == 0 else 1
        envelope, body = frames[:split], frames[split:]
        try:
            req = P.decode_request(body, self.limits)
        except P.ProtocolError as e:
            self._send(envelope, P.error_reply(e.request_id, e.code, e.message))
            return
        self._count_request(req.op)
        try:
            if self._stopping:
                reply = P.error_reply(req.id, P.SHUTTING_DOWN, "the worker is shutting down; use another worker")
            elif req.op == "shutdown":
                reply = self._shutdown(req)
            elif req.op == "hello":
                reply = P.Reply(req.id, P.STATUS_OK, result=self.hello())
            elif req.op == "ping":
                reply = P.Reply(req.id, P.STATUS_OK, result={"instance_id": self.instance_id, "time": time.time()})
            else:
                self._handle(envelope, req)
                return
        except Exception as e:  # a bug must not kill the worker
            logger.exception("op %s failed", req.op)
            reply = P.error_reply(req.id, P.INTERNAL, f"{type(e).__name__}: {e}")
        self._send(envelope, reply, req.op)

    def _shutdown(self, req: P.Request) -> P.Reply:
        if not self._owner_token:
            return P.error_reply(req.id, P.FORBIDDEN, "this worker has no owner token; stop it with SIGTERM")
        if not hmac.compare_digest(req.args.get("token", "").encode(), self._owner_token.encode()):
            return P.error_reply(req.id, P.FORBIDDEN, "only the worker's owner may shut it down")
        self.request_stop()
        return P.Reply(req.id, P.STATUS_OK, result={"stopping": True})

    def hello(self) -> dict[str, Any]:
        """The handshake: the checker (`_checker_hello`) and the process that owns the endpoint."""
        return {
            **self._checker_hello(),
            "protocol": [P.PROTOCOL_MAJOR, P.PROTOCOL_MINOR],
            "instance_id": self.instance_id,
            "pid": os.getpid(),  # the pid in the endpoint's lock file
            "endpoint": self.endpoint,
            "metrics_url": self.metrics_url,
            "ops": sorted(P.OPS),
        }

    def _send(self, envelope: list, reply: P.Reply, op: str | None = None) -> None:
        """Send one reply and count it (`op` None: the request could not be read)."""
        self._count_reply(op, reply)
        try:
            # NOBLOCK: a client that stopped reading must not stall every other client.
            self._router.send_multipart(envelope + P.encode_reply(reply), flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as e:  # EHOSTUNREACH (peer gone) or EAGAIN (peer's queue full)
            self._count_unroutable()
            logger.warning("reply id=%s not delivered: %s", reply.id, e)


def install_signal_handlers(front: WorkerFront) -> None:
    """SIGTERM and SIGINT drain the front (finish what was received, then exit 0)."""
    signal.signal(signal.SIGTERM, front.request_stop)
    signal.signal(signal.SIGINT, front.request_stop)
