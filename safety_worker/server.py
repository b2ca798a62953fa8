"""The safety worker process: a ZeroMQ ROUTER in front of the real `cosmos_guardrail` checker.

Threads: the main thread owns the ROUTER socket (decodes, validates, answers cheap ops at once,
queues checks); one checker thread runs the guardrail models on queued checks and hands replies
back through an inproc socket (ZeroMQ sockets are not thread-safe, so only the main thread touches
the ROUTER). This keeps `hello`/`ping`/`stats` answered while a long video is being checked, lets
the queue be bounded (`busy` when full) and lets the main thread answer *blocked* for a check that
overruns `check_timeout` (fail closed) even though the stuck computation cannot be interrupted.

Importing this module is light; `SafetyWorker` imports torch and cosmos_guardrail when it loads the
checker (which switches autograd off in this process: that is why it is a separate process).
"""
from __future__ import annotations

import dataclasses
import fcntl
import hmac
import logging
import os
import queue
import re
import signal
import stat
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zmq

from . import protocol as P
from .protocol import Limits, ProtocolError, Reply, Request

logger = logging.getLogger("safety_worker")

WORKER_VERSION = "0.1.0"
_QWEN_LABEL = re.compile(r"Safety: (Safe|Unsafe|Controversial)")
_POLL_MS = 100  # how often the main loop looks at signals, drains and checker timeouts
_LINGER_MS = 1000  # let queued replies leave before the context is terminated


class WorkerStartError(RuntimeError):
    """The worker cannot start (endpoint taken or unsafe, checkpoint missing...)."""


# ---------------------------------------------------------------- fail-closed checker

class GuardedChecker:
    """`cosmos_guardrail.CosmosSafetyChecker` with verdicts that fail closed.

    cosmos_guardrail returns *safe* when Qwen3Guard raises or answers without a label, counts
    "Controversial" as safe, and modifies the caller's frames. Here: the blocklist runs as is; the
    Qwen3Guard step runs the same chat template, tokenizer and greedy generation as
    `Qwen3Guard.extract_label_and_categories` but a missing label is *blocked* and "Controversial"
    follows `controversial` ("block" by default); any exception anywhere is *blocked*; video is
    checked with `check_video_safety` on a private copy and the result must be uint8 of the input
    shape, else *blocked*.
    """

    def __init__(self, checker, controversial: str = "block"):
        if controversial not in ("block", "allow"):
            raise ValueError("controversial must be 'block' or 'allow'")
        self.checker = checker
        self.controversial = controversial

    def check_text(self, text: str) -> tuple[bool, str]:
        try:
            for guard in self.checker.text_guardrail.safety_models:
                name = type(guard).__name__.upper()
                if name == "QWEN3GUARD":
                    safe, message = self._qwen3guard(guard, text)
                else:
                    safe, message = guard.is_safe(text)
                if not safe:
                    return False, f"{name}: {message}"
            return True, "safe"
        except Exception as e:  # fail closed, whatever broke
            return False, f"text guard error, blocked (fail closed): {type(e).__name__}: {e}"

    def _qwen3guard(self, guard, prompt: str) -> tuple[bool, str]:
        from cosmos_guardrail.cosmos_utils import UNSAFE_CATEGORIES

        text = guard.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False)
        inputs = guard.tokenizer([text], return_tensors="pt").to(guard.model.device)
        generated = guard.model.generate(**inputs, max_new_tokens=128)
        content = guard.tokenizer.decode(generated[0][inputs.input_ids.shape[1]:].tolist(), skip_special_tokens=True)
        match = _QWEN_LABEL.search(content)
        if match is None:
            return False, "answer has no 'Safety:' label, blocked (fail closed)"
        label = match.group(1)
        categories = re.findall("(" + "|".join(map(re.escape, UNSAFE_CATEGORIES.values())) + ")", content)
        if label == "Safe" or (label == "Controversial" and self.controversial == "allow"):
            return True, ""
        return False, f"Safety: {label}, Categories: {categories}"

    def check_video(self, frames: np.ndarray) -> tuple[bool, str, np.ndarray | None]:
        try:
            # The checker pixelates in place: give it a private, writable, contiguous copy.
            out = self.checker.check_video_safety(np.array(frames, dtype=np.uint8, order="C", copy=True))
        except Exception as e:
            return False, f"video guard error, blocked (fail closed): {type(e).__name__}: {e}", None
        if out is None:
            return False, "video guardrail blocked the frames", None
        if not isinstance(out, np.ndarray) or out.dtype != np.uint8 or out.shape != frames.shape:
            got = f"{getattr(out, 'dtype', type(out).__name__)} {list(getattr(out, 'shape', []))}"
            return False, f"video guard returned {got} for uint8 {list(frames.shape)}, blocked (fail closed)", None
        return True, "safe", out


def load_checker(device: str = "cpu", guardrail_repo: str = "nvidia/Cosmos-1.0-Guardrail", torch_threads: int = 1):
    """Import cosmos_guardrail (autograd goes off in this process) and build the real checker."""
    import torch

    # The worker shares its node with trainers: OpenMP threads busy-waiting on shared cores made
    # checks ~15x slower here (2 threads vs 1 on a loaded 2-core machine), so default to 1.
    torch.set_num_threads(torch_threads)
    from cosmos_guardrail import CosmosSafetyChecker

    checker = CosmosSafetyChecker(checkpoint_id=guardrail_repo)
    if device != "cpu":
        checker.to(device)
    return checker


# ---------------------------------------------------------------- ipc endpoint safety

def claim_ipc_endpoint(endpoint: str):
    """For ipc://PATH: make sure PATH's directory is private (0700, ours) and take PATH.lock.

    Binding an ipc path that another worker holds silently steals it, so a second worker must
    refuse instead. Returns the open lock file (keep it open while serving) or None for non-ipc.
    """
    if not endpoint.startswith("ipc://"):
        return None
    path = Path(endpoint[len("ipc://"):])
    if not path.is_absolute():
        raise WorkerStartError(f"ipc endpoint {endpoint!r} must use an absolute path (ipc:///dir/worker.sock)")
    parent = path.parent
    if not parent.exists():
        parent.mkdir(mode=0o700, parents=True)
    st = parent.stat()
    if st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
        raise WorkerStartError(
            f"ipc directory {parent} is not private (owner uid {st.st_uid}, mode {oct(stat.S_IMODE(st.st_mode))}): "
            f"any local user could connect. Use a directory you own with `chmod 700 {parent}`, or omit --endpoint."
        )
    lock = open(str(path) + ".lock", "a+")
    os.chmod(lock.name, 0o600)
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise WorkerStartError(
            f"another safety worker (pid {holder}) is serving {endpoint}; stop it or pass a different --endpoint"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    if path.exists():  # left by a worker that died without cleaning up (we hold the lock now)
        path.unlink()
    return lock


def release_ipc_endpoint(endpoint: str, lock) -> None:
    """Undo `claim_ipc_endpoint`: remove the socket file, then drop the lock (None: nothing to do)."""
    if lock is not None:
        Path(endpoint[len("ipc://"):]).unlink(missing_ok=True)
        lock.close()


# ---------------------------------------------------------------- the server

@dataclasses.dataclass
class _Job:
    envelope: list
    request: Request
    received: float
    started: float | None = None
    _answered: bool = False
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def claim(self) -> bool:
        """True exactly once: whoever claims the job sends its one reply."""
        with self._lock:
            if self._answered:
                return False
            self._answered = True
            return True


class SafetyWorker:
    """Serves the protocol in docs/PROTOCOL.md on one endpoint until SIGTERM or owner `shutdown`."""

    def __init__(
        self,
        endpoint: str,
        load_checker: Callable[[], Any],
        *,
        models: dict[str, Any],
        limits: Limits = Limits(),
        check_timeout: float = 60.0,
        owner_token: str | None = None,
        device: str = "cpu",
        insecure: bool = False,
        controversial: str = "block",
        parent_pid: int | None = None,
        curve_dir: str | None = None,
    ):
        if endpoint.startswith("tcp://") and not insecure and curve_dir is None:
            raise WorkerStartError(
                f"{endpoint}: tcp endpoints need CURVE authentication: pass --curve-dir DIR (keys from "
                "`python -m safety_worker keys DIR`), use an ipc:// endpoint, or pass --insecure to accept "
                "unauthenticated network clients"
            )
        if curve_dir is not None:  # a bad key directory fails before the slow checker load
            from .security import CurveConfigError, check_server_dir

            try:
                check_server_dir(curve_dir)
            except CurveConfigError as e:
                raise WorkerStartError(str(e)) from None
        self.endpoint = endpoint
        # Claim the endpoint before the slow checker load, so a second worker fails fast.
        self._lock_file = claim_ipc_endpoint(endpoint)
        checker = load_checker()
        self.guard = GuardedChecker(checker, controversial=controversial)
        self.models = models
        self.limits = limits
        self.check_timeout = check_timeout
        self._owner_token = owner_token
        self.device = device
        self.instance_id = uuid.uuid4().hex
        self.started_at = time.time()
        self._jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=limits.queue_size)
        self._done: queue.SimpleQueue[tuple[_Job, Reply]] = queue.SimpleQueue()
        self._running: _Job | None = None
        # Jobs queued, running, or finished but not yet handed back: main thread only. Draining
        # waits for this to reach 0 (queue and _running alone miss a job between the two).
        self._outstanding = 0
        self._stopping = False
        self._parent_pid = parent_pid
        self.stats: dict[str, Any] = {
            "requests": {}, "errors": {}, "safe": 0, "blocked": 0, "timed_out": 0,
            "unroutable_replies": 0, "check_seconds": 0.0, "checks": 0,
        }
        self._ctx = zmq.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        # Without this a ROUTER silently drops replies to peers it cannot route to.
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._router.setsockopt(zmq.MAXMSGSIZE, limits.max_message_bytes)
        self._router.setsockopt(zmq.LINGER, _LINGER_MS)
        self._auth = None
        if curve_dir is not None:  # before bind: the socket must be a CURVE server from the first peer on
            from .security import configure_curve_server

            self._auth = configure_curve_server(self._ctx, self._router, curve_dir)
        self._wake_addr = f"inproc://safety-worker-done-{self.instance_id}"
        self._wake_rx = self._ctx.socket(zmq.PULL)
        self._wake_rx.bind(self._wake_addr)
        self._router.bind(endpoint)
        self._grad_enabled = _grad_enabled()

    # -- lifecycle

    def request_stop(self, *_):
        """Stop accepting work; finish queued and running checks, then return from serve()."""
        self._stopping = True

    def serve(self) -> None:
        thread = threading.Thread(target=self._checker_loop, name="checker", daemon=True)
        thread.start()
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._wake_rx, zmq.POLLIN)
        try:
            while True:
                events = dict(poller.poll(_POLL_MS))
                if self._wake_rx in events:
                    while self._wake_rx.poll(0):
                        self._wake_rx.recv()
                self._send_done()
                if self._router in events:
                    for _ in range(256):  # bounded so finished checks are not starved
                        try:
                            frames = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._on_message(frames)
                self._expire_running()
                if self._parent_pid is not None and os.getppid() != self._parent_pid:
                    # Our parent died (even by SIGKILL) and we were re-parented: do not linger as an orphan.
                    logger.warning("parent process %d is gone; stopping", self._parent_pid)
                    self._parent_pid = None
                    self.request_stop()
                if self._stopping and (self._outstanding == 0 or self._only_abandoned_job_left()):
                    break
        finally:
            try:
                self._jobs.put_nowait(None)  # stops the checker thread once it is idle
            except queue.Full:
                pass  # leaving after an error with a full queue: the daemon thread dies with us
            thread.join(timeout=1.0)
            self._wake_rx.close(linger=0)
            self._router.close(linger=_LINGER_MS)
            if self._auth is not None:
                self._auth.stop()
            self._ctx.term()
            release_ipc_endpoint(self.endpoint, self._lock_file)
            logger.info("safety worker stopped")

    # -- main thread

    def _on_message(self, frames: list) -> None:
        # DEALER peers send [identity, tag, header, ...]; REQ peers add an empty delimiter frame.
        split = 2 if len(frames) >= 2 and len(frames[1]) == 0 else 1
        envelope, body = frames[:split], frames[split:]
        try:
            req = P.decode_request(body, self.limits)
        except ProtocolError as e:
            self._count("errors", e.code)
            self._send(envelope, P.error_reply(e.request_id, e.code, e.message))
            return
        self._count("requests", req.op)
        if self._stopping:
            self._error(envelope, req, P.SHUTTING_DOWN, "the worker is shutting down; use another worker")
        elif req.op in P.CHECK_OPS:
            try:
                self._jobs.put_nowait(_Job(envelope, req, time.monotonic()))
                self._outstanding += 1
            except queue.Full:
                self._error(envelope, req, P.BUSY, f"{self.limits.queue_size} checks are queued; retry later")
        else:
            try:
                self._send(envelope, self._answer_now(req))
            except Exception as e:  # a bug must not kill the worker
                logger.exception("op %s failed", req.op)
                self._error(envelope, req, P.INTERNAL, f"{type(e).__name__}: {e}")

    def _answer_now(self, req: Request) -> Reply:
        if req.op == "hello":
            return Reply(req.id, P.STATUS_OK, result=self.hello())
        if req.op == "ping":
            return Reply(req.id, P.STATUS_OK, result={"instance_id": self.instance_id, "time": time.time()})
        if req.op == "stats":
            return Reply(req.id, P.STATUS_OK, result=self.snapshot_stats())
        if req.op == "echo":  # transport only: the received buffers go straight back
            return Reply(req.id, P.STATUS_OK, result={}, arrays=req.arrays)
        if req.op == "shutdown":
            if not self._owner_token:
                return P.error_reply(req.id, P.FORBIDDEN, "this worker has no owner token; stop it with SIGTERM")
            if not hmac.compare_digest(req.args["token"].encode(), self._owner_token.encode()):
                return P.error_reply(req.id, P.FORBIDDEN, "only the worker's owner may shut it down")
            self.request_stop()
            return Reply(req.id, P.STATUS_OK, result={"stopping": True})
        raise AssertionError(f"op {req.op} is not a main-thread op")

    def hello(self) -> dict[str, Any]:
        import importlib.metadata as md

        versions = {"python": sys.version.split()[0], "worker": WORKER_VERSION}
        for dist in ("torch", "transformers", "cosmos-guardrail", "numpy", "pyzmq", "msgpack"):
            try:
                versions[dist] = md.version(dist)
            except md.PackageNotFoundError:
                versions[dist] = None
        return {
            "protocol": [P.PROTOCOL_MAJOR, P.PROTOCOL_MINOR],
            "versions": versions,
            "instance_id": self.instance_id,
            "pid": os.getpid(),
            "endpoint": self.endpoint,
            "device": self.device,
            "models": self.models,
            "policy": {"controversial": self.guard.controversial, "fail_closed": True},
            "limits": {**self.limits.to_dict(), "check_timeout_s": self.check_timeout},
            "grad_enabled": self._grad_enabled,
            "modules_loaded": {m: m in sys.modules for m in ("cosmos_guardrail", "retinaface")},
            "ops": sorted(P.OPS),
        }

    def snapshot_stats(self) -> dict[str, Any]:
        s = dict(self.stats, requests=dict(self.stats["requests"]), errors=dict(self.stats["errors"]))
        s.update(queued=self._jobs.qsize(), running=self._running is not None,
                 uptime_s=time.time() - self.started_at, instance_id=self.instance_id)
        return s

    def _expire_running(self) -> None:
        job = self._running
        if job is None or job.started is None or time.monotonic() - job.started <= self.check_timeout:
            return
        if job.claim():
            self.stats["timed_out"] += 1
            logger.error("check id=%s overran %.1fs; answered blocked (fail closed)", job.request.id, self.check_timeout)
            self._send(job.envelope, self._blocked_reply(job.request, f"checker timed out after {self.check_timeout:g}s, blocked (fail closed)"))

    def _send_done(self) -> None:
        while True:
            try:
                job, reply = self._done.get_nowait()
            except queue.Empty:
                return
            self._outstanding -= 1
            if reply is not None:  # None: already answered (timed out while running)
                self._send(job.envelope, reply)

    def _only_abandoned_job_left(self) -> bool:
        """A hung check that was already answered blocked must not keep a draining worker alive."""
        job = self._running
        return self._outstanding == 1 and self._jobs.empty() and job is not None and job._answered

    def _error(self, envelope, req: Request, code: str, message: str) -> None:
        self._count("errors", code)
        self._send(envelope, P.error_reply(req.id, code, message))

    def _send(self, envelope: list, reply: Reply) -> None:
        try:
            # NOBLOCK: a client that stopped reading must not stall every other client.
            self._router.send_multipart(envelope + P.encode_reply(reply), flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as e:  # EHOSTUNREACH (peer gone) or EAGAIN (peer's queue full)
            self.stats["unroutable_replies"] += 1
            logger.warning("reply id=%s not delivered: %s", reply.id, e)

    def _count(self, key: str, name: str) -> None:
        self.stats[key][name] = self.stats[key].get(name, 0) + 1

    # -- checker thread

    def _checker_loop(self) -> None:
        import torch

        torch.set_grad_enabled(False)  # grad mode is per thread; this thread only runs inference
        wake = self._ctx.socket(zmq.PUSH)
        wake.connect(self._wake_addr)
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                # Every job comes back through _done (reply None if it was answered already).
                self._done.put((job, self._run_job(job)))
                wake.send(b"")
        finally:
            wake.close(linger=0)

    def _run_job(self, job: _Job) -> Reply | None:
        req = job.request
        if req.timeout_ms is not None and (time.monotonic() - job.received) * 1000 > req.timeout_ms:
            if not job.claim():
                return None
            self._count("errors", P.DEADLINE_EXCEEDED)
            return P.error_reply(req.id, P.DEADLINE_EXCEEDED, f"not started within timeout_ms={req.timeout_ms}; skipped")
        job.started = time.monotonic()
        self._running = job
        try:
            reply = self._check(req)
        except Exception as e:  # GuardedChecker catches checker errors; this is a bug in our code
            logger.exception("check id=%s failed", req.id)
            reply = self._blocked_reply(req, f"worker error, blocked (fail closed): {type(e).__name__}: {e}", stage="error")
        finally:
            self._running = None
        self.stats["checks"] += 1
        self.stats["check_seconds"] += time.monotonic() - job.started
        return reply if job.claim() else None

    def _check(self, req: Request) -> Reply:
        if req.op == "check_text":
            verdicts = [self.guard.check_text(t) for t in req.args["texts"]]
            for safe, _ in verdicts:
                self._tally(safe)
            return Reply(req.id, P.STATUS_OK, result={"verdicts": [{"safe": s, "reason": r} for s, r in verdicts]})
        text = req.args.get("text") if req.op == "check_sample" else None
        if text is not None:
            safe, reason = self.guard.check_text(text)
            if not safe or not req.arrays:
                self._tally(safe)
                return Reply(req.id, P.STATUS_OK, result={"safe": safe, "reason": reason, "stage": None if safe else "text"})
        safe, reason, frames = self.guard.check_video(req.arrays[0])
        self._tally(safe)
        return Reply(req.id, P.STATUS_OK, result={"safe": safe, "reason": reason, "stage": None if safe else "video"},
                     arrays=[frames] if safe else [])

    def _tally(self, safe: bool) -> None:
        self.stats["safe" if safe else "blocked"] += 1

    @staticmethod
    def _blocked_reply(req: Request, reason: str, stage: str = "timeout") -> Reply:
        if req.op == "check_text":
            return Reply(req.id, P.STATUS_OK, result={"verdicts": [{"safe": False, "reason": reason} for _ in req.args["texts"]]})
        return Reply(req.id, P.STATUS_OK, result={"safe": False, "reason": reason, "stage": stage})


def _grad_enabled() -> bool:
    if "torch" not in sys.modules:
        return True
    return bool(sys.modules["torch"].is_grad_enabled())


def install_signal_handlers(worker: SafetyWorker) -> None:
    signal.signal(signal.SIGTERM, worker.request_stop)
    signal.signal(signal.SIGINT, worker.request_stop)
