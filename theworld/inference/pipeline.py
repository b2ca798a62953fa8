"""The guarded pipeline: one request from input to checked answer. `python -m theworld.generate` (offline,
`theworld.inference.offline`) and `python -m theworld.serve` (the API and the demo) are front ends over it,
as vLLM's `LLM` and `AsyncLLM` are over one engine.

    check the prompt and every frame (one worker round trip)  -> blocked: `content_blocked`, nothing generated
    the model answers on the worker's sanitised frames (`BatchingEngine`: batched with whatever else arrived)
    check the answer                                          -> blocked: finish_reason "content_filter", empty
    rollout (if asked): decode, check every frame             -> blocked: no frames, `rollout_blocked` says why

A text-only question (no frames) is checked as text and answered by Gemma 3 alone (no world tokens).
Every stage shares the request's deadline (`request_timeout`); past it the request fails with `timeout`
(or `safety_unavailable`), and nothing that was not checked is ever returned.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

from theworld.inference.engine import BatchingEngine, Generation, Job
from theworld.inference.guard import Guard
from theworld.inference.messages import Completion, InferenceError, Request

# The `stage` of a blocked request: what the user sent that was blocked. A verdict that failed closed (the
# guard itself failed) keeps the worker's stage ("timeout", "error").
_REQUEST_STAGES = {"text": "prompt", "video": "frames"}


class GuardedPipeline:
    """Answers `Request`s with the engine's model, the safety worker (through `guard`) seeing every input
    before the model does and every output before the user does.

    Args:
        engine: the `BatchingEngine` that runs the model (or, behind Ray Serve, a
            `theworld.serving.ray_serve.DeploymentEngine` with the same interface).
        guard: the `Guard` of the safety worker.
        request_timeout: seconds one request may take, safety checks included.
        on_refusal: called with the stage of everything the worker blocked (metrics).
    """

    def __init__(self, engine: BatchingEngine, guard: Guard, *, request_timeout: float = 60.0,
                 on_refusal: Callable[[str], None] | None = None):
        self.engine, self.guard = engine, guard
        self.request_timeout = request_timeout
        self.on_refusal = on_refusal or (lambda stage: None)

    def run(self, request: Request) -> Completion:
        """`complete`, for a caller without an event loop (the offline front end)."""
        return asyncio.run(self.complete(request))

    async def complete(self, request: Request) -> Completion:
        deadline = time.monotonic() + self.request_timeout
        completion_id = request.id or f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if request.has_frames:
            verdict = await self.guard.check_sample(request.text, request.frames, deadline)
        else:
            verdict = await self.guard.check_text(request.text, deadline)
        if not verdict.safe:
            stage = _REQUEST_STAGES.get(verdict.stage, verdict.stage or "error")
            self.on_refusal(stage)
            raise InferenceError("content_blocked", f"the request was blocked by the safety checker ({verdict.stage}): "
                                                    f"{verdict.reason}", stage=stage)
        frames = verdict.frames if request.has_frames else None  # sanitised (faces pixelated): all the model sees
        rollout = self.engine.resolve_rollout(request.rollout, request.has_frames)
        job = Job(sample={"id": completion_id, "messages": request.messages,
                          "images": [] if frames is None else list(frames)},
                  max_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p,
                  seed=request.seed, rollout=rollout)
        generation: Generation = await self._until(deadline, self.engine.generate(job))
        completion = Completion(completion_id, generation.answer, generation.finish_reason, generation.prompt_tokens,
                                generation.completion_tokens, frames, batch_size=generation.batch_size)
        answer_verdict = await self.guard.check_text(generation.answer, deadline)
        if not answer_verdict.safe:
            self.on_refusal("answer")
            completion.content, completion.finish_reason = "", "content_filter"
            completion.answer_blocked = answer_verdict.reason
            completion.rollout_blocked = "the answer was blocked" if rollout else None
            return completion
        if generation.rollout_frames is not None:
            video_verdict = await self.guard.check_video(generation.rollout_frames, deadline)
            if video_verdict.safe:
                completion.rollout_frames = video_verdict.frames  # the sanitised frames only
            else:
                self.on_refusal("rollout")
                completion.rollout_blocked = f"the rollout video was blocked by the safety checker: {video_verdict.reason}"
        return completion

    async def _until(self, deadline: float, awaitable):
        try:
            return await asyncio.wait_for(awaitable, timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise InferenceError("timeout", f"the model did not answer within {self.request_timeout:g}s "
                                            "(--request-timeout)") from None
