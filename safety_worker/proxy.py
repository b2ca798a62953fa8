"""`serve --replicas N`: N checker processes behind one endpoint, with a verdict cache.

The front process (no torch, no cosmos_guardrail) binds the client endpoint with the same defences
as a single worker (private ipc directory + lock, CURVE on tcp, size cap) and validates every
request with `protocol.decode_request` (a malformed one is answered here and never reaches a
checker). Checks go to the replica with the fewest requests outstanding (load balancing by queue
depth, not round robin), through one `SafetyClient` per replica, so each replica link has the
client's liveness machinery: a replica killed or hung is restarted by its `Supervisor` and the
requests it owed are resent. `hello`, `ping` and `echo` go to a replica too, so clients see a real
checker; `stats` from a replica is returned with a `proxy` section (per-replica load, cache).

Verdict cache: key = SHA-256 over the checker identity (preset, model ids, policy, worker and
cosmos-guardrail versions from the replicas' `hello`) and the request's content (op, args, array
dtypes, shapes and bytes). A cached verdict (with its sanitized frames) is answered without a
checker; identical requests in flight at once are computed once. Verdicts that came from a
fault (`Verdict.fault`: checker timeout, guard error, an unlabeled guard answer) are not cached. LRU, bounded in bytes;
with `--cache-file` it is saved at shutdown and loaded at start (only entries of the same checker
identity; the file must be the worker user's own, mode 0600). With `--verdict-store PATH` the cache
is the shared on-disk `verdict_store.VerdictStore` instead (same keys: what `curate` jobs and other
workers stored is answered here, and what this front computes is there for them).
"""
from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import socket
from concurrent.futures import Future
from typing import Sequence

import msgpack
import numpy as np
import zmq

from . import protocol as P
from .client import WorkerDead, WorkerError, WorkerTimeout, drain_wakeups
from .endpoint import LINGER_MS, bind_router, claim_endpoint, release_endpoint

logger = logging.getLogger("safety_worker.proxy")

_POLL_MS = 100


def checker_identity(hello: dict) -> str:
    """What decides a verdict: models, policy and versions (not pid, endpoint or instance)."""
    ident = {"models": hello.get("models"), "policy": hello.get("policy"),
             "versions": {k: hello.get("versions", {}).get(k) for k in ("worker", "cosmos-guardrail", "transformers")},
             "protocol": hello.get("protocol")}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def content_key(identity: str, op: str, args: dict, arrays: Sequence[np.ndarray]) -> str:
    """Key of a check's verdict: the checker, the op, its arguments and the arrays' dtypes, shapes and bytes."""
    h = hashlib.sha256(identity.encode())
    h.update(msgpack.packb([op, args], use_bin_type=True))
    for a in arrays:
        h.update(f"{a.dtype.name}{list(a.shape)}".encode())
        h.update(memoryview(np.ascontiguousarray(a)).cast("B"))
    return h.hexdigest()


def _cacheable(reply: P.Reply) -> bool:
    if reply.status != P.STATUS_OK:
        return False
    # A fault (timeout, guard error, unlabeled answer) says nothing about the content: never reuse it.
    return not any(P.Verdict.from_wire(v).fault for v in reply.result.get("verdicts", [reply.result]))


class VerdictCache:
    """LRU of reply (result, arrays) by content key, bounded by the bytes of the cached arrays."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: collections.OrderedDict[str, tuple[dict, list[np.ndarray], int]] = collections.OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def get(self, key: str):
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return item[0], item[1]

    def put(self, key: str, result: dict, arrays: Sequence[np.ndarray]) -> None:
        if self.max_bytes <= 0:
            return
        arrays = [np.array(a, copy=True) for a in arrays]  # own the bytes (replies are views of zmq frames)
        size = sum(a.nbytes for a in arrays) + 256
        if size > self.max_bytes:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= old[2]
        self._items[key] = (result, arrays, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, _, s) = self._items.popitem(last=False)
            self.bytes -= s

    def snapshot(self) -> dict:
        return {"entries": len(self._items), "bytes": self.bytes, "max_bytes": self.max_bytes,
                "hits": self.hits, "misses": self.misses}

    def save(self, path: str | os.PathLike, identity: str) -> None:
        """Write the entries (msgpack: no code on load) to `path`, 0600, atomically."""
        entries = [[key, result, [[a.dtype.name, list(a.shape), a.tobytes()] for a in arrays]]
                   for key, (result, arrays, _) in self._items.items()]
        tmp = f"{path}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(msgpack.packb({"identity": identity, "entries": entries}, use_bin_type=True))
        os.replace(tmp, path)

    def load(self, path: str | os.PathLike, identity: str) -> int:
        """Add the entries saved for the same checker identity; returns how many. A file that others
        could have written is refused (a planted entry would be a forged "safe" verdict)."""
        st = os.stat(path)
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise PermissionError(f"verdict cache {path} must be yours and mode 0600; remove it or `chmod 600 {path}`")
        with open(path, "rb") as f:
            data = msgpack.unpackb(f.read(), raw=False, strict_map_key=True)
        if data.get("identity") != identity:
            return 0  # another checker's verdicts: not ours to reuse
        for key, result, arrays in data["entries"]:
            self.put(key, result, [np.frombuffer(buf, dtype=np.dtype(dt)).reshape(shape) for dt, shape, buf in arrays])
        return len(data["entries"])


class ReplicaProxy:
    """Serve `endpoint` with the replicas' endpoints behind it; see the module docstring."""

    def __init__(self, endpoint: str, replicas: Sequence, *, limits: P.Limits = P.Limits(), cache_bytes: int = 256 << 20,
                 owner_token: str | None = None, curve_dir: str | None = None, insecure: bool = False,
                 parent_pid: int | None = None, lock_file=None, cache_file: str | None = None,
                 verdict_store: str | None = None, verdict_store_bytes: int = 10 << 30):
        """`lock_file`: the endpoint's claim (`endpoint.claim_endpoint`), taken before the replicas were started."""
        self.endpoint = endpoint
        self.replicas = list(replicas)
        self.limits = limits
        self._owner_token = owner_token
        self._parent_pid = parent_pid
        self._lock_file = lock_file
        self.clients = [r.client(timeout=3600.0) for r in self.replicas]
        self.identity = checker_identity(self.replicas[0].hello)
        if verdict_store:  # the verdict store shared with other workers, curate jobs and experiments
            from .verdict_store import VerdictStore

            self.cache = VerdictStore(verdict_store, verdict_store_bytes)
            cache_file = None  # the store is on disk already
        else:
            self.cache = VerdictCache(cache_bytes)
        self.cache_file = cache_file
        if cache_file and os.path.exists(cache_file):
            logger.info("verdict cache: %d entries loaded from %s", self.cache.load(cache_file, self.identity), cache_file)
        self._inflight: dict[str, list] = {}  # content key -> waiting (envelope, request id)
        self._done: collections.deque = collections.deque()
        self._wake_rx, self._wake_tx = socket.socketpair()
        self._wake_rx.setblocking(False)
        self._stopping = False
        self.counts = {"requests": 0, "answered_here": 0, "dispatched": [0] * len(self.replicas)}
        self._ctx = zmq.Context()
        self._front, self._auth = bind_router(self._ctx, endpoint, limits.max_message_bytes, curve_dir)
        self._metrics_server, self.metrics_url, self._scrape_clients = None, None, []

    def serve_metrics(self, port: int) -> str:
        """Serve Prometheus metrics for all replicas (label `replica`) and the front's own counters."""
        from .metrics import proxy_families, serve_metrics

        # Separate clients with a short timeout: a scrape must not wait an hour on a hung replica.
        self._scrape_clients = [r.client(timeout=5.0) for r in self.replicas]

        def sources():
            out = []
            for i, client in enumerate(self._scrape_clients):
                try:
                    out.append(({"replica": str(i)}, client.stats()))
                except Exception as e:  # a replica being restarted: leave it out of this scrape
                    logger.warning("metrics: replica %d did not answer stats: %s", i, e)
            return out

        self._metrics_server, self.metrics_url = serve_metrics(port, sources, lambda: proxy_families(self.snapshot()))
        return self.metrics_url

    def request_stop(self, *_):
        self._stopping = True

    def serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._front, zmq.POLLIN)
        poller.register(self._wake_rx.fileno(), zmq.POLLIN)
        try:
            while True:
                events = dict(poller.poll(_POLL_MS))
                if self._wake_rx.fileno() in events:
                    drain_wakeups(self._wake_rx)
                self._send_done()
                if self._front in events:
                    for _ in range(256):
                        try:
                            frames = self._front.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._on_message(frames)
                if self._parent_pid is not None and os.getppid() != self._parent_pid:
                    logger.warning("parent process %d is gone; stopping", self._parent_pid)
                    self._parent_pid = None
                    self._stopping = True
                if self._stopping and not self._inflight and not any(c.outstanding for c in self.clients) and not self._done:
                    break
        finally:
            if self.cache_file:
                self.cache.save(self.cache_file, self.identity)
            if self._metrics_server is not None:
                self._metrics_server.shutdown()
            for client in self.clients + self._scrape_clients:
                client.close()
            for replica in self.replicas:
                replica.stop()
            self._front.close(linger=LINGER_MS)
            if self._auth is not None:
                self._auth.stop()
            self._ctx.term()
            release_endpoint(self.endpoint, self._lock_file)
            logger.info("replica proxy stopped")

    # -- front side (main thread only)

    def _on_message(self, frames: list) -> None:
        envelope, body = frames[:1], frames[1:]
        try:
            req = P.decode_request(body, self.limits)
        except P.ProtocolError as e:
            self._reply(envelope, P.error_reply(e.request_id, e.code, e.message))
            return
        self.counts["requests"] += 1
        if self._stopping:
            self._reply(envelope, P.error_reply(req.id, P.SHUTTING_DOWN, "the worker is shutting down; use another worker"))
            return
        if req.op == "shutdown":
            import hmac

            if not self._owner_token or not hmac.compare_digest(req.args.get("token", "").encode(), self._owner_token.encode()):
                self._reply(envelope, P.error_reply(req.id, P.FORBIDDEN, "only the worker's owner may shut it down"))
            else:
                self.request_stop()
                self._reply(envelope, P.Reply(req.id, P.STATUS_OK, result={"stopping": True}))
            return
        key = None
        if req.op in P.CHECK_OPS:
            key = content_key(self.identity, req.op, req.args, req.arrays)
            cached = self.cache.get(key)
            if cached is not None:
                self.counts["answered_here"] += 1
                self._reply(envelope, P.Reply(req.id, P.STATUS_OK, result=cached[0], arrays=cached[1]))
                return
            if key in self._inflight:  # the same content is being checked now: wait for that verdict
                self._inflight[key].append((envelope, req.id))
                return
            self._inflight[key] = [(envelope, req.id)]
        i = min(range(len(self.clients)), key=lambda j: self.clients[j].outstanding)
        self.counts["dispatched"][i] += 1
        timeout = (req.timeout_ms / 1000) if req.timeout_ms is not None else 3600.0
        try:
            future = self.clients[i].request(req.op, req.args, req.arrays, timeout=timeout)
        except Exception as e:  # the replica client is dead (restart budget spent)
            self._finish(envelope, req, key, None, e)
            return
        future.add_done_callback(lambda f, env=envelope, r=req, k=key: self._queue_done(env, r, k, f))

    def _queue_done(self, envelope, req, key, future: Future) -> None:
        # Runs on the replica client's I/O thread: hand over to the main thread, which owns the socket.
        self._done.append((envelope, req, key, future))
        try:
            self._wake_tx.send(b"x")
        except OSError:
            pass

    def _send_done(self) -> None:
        while self._done:
            envelope, req, key, future = self._done.popleft()
            try:
                self._finish(envelope, req, key, future.result(), None)
            except Exception as e:
                self._finish(envelope, req, key, None, e)

    def _finish(self, envelope, req: P.Request, key, reply: P.Reply | None, exc: BaseException | None) -> None:
        if exc is not None:
            code = (exc.code if isinstance(exc, WorkerError) and exc.code in P.ERROR_CODES else
                    P.DEADLINE_EXCEEDED if isinstance(exc, WorkerTimeout) else P.INTERNAL)
            detail = "a replica is dead: " if isinstance(exc, WorkerDead) else ""
            reply = P.error_reply(req.id, code, f"{detail}{exc}")
        elif req.op == "stats":
            reply.result = dict(reply.result, proxy=self.snapshot())
        if key is not None:
            if exc is None and _cacheable(reply):
                self.cache.put(key, reply.result, reply.arrays)
            waiters = self._inflight.pop(key, [(envelope, req.id)])
        else:
            waiters = [(envelope, req.id)]
        for env, rid in waiters:
            self._reply(env, P.Reply(rid, reply.status, result=reply.result, error=reply.error, arrays=reply.arrays))

    def _reply(self, envelope, reply: P.Reply) -> None:
        try:
            self._front.send_multipart(envelope + P.encode_reply(reply), flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as e:
            logger.warning("reply id=%s not delivered: %s", reply.id, e)

    def snapshot(self) -> dict:
        return {"replicas": len(self.replicas), "replica_pids": [r.pid for r in self.replicas],
                "outstanding": [c.outstanding for c in self.clients], "dispatched": list(self.counts["dispatched"]),
                "requests": self.counts["requests"], "answered_from_cache": self.counts["answered_here"],
                "cache": self.cache.snapshot(), "checker_identity": self.identity}


# Options of `serve` that belong to the front process, not to its replicas (value-taking ones first).
_FRONT_OPTIONS = {"--endpoint": True, "--replicas": True, "--cache-mb": True, "--cache-file": True, "--curve-dir": True, "--parent-pid": True,
                  "--verdict-store": True, "--verdict-store-mb": True,
                  "--preset": True, "--device": True, "--insecure": False, "--metrics-port": True}


def replica_args(argv: Sequence[str]) -> list[str]:
    """`serve` argv without the front-only options (spawn_worker adds endpoint, preset, device, parent)."""
    out, skip = [], False
    for arg in list(argv)[1:] if argv and argv[0] == "serve" else list(argv):
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in _FRONT_OPTIONS:
            skip = _FRONT_OPTIONS[name] and "=" not in arg
            continue
        out.append(arg)
    return out


def serve_replicas(args, owner_token: str | None, limits: P.Limits) -> int:
    """`serve --replicas N`: spawn N supervised replicas on private ipc endpoints, then run the proxy."""
    import signal
    import sys

    from .endpoint import WorkerStartError
    from .spawn import spawn_worker

    extra = replica_args(args.argv)
    replicas = []
    try:
        lock = claim_endpoint(args.endpoint, args.curve_dir, args.insecure)  # fail fast, before N slow starts
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(args.replicas) as pool:  # start them side by side
            starts = [pool.submit(spawn_worker, preset=args.preset, device=args.device, extra_args=extra)
                      for _ in range(args.replicas)]
            for start in starts:
                try:
                    replicas.append(start.result())
                except Exception as e:
                    error = e
        if len(replicas) < args.replicas:
            raise error
        proxy = ReplicaProxy(args.endpoint, replicas, limits=limits, cache_bytes=int(args.cache_mb * 2**20),
                             owner_token=owner_token, curve_dir=args.curve_dir, insecure=args.insecure,
                             parent_pid=args.parent_pid, lock_file=lock, cache_file=args.cache_file,
                             verdict_store=args.verdict_store, verdict_store_bytes=int(args.verdict_store_mb * 2**20))
    except (WorkerStartError, Exception) as e:
        for r in replicas:
            r.stop(timeout=5)
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.insecure and args.endpoint.startswith("tcp://"):
        logger.warning("INSECURE: %s accepts unauthenticated clients from the network (--insecure)", args.endpoint)
    if args.metrics_port is not None:
        try:
            logger.info("metrics at %s", proxy.serve_metrics(args.metrics_port))
        except OSError as e:
            print(f"error: --metrics-port {args.metrics_port}: {e}; pick a free port (0: any)", file=sys.stderr)
            for r in replicas:
                r.stop(timeout=5)
            return 2
    signal.signal(signal.SIGTERM, proxy.request_stop)
    signal.signal(signal.SIGINT, proxy.request_stop)
    print(f"safety-worker ready endpoint={args.endpoint} pid={os.getpid()} replicas={len(replicas)} "
          f"replica_pids={','.join(str(r.pid) for r in replicas)}"
          + (f" metrics={proxy.metrics_url}" if proxy.metrics_url else ""), flush=True)
    proxy.serve()
    return 0
