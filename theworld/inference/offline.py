"""Offline inference (vLLM's `LLM` to the server's `AsyncLLM`): the guarded pipeline over its own engine,
answering one request after another. `python -m theworld.generate` parses its arguments and calls this."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from theworld.inference.engine import BatchingEngine
from theworld.inference.guard import Guard
from theworld.inference.media import DEFAULT_VIDEO_FPS, read_frames, write_video
from theworld.inference.messages import InferenceError, Request
from theworld.inference.pipeline import GuardedPipeline

# Seconds one offline request may take, model and checks included: long enough for a real model's rollout
# on a CPU, short enough that a worker which never answers ends the command instead of hanging it.
OFFLINE_REQUEST_TIMEOUT = 3600.0


@dataclass
class Result:
    """One request's outcome as `generate` reports it (`--jsonl` prints `as_json()` per line)."""

    id: str
    answer: str | None = None
    refused: str | None = None  # the reason, when the safety worker blocked something
    video: str | None = None

    def as_json(self) -> dict:
        return {key: value for key, value in vars(self).items() if value is not None}


def read_jsonl_requests(path: str | Path, **fields) -> list[Request]:
    """One `{"id", "prompt", "image" or "video"}` object per line (paths relative to the file) -> `Request`s."""
    from theworld.data.sources import iter_jsonl

    requests = []
    jsonl = Path(path)
    for line_no, record in iter_jsonl(jsonl):
        if "prompt" not in record or ("image" in record) == ("video" in record):
            raise ValueError(f'{jsonl}:{line_no}: each line needs "prompt" and exactly one of "image" or "video"')
        frames = read_frames(jsonl.parent / record.get("video", record.get("image")), video="video" in record)
        requests.append(Request.question(str(record["prompt"]), frames, id=str(record.get("id", f"line-{line_no}")),
                                         **fields))
    return requests


class Generator:
    """Answers requests one by one behind the safety worker at `endpoint`.

    Args:
        model: a `TheWorld`, or a function returning one (called on the first request that passes the
            safety check: a refused request loads nothing).
        endpoint: a running safety worker's endpoint (`theworld.inference.guard.safety_endpoint`).
        rollout_steps, seed, fps: denoising steps, noise seed and frame rate of rollouts (and their videos).
        generation_kwargs: passed to `model.generate` (greedy decoding by default).
    """

    def __init__(self, model, endpoint: str, *, rollout_steps: int | None = None, seed: int = 0,
                 fps: int = DEFAULT_VIDEO_FPS,
                 **generation_kwargs):
        self.fps = fps
        self.engine = BatchingEngine(model, max_batch=1, batch_wait=0.0, rollout_steps=rollout_steps, fps=fps,
                                     rollout_seed=seed, **generation_kwargs)
        self.guard = Guard(endpoint)
        self.pipeline = GuardedPipeline(self.engine, self.guard, request_timeout=OFFLINE_REQUEST_TIMEOUT)

    def __call__(self, request: Request, save_video: str | Path | None = None) -> Result:
        """`request`'s answer, refusal and rollout video (written to `save_video` after the worker checked it).

        Raises ValueError for what the model cannot do (a rollout other than its trained one; a video from a
        model without a rollout)."""
        # A video shows the model's own rollout (None: its num_world_steps); without one, no rollout is made.
        request = dataclasses.replace(request, rollout=None if save_video is not None else 0)
        request_id = request.id or "request"
        try:
            completion = self.pipeline.run(request)
        except InferenceError as e:
            if e.code == "content_blocked":
                return Result(request_id, refused=e.message)
            if e.code == "rollout_unavailable":
                raise ValueError(e.message) from None
            raise
        if completion.finish_reason == "content_filter":
            return Result(request_id, refused="the generated answer was blocked by the safety checker and withheld: "
                                              f"{completion.answer_blocked}")
        result = Result(request_id, answer=completion.content)
        if save_video is not None:
            if completion.rollout_blocked is not None:
                result.refused = f"{completion.rollout_blocked}; the video was not written"
            elif completion.rollout_frames is None:
                raise ValueError("--save-video needs a world rollout: pass --rollout N (N >= 1)")
            else:
                write_video(save_video, completion.rollout_frames, fps=self.fps)
                result.video = str(save_video)
        return result

    def close(self) -> None:
        self.engine.close()
        self.guard.close()

    def __enter__(self) -> "Generator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["Generator", "Result", "read_jsonl_requests"]
