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
import hmac
import logging
import os
import queue
import re
import signal
import sys
import threading
import time
import uuid
from typing import Any, Callable, Sequence

import numpy as np
import zmq

from . import protocol as P
from .endpoint import LINGER_MS, WorkerStartError, bind_router, claim_endpoint, release_endpoint
from .metrics import WorkerMetrics
from .protocol import Limits, ProtocolError, Reply, Request, Verdict

logger = logging.getLogger("safety_worker")

WORKER_VERSION = "0.1.0"
_QWEN_LABEL = re.compile(r"Safety: (Safe|Unsafe|Controversial)")
_POLL_MS = 100  # how often the main loop looks at signals, drains and checker timeouts


# ---------------------------------------------------------------- fail-closed checker

class GuardedChecker:
    """`cosmos_guardrail.CosmosSafetyChecker` with verdicts that fail closed, one input or a batch.

    cosmos_guardrail returns *safe* when Qwen3Guard raises or answers without a label, counts
    "Controversial" as safe, and modifies the caller's frames. Here: the blocklist runs as is; the
    Qwen3Guard step runs the same chat template, tokenizer and greedy generation as
    `Qwen3Guard.extract_label_and_categories` but a missing label is *blocked* and "Controversial"
    follows `controversial` ("block" by default); any exception anywhere is *blocked*; video is
    checked with the checker's video runner on a private copy and the result must be uint8 of the
    input shape, else *blocked*.

    `check_texts`/`check_videos` are the batched forms the worker uses to check several requests at
    once: texts through the blocklist, then one left-padded Qwen3Guard `generate`; frames of clips
    that share a size through the face filter together (`frame_batch` frames per forward pass).
    They give the same verdicts, reasons and frames as the one-input forms, and raise when the
    batch itself fails (the worker then retries each request alone, so each still fails closed on
    its own).
    """

    def __init__(self, checker, controversial: str = "block", frame_batch: int = 1, pass_pixels: int | None = None):
        """`frame_batch`: frames per face-filter forward pass (1: cosmos_guardrail's own); `pass_pixels`:
        if set, fewer frames per pass for large frames (at most this many pixels per pass, at least one
        frame)."""
        if controversial not in ("block", "allow"):
            raise ValueError("controversial must be 'block' or 'allow'")
        self.checker = checker
        self.controversial = controversial
        self.frame_batch = frame_batch
        self.pass_pixels = pass_pixels
        self._set_frame_batch(frame_batch)

    def _set_frame_batch(self, n: int) -> None:
        # RetinaFaceFilter runs batch_size frames per forward pass (1 in cosmos_guardrail).
        if self.frame_batch <= 1:
            return
        for post in getattr(getattr(self.checker, "video_guardrail", None), "postprocessors", None) or ():
            if hasattr(post, "batch_size"):
                post.batch_size = n

    # -- text

    def check_text(self, text: str) -> Verdict:
        try:
            return self.check_texts([text])[0]
        except Exception as e:  # fail closed, whatever broke
            return Verdict.blocked(_text_error(e), "text", fault=True)

    def check_texts(self, texts: Sequence[str]) -> list[Verdict]:
        """`check_text` of each text, with Qwen3Guard run once over all texts the blocklist passed.

        The guards run in the checker's order; a text blocked by one is not shown to the next. Raises
        if Qwen3Guard's batch fails (one text: `check_text` turns that into a blocked verdict)."""
        verdicts: list[Verdict | None] = [None] * len(texts)
        pending = list(range(len(texts)))
        for guard in self.checker.text_guardrail.safety_models:
            name = type(guard).__name__.upper()
            if not pending:
                break
            if name == "QWEN3GUARD":
                answers = self._qwen3guard(guard, [texts[i] for i in pending])
            else:
                answers = []
                for i in pending:
                    try:
                        safe, message = guard.is_safe(texts[i])
                        answers.append((safe, message, False))
                    except Exception as e:  # this text alone fails closed
                        verdicts[i] = Verdict.blocked(_text_error(e), "text", fault=True)
                        answers.append(None)
            still = []
            for i, answer in zip(pending, answers):
                if answer is None:
                    continue
                safe, message, fault = answer
                if safe:
                    still.append(i)
                else:
                    verdicts[i] = Verdict.blocked(f"{name}: {message}", "text", fault=fault)
            pending = still
        for i in pending:
            verdicts[i] = Verdict.passed()
        return verdicts

    def _qwen3guard(self, guard, prompts: Sequence[str]) -> list[tuple[bool, str, bool]]:
        """(safe, message, fault) per prompt, from one `generate` over all of them."""
        return [self._parse_qwen_answer(content) for content in qwen3guard_answers(guard, prompts)]

    def _parse_qwen_answer(self, content: str) -> tuple[bool, str, bool]:
        from cosmos_guardrail.cosmos_utils import UNSAFE_CATEGORIES

        match = _QWEN_LABEL.search(content)
        if match is None:
            return False, "answer has no 'Safety:' label, blocked (fail closed)", True
        label = match.group(1)
        categories = re.findall("(" + "|".join(map(re.escape, UNSAFE_CATEGORIES.values())) + ")", content)
        if label == "Safe" or (label == "Controversial" and self.controversial == "allow"):
            return True, "", False
        return False, f"Safety: {label}, Categories: {categories}", False

    # -- frames

    def check_video(self, frames: np.ndarray) -> Verdict:
        try:
            # The checker pixelates in place: give it a private, writable, contiguous copy.
            out = self.checker.check_video_safety(np.array(frames, dtype=np.uint8, order="C", copy=True))
        except Exception as e:
            return Verdict.blocked(_video_error(e), "video", fault=True)
        return _video_verdict(frames.shape, out)

    def check_videos(self, clips: Sequence[np.ndarray]) -> list[Verdict]:
        """`check_video` of each clip; clips of the same frame size go through the face filter together.

        Uses the checker's own video runner: its safety models per clip (none in cosmos_guardrail
        0.3.2), then its postprocessors (RetinaFaceFilter: each frame on its own, in forward passes of
        `frame_batch` frames) over the stacked frames, split back per clip. Raises if the face filter
        fails on the batch."""
        runner = self.checker.video_guardrail
        verdicts: list[Verdict | None] = [None] * len(clips)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, clip in enumerate(clips):
            try:
                safe, _ = runner.run_safety_check(clip)
            except Exception as e:
                verdicts[i] = Verdict.blocked(_video_error(e), "video", fault=True)
                continue
            if not safe:
                verdicts[i] = Verdict.blocked(_VIDEO_BLOCKED, "video")
            else:
                groups.setdefault(tuple(clip.shape[1:3]), []).append(i)
        for (h, w), members in groups.items():
            if self.pass_pixels is not None:
                self._set_frame_batch(max(1, min(self.frame_batch, self.pass_pixels // (h * w))))
            stacked = np.concatenate([np.asarray(clips[i], dtype=np.uint8) for i in members])  # a private copy
            out = runner.postprocess(stacked)
            if not isinstance(out, np.ndarray) or out.shape != stacked.shape:
                raise ValueError(f"face filter returned {getattr(out, 'shape', type(out).__name__)} for a batch of "
                                 f"{list(stacked.shape)}")  # per clip, check_video gives the exact reason
            start = 0
            for i in members:
                n = len(clips[i])
                verdicts[i] = _video_verdict(clips[i].shape, out[start:start + n])
                start += n
        return verdicts


def qwen3guard_answers(guard, prompts: Sequence[str]) -> list[str]:
    """Qwen3Guard's decoded answer for each prompt, from one greedy `generate` (left-padded when several)."""
    return [guard.tokenizer.decode(row, skip_special_tokens=True) for row in qwen3guard_generate(guard, prompts)]


def qwen3guard_generate(guard, prompts: Sequence[str]) -> list[list[int]]:
    """The answer tokens Qwen3Guard generates for each prompt, as if each were generated alone.

    One prompt is exactly cosmos_guardrail's call (`Qwen3Guard.extract_label_and_categories`)."""
    tokenizer, model = guard.tokenizer, guard.model
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False) for p in prompts]
    if len(texts) == 1:  # exactly cosmos_guardrail's call: no padding, no attention mask games
        inputs = tokenizer(texts, return_tensors="pt").to(model.device)
        generated = model.generate(**inputs, max_new_tokens=_QWEN_MAX_NEW_TOKENS)
        rows = [generated[0][inputs.input_ids.shape[1]:].tolist()]
    else:
        # Left padding keeps every prompt's last token at the same column, so generation starts
        # together; generate derives position ids from the attention mask (cumsum), so a padded
        # prompt sees the same positions and attends to the same tokens as alone.
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        inputs = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left").to(model.device)
        extra = {"pad_token_id": pad} if model.generation_config.pad_token_id is None else {}
        generated = model.generate(**inputs, max_new_tokens=_QWEN_MAX_NEW_TOKENS, **extra)
        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        rows = []
        for row in generated[:, inputs.input_ids.shape[1]:].tolist():
            # Alone, generation stops after the first end-of-sequence token; in a batch the
            # finished row is padded until the others finish: cut it where it would have stopped.
            end = next((k + 1 for k, t in enumerate(row) if t in eos), len(row))
            rows.append(row[:end])
    return rows


# On a CPU RetinaFace gains from batching small frames only: 32x32 frames ~5x at 16 per pass, 240x320
# none (compute-bound), and 8 per pass measured slower under load. 2**17 pixels: 32 frames of 64x64,
# one of 240x320. A GPU gets whole batches.
_CPU_PASS_PIXELS = 2**17
_QWEN_MAX_NEW_TOKENS = 128  # as cosmos_guardrail's Qwen3Guard
_VIDEO_BLOCKED = "video guardrail blocked the frames"


def _text_error(e: Exception) -> str:
    return f"text guard error, blocked (fail closed): {type(e).__name__}: {e}"


def _video_error(e: Exception) -> str:
    return f"video guard error, blocked (fail closed): {type(e).__name__}: {e}"


def _video_verdict(shape, out) -> Verdict:
    """The checker's output for frames of `shape` as a verdict: uint8 of the same shape, else blocked."""
    if out is None:
        return Verdict.blocked(_VIDEO_BLOCKED, "video")
    if not isinstance(out, np.ndarray) or out.dtype != np.uint8 or out.shape != tuple(shape):
        got = f"{getattr(out, 'dtype', type(out).__name__)} {list(getattr(out, 'shape', []))}"
        return Verdict.blocked(f"video guard returned {got} for uint8 {list(shape)}, blocked (fail closed)", "video", fault=True)
    return Verdict.passed(out)


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


def check_request(guard: GuardedChecker, req: Request) -> Reply:
    """The reply to one check request alone (text first; a blocked text skips the video)."""
    if req.op == "check_text":
        return _texts_reply(req, [guard.check_text(t) for t in req.args["texts"]])
    text = req.args.get("text") if req.op == "check_sample" else None
    if text is not None:
        verdict = guard.check_text(text)
        if not verdict.safe or not req.arrays:
            return _verdict_reply(req, verdict)
    return _verdict_reply(req, guard.check_video(req.arrays[0]))


def check_requests(guard: GuardedChecker, reqs: Sequence[Request]) -> list[Reply]:
    """Several requests at once: all their texts in one `check_texts`, then the frames of those still
    safe in one `check_videos`. Same replies as `check_request` of each; raises if the batch itself
    fails (the caller then checks each alone). The worker's checker thread and `curate`'s actors both
    check through this, so their verdicts and frames are the same."""
    texts, owners = [], []
    for j, req in enumerate(reqs):
        mine = req.args["texts"] if req.op == "check_text" else [req.args["text"]] if req.op == "check_sample" else []
        texts += mine
        owners += [j] * len(mine)
    per_job: list[list] = [[] for _ in reqs]
    for j, verdict in zip(owners, guard.check_texts(texts) if texts else []):
        per_job[j].append(verdict)
    replies: list[Reply | None] = [None] * len(reqs)
    video = []
    for j, req in enumerate(reqs):
        if req.op == "check_text":
            replies[j] = _texts_reply(req, per_job[j])
        elif req.op == "check_sample" and (not per_job[j][0].safe or not req.arrays):
            replies[j] = _verdict_reply(req, per_job[j][0])
        else:
            video.append(j)
    for j, verdict in zip(video, guard.check_videos([reqs[j].arrays[0] for j in video]) if video else []):
        replies[j] = _verdict_reply(reqs[j], verdict)
    return replies


def checker_versions() -> dict[str, Any]:
    """The versions `hello` reports (part of the checker identity that keys stored verdicts)."""
    import importlib.metadata as md

    versions = {"python": sys.version.split()[0], "worker": WORKER_VERSION}
    for dist in ("torch", "transformers", "cosmos-guardrail", "numpy", "pyzmq", "msgpack"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    return versions


def checker_description(models: dict[str, Any], controversial: str) -> dict[str, Any]:
    """What `hello` says about the checker itself (models, policy, versions, protocol): enough for
    `proxy.checker_identity`, so a checker loaded outside a worker (a `curate` actor) has the same
    identity as a worker serving the same models and policy."""
    return {"protocol": [P.PROTOCOL_MAJOR, P.PROTOCOL_MINOR], "versions": checker_versions(), "models": models,
            "policy": {"controversial": controversial, "fail_closed": True}}


# ---------------------------------------------------------------- the server

@dataclasses.dataclass(frozen=True)
class Batching:
    """How the checker groups queued checks (`serve --max-batch/--max-batch-frames/--batch-wait-ms`).

    A batch takes queued checks until it holds `max_batch` texts-or-samples (each text of a
    check_text counts one, a check_video or check_sample one) or `max_batch_frames` frames; if it
    has fewer requests than were queued when it began plus those the previous batch answered (their
    clients are about to send again), it waits at most `wait_ms` after its first check for more to
    arrive (`BatchGatherer`). A check that would overflow it starts the next batch (a single check bigger
    than the limits still runs, alone). `max_batch=1`
    checks one request at a time with the face filter's own batch size, as before batching.
    `max_batch_frames` is also the face filter's forward-pass batch size (on a CPU, at most
    `_CPU_PASS_PIXELS` pixels per pass).
    Defaults: measured on CPU (docs/safety_worker.md).
    """

    max_batch: int = 32
    max_batch_frames: int = 64
    wait_ms: float = 5.0

    def __post_init__(self):
        if self.max_batch < 1 or self.max_batch_frames < 1 or self.wait_ms < 0:
            raise ValueError("max_batch and max_batch_frames must be >= 1 and wait_ms >= 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def split(self, reqs: Sequence[Request]) -> list[list[Request]]:
        """`reqs` (all at hand, none to wait for) cut into batches by the same limits as the queue's
        (`BatchGatherer`): a request that would overflow a batch starts the next one."""
        batches: list[list[Request]] = []
        units = frames = 0
        for req in reqs:
            u, f = _units(req), _frame_count(req)
            if not batches or self.max_batch == 1 or units + u > self.max_batch or frames + f > self.max_batch_frames:
                batches.append([])
                units = frames = 0
            batches[-1].append(req)
            units, frames = units + u, frames + f
        return batches


def _units(req: Request) -> int:
    return len(req.args["texts"]) if req.op == "check_text" else 1


def _frame_count(req: Request) -> int:
    return sum(a.shape[0] for a in req.arrays)


_STOP = object()  # the checker thread's stop signal, carried over when a batch runs into it


class BatchGatherer:
    """Forms the checker's batches from the job queue, by the rules of `Batching`.

    `next_batch` takes what is queued and waits (at most `wait_ms` after the batch's first job) for
    more while the batch holds fewer requests than were queued when it began plus those the previous
    batch answered: clients that wait for their verdicts send again as soon as they get them. With k
    clients that each keep one request in flight, a batch starts as soon as all k have sent again,
    and a lone client never waits at all. Counting only the previous batch is not enough: requests
    can split into two groups that take turns, each batch holding the requests that queued while the
    other group's batch ran (8 clients were seen locked into batches of 4 at 98 req/s, against ~135
    in batches of 8, docs/safety_worker.md; one client keeping 4 in flight into batches of 2); the
    queued group then waits for the answered one and the two merge. A client that went quiet costs
    one wait, in the batch after its last one."""

    def __init__(self, jobs: queue.Queue, batching: Batching):
        self._jobs = jobs
        self.batching = batching
        self._carry = None  # a job (or _STOP) taken from the queue that did not fit the last batch
        self._answered = 0  # requests in the previous batch

    def next_batch(self) -> list | None:
        """The next queued jobs to check together; None when the queue yields None (stop)."""
        expected = self._jobs.qsize() + (self._carry is not None) + self._answered
        first, self._carry = (self._carry or self._jobs.get()), None
        if first is None or first is _STOP:
            return None
        batch, units, frames = [first], _units(first.request), _frame_count(first.request)
        limits = self.batching
        wait_until = time.monotonic() + limits.wait_ms / 1000
        while limits.max_batch > 1 and units < limits.max_batch and frames < limits.max_batch_frames:
            left = wait_until - time.monotonic() if len(batch) < expected else 0
            try:
                job = self._jobs.get(timeout=left) if left > 0 else self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._carry = _STOP  # finish this batch, then stop
                break
            u, f = _units(job.request), _frame_count(job.request)
            if units + u > limits.max_batch or frames + f > limits.max_batch_frames:
                self._carry = job  # it starts the next batch
                break
            batch.append(job)
            units, frames = units + u, frames + f
        self._answered = len(batch)
        return batch


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
        batching: Batching = Batching(),
        metrics_port: int | None = None,
    ):
        self.endpoint = endpoint
        # Claim the endpoint before the slow checker load, so a bad or taken one fails fast.
        self._lock_file = claim_endpoint(endpoint, curve_dir, insecure)
        checker = load_checker()
        self.batching = batching
        self.guard = GuardedChecker(checker, controversial=controversial,
                                    frame_batch=batching.max_batch_frames if batching.max_batch > 1 else 1,
                                    pass_pixels=_CPU_PASS_PIXELS if device == "cpu" else None)
        self.models = models
        self.limits = limits
        self.check_timeout = check_timeout
        self._owner_token = owner_token
        self.device = device
        self.instance_id = uuid.uuid4().hex
        self.started_at = time.time()
        self._jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=limits.queue_size)
        self._done: queue.SimpleQueue[tuple[_Job, Reply]] = queue.SimpleQueue()
        self._running: list[_Job] = []  # the checker's current batch (replaced, never mutated)
        self._gatherer = BatchGatherer(self._jobs, batching)
        # Jobs queued, running, or finished but not yet handed back: main thread only. Draining
        # waits for this to reach 0 (queue and _running alone miss a job between the two).
        self._outstanding = 0
        self._stopping = False
        self._parent_pid = parent_pid
        self.metrics = WorkerMetrics()
        self._ctx = zmq.Context()
        self._wake_addr = f"inproc://safety-worker-done-{self.instance_id}"
        self._wake_rx = self._ctx.socket(zmq.PULL)
        self._wake_rx.bind(self._wake_addr)
        self._router, self._auth = bind_router(self._ctx, endpoint, limits.max_message_bytes, curve_dir)
        self._grad_enabled = _grad_enabled()
        self._metrics_server, self.metrics_url = None, None
        if metrics_port is not None:
            from .metrics import serve_metrics

            try:
                self._metrics_server, self.metrics_url = serve_metrics(metrics_port, lambda: [({}, self.snapshot_stats())])
            except OSError as e:
                raise WorkerStartError(f"--metrics-port {metrics_port}: {e}; pick a free port (0: any)") from None

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
            self._router.close(linger=LINGER_MS)
            if self._auth is not None:
                self._auth.stop()
            self._ctx.term()
            if self._metrics_server is not None:
                self._metrics_server.shutdown()
            release_endpoint(self.endpoint, self._lock_file)
            logger.info("safety worker stopped")

    # -- main thread

    def _on_message(self, frames: list) -> None:
        # DEALER peers send [identity, tag, header, ...]; REQ peers add an empty delimiter frame.
        split = 2 if len(frames) >= 2 and len(frames[1]) == 0 else 1
        envelope, body = frames[:split], frames[split:]
        try:
            req = P.decode_request(body, self.limits)
        except ProtocolError as e:
            self._send(envelope, P.error_reply(e.request_id, e.code, e.message))
            return
        self.metrics.request(req.op)
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
                self._send(envelope, self._answer_now(req), req.op)
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
            if not hmac.compare_digest(req.args.get("token", "").encode(), self._owner_token.encode()):
                return P.error_reply(req.id, P.FORBIDDEN, "only the worker's owner may shut it down")
            self.request_stop()
            return Reply(req.id, P.STATUS_OK, result={"stopping": True})
        raise AssertionError(f"op {req.op} is not a main-thread op")

    def hello(self) -> dict[str, Any]:
        described = checker_description(self.models, self.guard.controversial)
        return {
            "protocol": described["protocol"],
            "versions": described["versions"],
            "instance_id": self.instance_id,
            "pid": os.getpid(),
            "endpoint": self.endpoint,
            "device": self.device,
            "models": described["models"],
            "policy": described["policy"],
            "limits": {**self.limits.to_dict(), "check_timeout_s": self.check_timeout},
            "batching": self.batching.to_dict(),
            "metrics_url": self.metrics_url,
            "grad_enabled": self._grad_enabled,
            "modules_loaded": {m: m in sys.modules for m in ("cosmos_guardrail", "retinaface")},
            "ops": sorted(P.OPS),
        }

    def snapshot_stats(self) -> dict[str, Any]:
        s = self.metrics.snapshot()
        running = self._running
        s["batching"].update(self.batching.to_dict())
        s.update(queued=self._jobs.qsize(), running=bool(running), running_checks=len(running),
                 uptime_s=time.time() - self.started_at, instance_id=self.instance_id)
        return s

    def _expire_running(self) -> None:
        """Answer blocked each running check that overran `check_timeout` (its own clock, batched or not)."""
        now = time.monotonic()
        for job in self._running:
            if job.started is None or now - job.started <= self.check_timeout:
                continue
            if job.claim():
                logger.error("check id=%s overran %.1fs; answered blocked (fail closed)", job.request.id, self.check_timeout)
                reply = self._blocked_reply(job.request, f"checker timed out after {self.check_timeout:g}s, blocked (fail closed)")
                self._record_verdicts(job, reply, timed_out=True)
                self._send(job.envelope, reply, job.request.op)

    def _send_done(self) -> None:
        while True:
            try:
                job, reply = self._done.get_nowait()
            except queue.Empty:
                return
            self._outstanding -= 1
            if reply is not None:  # None: already answered (timed out while running)
                self._send(job.envelope, reply, job.request.op)

    def _only_abandoned_job_left(self) -> bool:
        """Hung checks that were already answered blocked must not keep a draining worker alive."""
        running = self._running
        return (bool(running) and self._outstanding == len(running) and self._jobs.empty()
                and all(job._answered for job in running))

    def _error(self, envelope, req: Request, code: str, message: str) -> None:
        self._send(envelope, P.error_reply(req.id, code, message), req.op)

    def _send(self, envelope: list, reply: Reply, op: str | None = None) -> None:
        """Send one reply and count it (`op` None: the request could not be read)."""
        self.metrics.replied(op, None if reply.status == P.STATUS_OK else reply.error["code"])
        try:
            # NOBLOCK: a client that stopped reading must not stall every other client.
            self._router.send_multipart(envelope + P.encode_reply(reply), flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as e:  # EHOSTUNREACH (peer gone) or EAGAIN (peer's queue full)
            self.metrics.unroutable()
            logger.warning("reply id=%s not delivered: %s", reply.id, e)

    # -- checker thread

    def _checker_loop(self) -> None:
        import torch

        torch.set_grad_enabled(False)  # grad mode is per thread; this thread only runs inference
        wake = self._ctx.socket(zmq.PUSH)
        wake.connect(self._wake_addr)
        try:
            while True:
                jobs = self._gatherer.next_batch()
                if jobs is None:
                    return
                # Every job comes back through _done (reply None if it was answered already).
                for job, reply in zip(jobs, self._run_batch(jobs)):
                    self._done.put((job, reply))
                wake.send(b"")
        finally:
            wake.close(linger=0)

    def _run_batch(self, jobs: list[_Job]) -> list[Reply | None]:
        """Replies for `jobs` (None for a job answered already): skip expired ones, check the rest
        together, and if that raises, check each alone so each verdict fails closed on its own."""
        replies: list[Reply | None] = [None] * len(jobs)
        live = []
        now = time.monotonic()
        for k, job in enumerate(jobs):
            req = job.request
            if req.timeout_ms is not None and (now - job.received) * 1000 > req.timeout_ms:
                if job.claim():
                    replies[k] = P.error_reply(req.id, P.DEADLINE_EXCEEDED, f"not started within timeout_ms={req.timeout_ms}; skipped")
            else:
                job.started = now
                live.append(k)
        if not live:
            return replies
        self._running = [jobs[k] for k in live]
        computed: list[Reply] | None = None
        try:
            if self.batching.max_batch > 1:
                try:
                    computed = self._check_batch([jobs[k].request for k in live])
                except Exception:
                    logger.exception("a batch of %d checks failed; checking each alone", len(live))
                    self.metrics.retried(len(live))
            if computed is None:
                computed = []
                for k in live:
                    jobs[k].started = time.monotonic()  # each retried check gets its own check_timeout
                    computed.append(self._check_alone(jobs[k].request))
        finally:
            self._running = []
            reqs = [jobs[k].request for k in live]
            self.metrics.batch(len(live), sum(map(_units, reqs)), sum(map(_frame_count, reqs)), time.monotonic() - now)
        for k, reply in zip(live, computed):
            if jobs[k].claim():  # else it was answered blocked at its timeout: the late verdict is dropped
                self._record_verdicts(jobs[k], reply)
                replies[k] = reply
        return replies

    def _check_alone(self, req: Request) -> Reply:
        try:
            return self._check(req)
        except Exception as e:  # GuardedChecker catches checker errors; this is a bug in our code
            logger.exception("check id=%s failed", req.id)
            return self._blocked_reply(req, f"worker error, blocked (fail closed): {type(e).__name__}: {e}", stage="error")

    def _check(self, req: Request) -> Reply:
        """One request alone (`--max-batch 1`, and the retry of a failed batch)."""
        return check_request(self.guard, req)

    def _check_batch(self, reqs: list[Request]) -> list[Reply]:
        return check_requests(self.guard, reqs)

    def _record_verdicts(self, job: _Job, reply: Reply, timed_out: bool = False) -> None:
        latency = time.monotonic() - job.received
        if reply.status != P.STATUS_OK:
            return
        for v in reply.result.get("verdicts", [reply.result]):
            self.metrics.verdict(v["stage"], latency, timed_out)
            latency = None  # one latency per request

    @staticmethod
    def _blocked_reply(req: Request, reason: str, stage: str = "timeout") -> Reply:
        """A fault verdict for the whole request (timeout, worker error)."""
        verdict = Verdict.blocked(reason, stage, fault=True)
        if req.op == "check_text":
            return _texts_reply(req, [verdict] * len(req.args["texts"]))
        return _verdict_reply(req, verdict)


def _texts_reply(req: Request, verdicts: Sequence[Verdict]) -> Reply:
    return Reply(req.id, P.STATUS_OK, result={"verdicts": [v.to_wire() for v in verdicts]})


def _verdict_reply(req: Request, verdict: Verdict) -> Reply:
    return Reply(req.id, P.STATUS_OK, result=verdict.to_wire(),
                 arrays=[verdict.frames] if verdict.safe and verdict.frames is not None else [])


def _grad_enabled() -> bool:
    if "torch" not in sys.modules:
        return True
    return bool(sys.modules["torch"].is_grad_enabled())


def install_signal_handlers(worker: SafetyWorker) -> None:
    signal.signal(signal.SIGTERM, worker.request_stop)
    signal.signal(signal.SIGINT, worker.request_stop)
