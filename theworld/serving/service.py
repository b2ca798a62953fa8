"""ChatService: one request from validated input to checked answer; the API and the demo both call it.

    check the prompt and every frame (one worker round trip)  -> blocked: 400 content_blocked, nothing generated
    the model answers on the worker's sanitised frames (BatchingEngine: batched with whatever else arrived)
    check the answer                                          -> blocked: finish_reason "content_filter", empty
    rollout (if asked): decode, check every frame, mp4        -> blocked: no video, `rollout_blocked` says why

Every stage shares the request's deadline (`request_timeout`); past it the request fails with 503, and
nothing that was not checked is ever returned.
"""
from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from theworld.serving.engine import BatchingEngine, Generation, Job
from theworld.serving.guard import Guard
from theworld.serving.schema import ApiError, ChatRequest

# The body's `stage` for a blocked request: what the user sent that was blocked. A verdict that failed
# closed (the guard itself failed) keeps the worker's stage ("timeout", "error").
_REQUEST_STAGES = {"text": "prompt", "video": "frames"}


@dataclass
class Completion:
    """A checked answer. `content` is "" when the answer was blocked (`finish_reason` "content_filter")."""

    id: str
    content: str
    finish_reason: str  # "stop", "length" or "content_filter"
    prompt_tokens: int
    completion_tokens: int
    frames_seen: np.ndarray  # the worker's sanitised frames: what the model saw
    rollout_video: bytes | None = None  # mp4 of the checked, sanitised rollout
    rollout_blocked: str | None = None
    batch_size: int = 1


class ServeMetrics:
    """Prometheus metrics of one server, in a registry of its own (`GET /metrics`)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("theworld_serve_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("theworld_serve_request_seconds", "Request latency by route", ["route"],
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
                                 registry=self.registry)
        self.refusals = Counter("theworld_serve_refusals", "Requests or outputs the safety worker blocked, by stage "
                                "(prompt, frames, answer, rollout, timeout, error)", ["stage"], registry=self.registry)
        self.errors = Counter("theworld_serve_errors", "Refused requests by error code", ["code"], registry=self.registry)
        self.batch_size = Histogram("theworld_serve_batch_size", "Requests generated together in one model call",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=self.registry)
        self.queue = Gauge("theworld_serve_queue", "Requests waiting for the model", registry=self.registry)

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class ChatService:
    def __init__(self, engine: BatchingEngine, guard: Guard, metrics: ServeMetrics, *, request_timeout: float = 60.0,
                 fps: int = 16):
        self.engine, self.guard, self.metrics = engine, guard, metrics
        self.request_timeout = request_timeout
        self.fps = fps

    async def complete(self, request: ChatRequest) -> Completion:
        deadline = time.monotonic() + self.request_timeout
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.engine.check_rollout(request.rollout)
        verdict = await self.guard.check_sample(request.text, request.frames, deadline)
        if not verdict.safe:
            stage = _REQUEST_STAGES.get(verdict.stage, verdict.stage or "error")
            self.metrics.refusals.labels(stage).inc()
            raise ApiError("content_blocked", f"the request was blocked by the safety checker: {verdict.reason}",
                           stage=stage)
        frames = verdict.frames  # sanitised (faces pixelated): the only frames the model sees
        job = Job(sample={"id": completion_id, "messages": request.messages, "images": list(frames)},
                  max_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p,
                  seed=request.seed, rollout=request.rollout)
        self.metrics.queue.set(self.engine.waiting + 1)
        generation: Generation = await self._until(deadline, asyncio.wrap_future(self.engine.submit(job)))
        completion = Completion(completion_id, generation.answer, generation.finish_reason, generation.prompt_tokens,
                                generation.completion_tokens, frames, batch_size=generation.batch_size)
        answer_verdict = await self.guard.check_text(generation.answer, deadline)
        if not answer_verdict.safe:
            self.metrics.refusals.labels("answer").inc()
            completion.content, completion.finish_reason = "", "content_filter"
            completion.rollout_blocked = "the answer was blocked" if request.rollout else None
            return completion
        if generation.rollout_frames is not None:
            video_verdict = await self.guard.check_video(generation.rollout_frames, deadline)
            if video_verdict.safe:
                completion.rollout_video = await asyncio.to_thread(encode_mp4, video_verdict.frames, self.fps)
            else:
                self.metrics.refusals.labels("rollout").inc()
                completion.rollout_blocked = f"the rollout video was blocked by the safety checker: {video_verdict.reason}"
        return completion

    async def _until(self, deadline: float, awaitable):
        try:
            return await asyncio.wait_for(awaitable, timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise ApiError("timeout", f"the model did not answer within {self.request_timeout:g}s "
                                      "(--request-timeout)") from None


def encode_mp4(frames: np.ndarray, fps: int) -> bytes:
    """uint8 `[F, H, W, 3]` -> mp4 bytes (the CLI's `write_video`, through a temporary file)."""
    from theworld.generate import write_video

    with tempfile.TemporaryDirectory(prefix="theworld-serve-") as tmp:
        path = Path(tmp) / "rollout.mp4"
        write_video(path, frames, fps=fps)
        return path.read_bytes()
