"""What crosses the pipeline's edges: a `Request` in, a `Completion` or an `InferenceError` out. Light
(numpy only): the server validates requests and the CLIs build them without loading torch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from theworld.inference import DEFAULT_MAX_NEW_TOKENS


class InferenceError(Exception):
    """A request the pipeline refused or could not finish: `code` (a key of
    `theworld.serving.schema.ERROR_CODES`, which the HTTP API answers with), `message` for the user, and
    extra fields (`stage`, `field`)."""

    def __init__(self, code: str, message: str, **extra: Any):
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra


@dataclass
class Request:
    """One question, in the training data's sample format: `messages` with one `{"type": "image"}` for the
    clip, `frames` uint8 `[T, H, W, 3]` (oldest first; the last is the current observation), or no frames
    for a text-only question."""

    messages: list[dict]
    frames: np.ndarray | None = None
    max_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    rollout: int | None = 0  # latent frames to predict for a video; None: the model's own num_world_steps
    id: str | None = None

    @classmethod
    def question(cls, prompt: str, frames: np.ndarray | None = None, **fields) -> "Request":
        """A one-turn question about `frames` (or about nothing: text only)."""
        content = ([{"type": "image"}] if frames is not None else []) + [{"type": "text", "text": prompt}]
        return cls(messages=[{"role": "user", "content": content}], frames=frames, **fields)

    @property
    def has_frames(self) -> bool:
        return self.frames is not None and len(self.frames) > 0

    @property
    def text(self) -> str:
        """All text of the conversation, as the safety worker checks it."""
        from theworld.data.sources import sample_text

        return sample_text({"messages": self.messages})


@dataclass
class Completion:
    """A checked answer. `content` is "" when the answer was blocked (`finish_reason` "content_filter")."""

    id: str
    content: str
    finish_reason: str  # "stop", "length" or "content_filter"
    prompt_tokens: int
    completion_tokens: int
    frames_seen: np.ndarray | None  # the worker's sanitised frames: what the model saw (None: text only)
    rollout_frames: np.ndarray | None = None  # the checked, sanitised rollout, uint8 [F, H, W, 3]
    rollout_blocked: str | None = None
    answer_blocked: str | None = None  # the worker's reason, when it blocked the answer
    batch_size: int = 1
