"""`serve --replicas N`: N checker processes behind one endpoint, with a verdict cache.

What does not depend on where the checkers run (the cache, identical checks computed once, error
replies for a lost back end, `stats` with the front's `proxy` section) is `ForwardingFront`, which
`ReplicaProxy` (local processes, below) and `fleet.FleetFront` (a Ray Serve deployment, `serve --ray`)
extend.

The front process (no torch, no cosmos_guardrail) binds the client endpoint with the same defences
as a single worker (private ipc directory + lock, CURVE on tcp, size cap) and validates every
request with `protocol.decode_request` (a malformed one is answered here and never reaches a
checker). Checks go to the replica with the fewest requests outstanding (load balancing by queue
depth, not round robin), through one `SafetyClient` per replica, so each replica link has the
client's liveness machinery: a replica killed or hung is restarted by its `Supervisor` and the
requests it owed are resent. The endpoint itself behaves as a single worker's (`front.WorkerFront`,
shared with `server.SafetyWorker`): `hello` describes the replicas' checker with the front's own pid
(the one in the endpoint's lock file), instance id, endpoint and metrics URL; `ping` and `shutdown`
are answered by the front. `echo` goes to a replica; `stats` from a replica is returned with a
`proxy` section (per-replica pids and load, the cache). A request's `timeout_ms` keeps its meaning
(the time it may wait to be started) and is passed on to the replica unchanged.

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
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Sequence

import msgpack
import numpy as np

from . import protocol as P
from .client import WorkerDead, WorkerError, WorkerTimeout
from .endpoint import claim_endpoint
from .front import WorkerFront, install_signal_handlers

logger = logging.getLogger("safety_worker.proxy")

REPLY_WAIT_S = 3600.0  # how long the front waits for a replica's reply to a request without timeout_ms
_REPLY_MARGIN_S = 10.0  # beyond timeout_ms + the check timeout: a batch's wait, the loop's poll, the link


def checker_identity(hello: dict) -> str:
    """What decides a verdict: models (their revisions or content fingerprints, not where they lie: a
    `--preset local` worker gets a fresh HF_HOME on every start), policy and versions (not pid, endpoint
    or instance)."""
    from .presets import LOCATION_KEYS

    models = hello.get("models")
    if isinstance(models, dict):
        models = {k: v for k, v in models.items() if k not in LOCATION_KEYS}
    ident = {"models": models, "policy": hello.get("policy"),
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


class ForwardingFront(WorkerFront):
    """A front that checks nothing itself: it forwards requests to checkers elsewhere, with the verdict cache.

    What it does is the module docstring's, for any back end: the cache (or the verdict store) answers a
    check it has seen, identical checks in flight at once are computed once, a back end's failure is
    answered as an error reply (never a pass), and `stats` comes back from a checker with the front's
    `proxy` section. Subclasses say where requests go (`_dispatch`, a future of the reply), whether
    anything is still owed (`_back_end_idle`), what to add to `stats` and the snapshot, and how to stop
    (`_stop_back_end`): `ReplicaProxy` (local replica processes) and `fleet.FleetFront` (a Ray Serve
    deployment)."""

    def __init__(self, endpoint: str, checker_hello: dict, *, limits: P.Limits = P.Limits(), cache_bytes: int = 256 << 20,
                 owner_token: str | None = None, curve_dir: str | None = None, parent_pid: int | None = None,
                 lock_file=None, cache_file: str | None = None, verdict_store: str | None = None,
                 verdict_store_bytes: int = 10 << 30):
        """`checker_hello`: `hello`'s checker fields, the back end's (all its checkers run the same command)."""
        super().__init__(endpoint, limits=limits, owner_token=owner_token, parent_pid=parent_pid,
                         curve_dir=curve_dir, lock_file=lock_file)
        self.checker_hello = dict(checker_hello)
        self.identity = checker_identity(self.checker_hello)
        # A check that started is answered within its check timeout (blocked if it overran).
        self._check_time_s = float(self.checker_hello.get("limits", {}).get("check_timeout_s", 60.0))
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
        self.counts = {"requests": 0, "answered_here": 0}

    # -- what a forwarding front says differently (subclasses)

    def _dispatch(self, req: P.Request) -> Future:
        """Send `req` to a checker; a future of its `P.Reply` (or of the exception that lost it)."""
        raise NotImplementedError

    def _back_end_idle(self) -> bool:
        """True when no request sent to the back end is still owed."""
        raise NotImplementedError

    def _back_end_snapshot(self) -> dict:
        """The back end's part of the `proxy` section."""
        return {}

    def _stats_sections(self) -> dict:
        """What this front adds to a checker's `stats`."""
        return {"proxy": self.snapshot()}

    def _stop_back_end(self) -> None:
        pass

    def _error_detail(self, exc: BaseException) -> str:
        """Words put before the message of a back-end failure."""
        return ""

    # -- the front's hooks

    def _checker_hello(self) -> dict:
        return dict(self.checker_hello)

    def _count_request(self, op: str) -> None:
        self.counts["requests"] += 1

    def _drained(self) -> bool:
        return not self._inflight and self._back_end_idle() and not self._done

    def _close_back_end(self) -> None:
        if self.cache_file:
            self.cache.save(self.cache_file, self.identity)
        self._stop_back_end()

    def _handle(self, envelope: list, req: P.Request) -> None:
        key = None
        if req.op in P.CHECK_OPS:
            key = content_key(self.identity, req.op, req.args, req.arrays)
            cached = self.cache.get(key)
            if cached is not None:
                self.counts["answered_here"] += 1
                self._send(envelope, P.Reply(req.id, P.STATUS_OK, result=cached[0], arrays=cached[1]), req.op)
                return
            if key in self._inflight:  # the same content is being checked now: wait for that verdict
                self._inflight[key].append((envelope, req.id))
                return
            self._inflight[key] = [(envelope, req.id)]
        try:
            future = self._dispatch(req)
        except Exception as e:  # the back end cannot take it (a dead replica client, a stopped fleet)
            self._finish(envelope, req, key, None, e)
            return
        future.add_done_callback(lambda f, env=envelope, r=req, k=key: self._queue_done(env, r, k, f))

    def _deadlines(self, req: P.Request) -> dict:
        """The back end's deadlines: `timeout_ms` keeps its meaning at a single worker (the time the
        request may wait to be *started*) and passes on unchanged; the front waits for the reply that
        long plus a check's run time (any value, 2^64-1 ms included, is fine)."""
        if req.timeout_ms is None:
            return {}
        start = req.timeout_ms / 1000
        return {"start_within": start, "timeout": start + self._check_time_s + _REPLY_MARGIN_S}

    def _queue_done(self, envelope, req, key, future: Future) -> None:
        # Runs on the back end's I/O thread: hand over to the serving thread, which owns the socket.
        self._done.append((envelope, req, key, future))
        self.wake()

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
            # A checker's own error is passed on as a single worker would word it.
            message = exc.message if isinstance(exc, WorkerError) else str(exc)
            reply = P.error_reply(req.id, code, f"{self._error_detail(exc)}{message}")
        elif req.op == "stats":
            reply.result = dict(reply.result, **self._stats_sections())
        if key is not None:
            if exc is None and _cacheable(reply):
                self.cache.put(key, reply.result, reply.arrays)
            waiters = self._inflight.pop(key, [(envelope, req.id)])
        else:
            waiters = [(envelope, req.id)]
        for env, rid in waiters:
            self._send(env, P.Reply(rid, reply.status, result=reply.result, error=reply.error, arrays=reply.arrays), req.op)

    def snapshot(self) -> dict:
        return {**self._back_end_snapshot(), "requests": self.counts["requests"],
                "answered_from_cache": self.counts["answered_here"], "cache": self.cache.snapshot(),
                "checker_identity": self.identity}


class ReplicaProxy(ForwardingFront):
    """Serve `endpoint` with the replicas' endpoints behind it; see the module docstring."""

    name = "replica proxy"

    def __init__(self, endpoint: str, replicas: Sequence, *, metrics_port: int | None = None, **front):
        """`front`: `ForwardingFront`'s options; its `lock_file` (`endpoint.claim_endpoint`) was taken before
        the replicas were started."""
        self.replicas = list(replicas)
        super().__init__(endpoint, self.replicas[0].hello, **front)
        self.clients = [r.client(timeout=REPLY_WAIT_S) for r in self.replicas]
        self.counts["dispatched"] = [0] * len(self.replicas)
        self._scrape_clients = []
        if metrics_port is not None:
            self._serve_replica_metrics(metrics_port)

    def _serve_replica_metrics(self, port: int) -> str:
        """Serve Prometheus metrics for all replicas (label `replica`) and the front's own counters."""
        from .metrics import proxy_families

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

        return self.serve_metrics(port, sources, lambda: proxy_families(self.snapshot()))

    def _dispatch(self, req: P.Request) -> Future:
        # Load balancing by queue depth, not round robin.
        i = min(range(len(self.clients)), key=lambda j: self.clients[j].outstanding)
        self.counts["dispatched"][i] += 1
        return self.clients[i].request(req.op, req.args, req.arrays, **self._deadlines(req))

    def _back_end_idle(self) -> bool:
        return not any(c.outstanding for c in self.clients)

    def _error_detail(self, exc: BaseException) -> str:
        return "a replica is dead: " if isinstance(exc, WorkerDead) else ""

    def _stop_back_end(self) -> None:
        for client in self.clients + self._scrape_clients:
            client.close()
        # Side by side: each drains for a while, and whoever stops this front waits only so long
        # (spawn_worker's stop: 10 s) before it kills the front and leaves the replicas to their parent watch.
        with ThreadPoolExecutor(len(self.replicas)) as pool:
            list(pool.map(lambda replica: replica.stop(), self.replicas))

    def _back_end_snapshot(self) -> dict:
        return {"replicas": len(self.replicas), "replica_pids": [r.pid for r in self.replicas],
                "outstanding": [c.outstanding for c in self.clients], "dispatched": list(self.counts["dispatched"])}


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


def front_options(args, owner_token: str | None, limits: P.Limits) -> dict:
    """`ForwardingFront`'s options from `serve`'s arguments (the lock file aside)."""
    return {"limits": limits, "cache_bytes": int(args.cache_mb * 2**20), "owner_token": owner_token,
            "curve_dir": args.curve_dir, "parent_pid": args.parent_pid, "cache_file": args.cache_file,
            "verdict_store": args.verdict_store, "verdict_store_bytes": int(args.verdict_store_mb * 2**20)}


def serve_replicas(args, owner_token: str | None, limits: P.Limits) -> int:
    """`serve --replicas N`: spawn N supervised replicas on private ipc endpoints, then run the proxy."""
    import sys

    from .spawn import spawn_worker

    extra = replica_args(args.argv)
    replicas, error = [], None
    try:
        lock = claim_endpoint(args.endpoint, args.curve_dir, args.insecure)  # fail fast, before N slow starts
        with ThreadPoolExecutor(args.replicas) as pool:  # start them side by side
            starts = [pool.submit(spawn_worker, preset=args.preset, device=args.device, extra_args=extra)
                      for _ in range(args.replicas)]
            for start in starts:
                try:
                    replicas.append(start.result())
                except Exception as e:
                    error = e
        if error is not None:
            raise error
        proxy = ReplicaProxy(args.endpoint, replicas, metrics_port=args.metrics_port, lock_file=lock, **front_options(args, owner_token, limits))
    except Exception as e:  # WorkerStartError (endpoint, metrics port) or a replica that did not start
        for r in replicas:
            r.stop(timeout=5)
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.insecure and args.endpoint.startswith("tcp://"):
        logger.warning("INSECURE: %s accepts unauthenticated clients from the network (--insecure)", args.endpoint)
    install_signal_handlers(proxy)
    proxy.announce_ready(replicas=len(replicas), replica_pids=",".join(str(r.pid) for r in replicas))
    proxy.serve()
    return 0
