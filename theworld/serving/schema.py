"""The one place that validates chat requests: OpenAI-style JSON (or the demo's arrays) -> `ChatRequest`.

Every refusal is an `ApiError` with an HTTP status and a specific `code` (the table in docs/serve.md,
`ERROR_CODES` here); its body is `{"error": {"code", "type", "message"}}` (`type`: OpenAI's error type of
the status, `ERROR_TYPES`). Nothing here touches the model or
the safety worker: a request is valid or refused before either sees it.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from theworld.inference.messages import InferenceError, Request

# code -> (HTTP status, when). docs/serve.md has the same table; tests/test_serve.py checks they agree.
ERROR_CODES: dict[str, tuple[int, str]] = {
    "invalid_json": (400, "the body is not a JSON object"),
    "missing_field": (400, "a required field is absent (`messages`, a part's `text` or `image_url`)"),
    "invalid_type": (400, "a field has the wrong JSON type"),
    "invalid_value": (400, "a field's value is out of range or not one of the allowed values"),
    "unsupported": (400, "an OpenAI option this server does not offer (`n` > 1, tools, logprobs, ...)"),
    "invalid_message": (400, "the conversation's shape: roles, an assistant turn with images, not ending with a user turn"),
    "invalid_image_url": (400, "an `image_url` that is not a `data:` URI (remote URLs are never fetched)"),
    "invalid_image": (400, "a `data:` URI that is not a base64 PNG or JPEG image"),
    "too_many_frames": (400, "more image parts than `--max-frames`"),
    "invalid_clip": (400, "a clip whose frame count is not 1 + 4k or whose frames differ in size"),
    "prompt_too_long": (400, "the text is longer than `--max-prompt-tokens` tokens"),
    "max_tokens_too_large": (400, "`max_tokens` above `--max-tokens-limit`"),
    "rollout_unavailable": (400, "a `rollout` this model cannot make, or above `--max-rollout`"),
    "content_blocked": (400, "the safety worker blocked the prompt or a frame (`stage` says which); nothing was generated"),
    "unauthorized": (401, "`--api-key` is set and the request has no `Authorization: Bearer <key>`, or a wrong one"),
    "not_found": (404, "no such route"),
    "method_not_allowed": (405, "the route exists for another HTTP method"),
    "request_too_large": (413, "the body is larger than `--max-request-bytes`"),
    "image_too_large": (413, "an image over `--max-image-bytes` (encoded) or `--max-image-pixels`"),
    "overloaded": (503, "more than `--max-queue` requests are waiting for the model"),
    "safety_unavailable": (503, "the safety worker did not answer within `--request-timeout` (restarting, or gone); nothing unchecked is returned"),
    "model_unavailable": (503, "with `--ray`: the model replica answering died and no live replica answered in its place; nothing unchecked is returned"),
    "not_ready": (503, "`/ready`: the safety worker does not answer, or (with `--ray`) no model replica is serving"),
    "timeout": (503, "the request did not finish within `--request-timeout`"),
    "internal_error": (500, "a bug; the request is refused (fail closed) and the server keeps serving"),
}

# OpenAI's error `type` for each status (its clients read `code` and `type`); OpenAI answers an overloaded
# or failing service with "server_error" too.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 500: "server_error", 503: "server_error"}

IMAGE_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg"}
_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I)


class ApiError(InferenceError):
    """A refused request: `status`, `code` (a key of ERROR_CODES), `message`, and extra body fields."""

    def __init__(self, code: str, message: str, **extra: Any):
        super().__init__(code, message, **extra)
        self.status = ERROR_CODES[code][0]

    @classmethod
    def of(cls, error: InferenceError) -> "ApiError":
        """The HTTP form of the pipeline's `error` (the same code, message and fields)."""
        return error if isinstance(error, ApiError) else cls(error.code, error.message, **error.extra)

    def body(self) -> dict:
        return {"error": {"code": self.code, "type": ERROR_TYPES[self.status], "message": self.message, **self.extra}}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (the server's `--max-*` flags)."""

    max_request_bytes: int = 64 << 20
    max_image_bytes: int = 8 << 20
    max_image_pixels: int = 4096 * 4096
    max_frames: int = 9
    max_prompt_tokens: int = 1024
    max_tokens_limit: int = 256
    default_max_tokens: int = 32
    max_rollout: int = 2


# ------------------------------------------------------------------------------- the OpenAI subset


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class ImageURL(_Strict):
    url: str
    detail: str | None = None


class ContentPart(_Strict):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]


class ChatCompletionBody(_Strict):
    """The fields of `POST /v1/chat/completions` this server reads (others are ignored)."""

    messages: list[Message] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    seed: int | None = None
    rollout: int = Field(default=0, ge=0)
    stop: str | list[str] | None = None
    tools: list | None = None
    logprobs: bool | None = None


@dataclass
class ChatRequest(Request):
    """A validated request (`theworld.inference.Request`) and what only the API has: `stream`, the asked
    `model` name, and the prompt's length in tokens."""

    stream: bool = False
    model: str | None = None
    prompt_tokens: int = 0


# ------------------------------------------------------------------------------- parsing


def parse_json_body(raw: bytes) -> dict:
    """The request body as a JSON object (its size is capped while it is read: `app._read_body`)."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError("invalid_json", f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError("invalid_json", f"the body must be a JSON object, got {type(body).__name__}")
    return body


def _validation_error(e: ValidationError) -> ApiError:
    first = e.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    kind = first["type"]
    if kind == "missing":
        return ApiError("missing_field", f"`{where}` is required", field=where)
    code = "invalid_type" if kind.endswith("_type") or kind in ("model_attributes_type", "list_type", "dict_type") else "invalid_value"
    got = first.get("input")
    shown = json.dumps(got)[:80] if isinstance(got, (str, int, float, bool, type(None))) else type(got).__name__
    return ApiError(code, f"`{where}`: {first['msg']} (got {shown})", field=where)


def decode_data_uri(url: str, limits: Limits, index: int) -> np.ndarray:
    """A `data:image/png|jpeg;base64,...` URI -> uint8 `[H, W, 3]`; refused with a specific code."""
    from PIL import Image, UnidentifiedImageError

    where = f"image {index + 1}"
    match = _DATA_URI.match(url)
    if match is None:
        scheme = url.split(":", 1)[0][:16] if ":" in url else "no scheme"
        raise ApiError("invalid_image_url", f"{where}: only data: URIs are accepted (data:image/png;base64,... or "
                                            f"image/jpeg), got {scheme}: remote URLs are never fetched")
    mime = (match["mime"] or "").lower()
    if not match["b64"] or mime not in IMAGE_FORMATS.values():
        raise ApiError("invalid_image", f"{where}: the data URI must be base64 image/png or image/jpeg, got "
                                        f"{mime or 'no type'}{'' if match['b64'] else ' (not base64)'}")
    payload = url[match.end():]
    if len(payload) * 3 // 4 > limits.max_image_bytes + 3:
        raise ApiError("image_too_large", f"{where} is about {len(payload) * 3 // 4} bytes; the limit is "
                                          f"{limits.max_image_bytes} (--max-image-bytes)")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError("invalid_image", f"{where}: the base64 payload does not decode: {e}") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in IMAGE_FORMATS:
                raise ApiError("invalid_image", f"{where} is {image.format}, not PNG or JPEG")
            if image.width * image.height > limits.max_image_pixels:
                raise ApiError("image_too_large", f"{where} is {image.width}x{image.height} pixels; the limit is "
                                                  f"{limits.max_image_pixels} pixels (--max-image-pixels)")
            return np.ascontiguousarray(np.asarray(image.convert("RGB")))
    except ApiError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ApiError("invalid_image", f"{where} does not decode as an image: {e}") from None


def parse_chat_request(body: dict, limits: Limits, count_tokens: Callable[[str], int],
                       check_clip: Callable[[int], None] = lambda n: None) -> ChatRequest:
    """A JSON object from `POST /v1/chat/completions` -> a validated `ChatRequest`.

    `count_tokens(text)` measures the prompt; `check_clip(num_frames)` raises ValueError for a clip the
    model cannot take (the processor's own check)."""
    try:
        parsed = ChatCompletionBody.model_validate(body)
    except ValidationError as e:
        raise _validation_error(e) from None
    if parsed.n != 1:
        raise ApiError("unsupported", f"`n` must be 1 (one answer per request), got {parsed.n}", field="n")
    if parsed.tools:
        raise ApiError("unsupported", "`tools` are not supported by TheWorld", field="tools")
    if parsed.logprobs:
        raise ApiError("unsupported", "`logprobs` are not supported (the answer is checked as a whole)", field="logprobs")
    if parsed.stop:
        raise ApiError("unsupported", "`stop` sequences are not supported; use max_tokens", field="stop")

    messages, urls = [], []
    for i, message in enumerate(parsed.messages):
        parts = [ContentPart(type="text", text=message.content)] if isinstance(message.content, str) else message.content
        content = []
        for j, part in enumerate(parts):
            if part.type == "text":
                if part.text is None:
                    raise ApiError("missing_field", f"`messages.{i}.content.{j}.text` is required for a text part",
                                   field=f"messages.{i}.content.{j}.text")
                content.append({"type": "text", "text": part.text})
            else:
                if part.image_url is None:
                    raise ApiError("missing_field", f"`messages.{i}.content.{j}.image_url` is required for an image_url "
                                                    "part", field=f"messages.{i}.content.{j}.image_url")
                if message.role != "user":
                    raise ApiError("invalid_message", f"messages.{i}: images belong in user messages, not {message.role}")
                urls.append(part.image_url.url)
                content.append({"type": "image"})
        role = "system" if message.role == "developer" else message.role
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "user":
        raise ApiError("invalid_message", f"the last message must be the user's, got {messages[-1]['role']}")
    # No image part: a text-only question, which Gemma 3 answers alone (no world tokens).
    if len(urls) > limits.max_frames:
        raise ApiError("too_many_frames", f"{len(urls)} image parts; the limit is {limits.max_frames} frames "
                                          "(--max-frames)")
    _keep_one_image_placeholder(messages)
    frames = [decode_data_uri(url, limits, i) for i, url in enumerate(urls)]
    max_tokens = parsed.max_completion_tokens or parsed.max_tokens or limits.default_max_tokens
    return validate(ChatRequest(messages=messages, frames=_stack(frames) if frames else None, max_tokens=max_tokens,
                                temperature=parsed.temperature, top_p=parsed.top_p, seed=parsed.seed,
                                rollout=parsed.rollout, stream=parsed.stream, model=parsed.model),
                    limits, count_tokens, check_clip)


def _keep_one_image_placeholder(messages: list[dict]) -> None:
    """The clip is one image in the chat (Gemma sees its last frame, the world path all of them): keep the
    placeholder where the last frame was and drop the others."""
    places = [(i, j) for i, m in enumerate(messages) for j, part in enumerate(m["content"]) if part["type"] == "image"]
    for i, j in reversed(places[:-1]):
        del messages[i]["content"][j]


def _stack(frames: list[np.ndarray]) -> np.ndarray:
    sizes = sorted({f.shape[:2] for f in frames})
    if len(sizes) > 1:
        raise ApiError("invalid_clip", f"the frames of a clip must share one size, got {sizes} (height, width)")
    return np.ascontiguousarray(np.stack(frames))


def validate(request: ChatRequest, limits: Limits, count_tokens: Callable[[str], int],
             check_clip: Callable[[int], None] = lambda n: None) -> ChatRequest:
    """Checks shared by the API and the demo: lengths, limits, the clip; fills `prompt_tokens`."""
    frames = request.frames
    if frames is not None:  # None: a text-only question
        _validate_frames(frames, limits, check_clip)
    if request.max_tokens > limits.max_tokens_limit:
        raise ApiError("max_tokens_too_large", f"max_tokens is {request.max_tokens}; the limit is "
                                               f"{limits.max_tokens_limit} (--max-tokens-limit)", field="max_tokens")
    if request.rollout > limits.max_rollout:
        raise ApiError("rollout_unavailable", f"rollout is {request.rollout}; the limit is {limits.max_rollout} "
                                              "(--max-rollout)", field="rollout")
    request.prompt_tokens = count_tokens(request.text)
    if request.prompt_tokens > limits.max_prompt_tokens:
        raise ApiError("prompt_too_long", f"the text is {request.prompt_tokens} tokens; the limit is "
                                          f"{limits.max_prompt_tokens} (--max-prompt-tokens)")
    return request


def _validate_frames(frames: np.ndarray, limits: Limits, check_clip: Callable[[int], None]) -> None:
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ApiError("invalid_image", f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    if len(frames) > limits.max_frames:
        raise ApiError("too_many_frames", f"{len(frames)} frames; the limit is {limits.max_frames} (--max-frames)")
    if frames.shape[1] * frames.shape[2] > limits.max_image_pixels:
        raise ApiError("image_too_large", f"frames of {frames.shape[2]}x{frames.shape[1]} pixels; the limit is "
                                          f"{limits.max_image_pixels} pixels (--max-image-pixels)")
    try:
        check_clip(len(frames))
    except ValueError as e:
        raise ApiError("invalid_clip", str(e)) from None
