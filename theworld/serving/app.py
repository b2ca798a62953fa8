"""The HTTP surface: FastAPI routes over the guarded pipeline (`theworld.inference.pipeline`), OpenAI's
response shapes, errors as documented.

Routes: `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`, `GET /ready`, `GET /metrics`, and
the Gradio demo at `/` (mounted last, so the routes above take precedence). Every error body is
`{"error": {"code", "type", "message", ...}}` (`theworld.serving.schema.ERROR_CODES`, `ERROR_TYPES`).
"""
from __future__ import annotations

import asyncio
import base64
import copy
import hmac
import json
import logging
import threading
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from theworld.inference.media import encode_mp4
from theworld.inference.messages import Completion, InferenceError
from theworld.inference.pipeline import GuardedPipeline
from theworld.serving.metrics import ServeMetrics
from theworld.serving.schema import ApiError, ChatRequest, Limits, parse_chat_request, parse_json_body, validate

logger = logging.getLogger("theworld.serve")
_READY_TIMEOUT = 3.0  # seconds /ready waits for the worker's hello
_PUBLIC = ("/health", "/ready")  # answered without the API key (load balancers probe them)


class ServeApp:
    """Everything one server holds: the pipeline, its metrics and limits, the model's name; `.app` is the
    ASGI app. `demo_examples`: `(clip file, question)` pairs the demo page offers."""

    def __init__(self, pipeline: GuardedPipeline, metrics: ServeMetrics, *, model_name: str, limits: Limits,
                 api_key: str | None = None, demo: bool = True, demo_examples: list[tuple[str, str]] = (),
                 fps: int = 16):
        self.pipeline, self.metrics = pipeline, metrics
        self.model_name, self.limits, self.api_key, self.fps = model_name, limits, api_key, fps
        self.demo_examples = list(demo_examples)
        pipeline.on_refusal = lambda stage: metrics.refusals.labels(stage).inc()
        processor = pipeline.engine.processor
        # The model thread uses the processor's tokenizer; requests are measured with a copy of their own.
        self._tokenizer = copy.deepcopy(processor.tokenizer)
        self._tokenizer_lock = threading.Lock()
        self._check_clip = processor.num_world_tokens if processor.enable_world else (lambda n: None)
        self.created = int(time.time())
        self.app = self._build(demo)

    # ------------------------------------------------------------ requests in, one place

    def count_tokens(self, text: str) -> int:
        with self._tokenizer_lock:
            return len(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def parse(self, raw: bytes) -> ChatRequest:
        return parse_chat_request(parse_json_body(raw), self.limits, self.count_tokens, self._check_clip)

    def validate(self, request: ChatRequest) -> ChatRequest:
        return validate(request, self.limits, self.count_tokens, self._check_clip)

    async def complete(self, request: ChatRequest) -> Completion:
        """The pipeline's checked answer (the API and the demo both ask here)."""
        self.metrics.queue.set(self.pipeline.engine.waiting + 1)
        return await self.pipeline.complete(request)

    # ------------------------------------------------------------ the app

    def _build(self, demo: bool) -> FastAPI:
        app = FastAPI(title="TheWorld", summary="TheWorld behind the safety worker (OpenAI-compatible subset)",
                      docs_url=None, redoc_url=None)
        metrics = self.metrics

        @app.exception_handler(InferenceError)
        async def api_error(request: Request, e: InferenceError):
            e = ApiError.of(e)
            metrics.errors.labels(e.code).inc()
            return JSONResponse(e.body(), status_code=e.status)

        @app.exception_handler(StarletteHTTPException)
        async def http_error(request: Request, e: StarletteHTTPException):
            code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "invalid_value")
            return await api_error(request, ApiError(code, f"{request.method} {request.url.path}: {e.detail}"))

        @app.middleware("http")
        async def measure_and_authorize(request: Request, call_next):
            started = time.monotonic()
            route = request.url.path if request.url.path in ROUTES else "other"
            if self.api_key and route in ROUTES and route not in _PUBLIC and not self._authorized(request):
                response = JSONResponse(ApiError("unauthorized", "send the server's key as `Authorization: Bearer "
                                                                 "<key>` (--api-key)").body(), status_code=401)
                metrics.errors.labels("unauthorized").inc()
            else:
                try:
                    response = await call_next(request)
                except Exception:  # noqa: BLE001  (a bug: refuse this request, keep serving)
                    logger.exception("internal error on %s", request.url.path)
                    metrics.errors.labels("internal_error").inc()
                    response = JSONResponse(ApiError("internal_error", "internal error; nothing was returned "
                                                                       "unchecked (see the server log)").body(), 500)
            metrics.requests.labels(route, str(response.status_code)).inc()
            metrics.latency.labels(route).observe(time.monotonic() - started)
            return response

        @app.get("/health")
        async def health():
            return {"status": "ok"}

        @app.get("/ready")
        async def ready():
            try:
                hello = await self.pipeline.guard.hello(_READY_TIMEOUT)
            except InferenceError as e:
                raise ApiError("not_ready", f"the safety worker does not answer: {e.message}") from None
            body = {"status": "ready", "model": self.model_name,
                    "safety_worker": {"endpoint": self.pipeline.guard.endpoint, "pid": hello.get("pid"),
                                      "instance_id": hello.get("instance_id")}}
            deployment = await self.pipeline.engine.status()  # behind Ray Serve: not_ready without a live replica
            if deployment is not None:
                body["model_deployment"] = deployment
            return body

        @app.get("/metrics")
        async def prometheus():
            metrics.queue.set(self.pipeline.engine.waiting)
            return Response(metrics.exposition(), media_type="text/plain; version=0.0.4")

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                                "owned_by": "theworld"}]}

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request):
            raw = await _read_body(request, self.limits.max_request_bytes)
            chat = await asyncio.to_thread(self.parse, raw)  # image decoding stays off the event loop
            completion = await self.complete(chat)
            video = None
            if completion.rollout_frames is not None:
                video = await asyncio.to_thread(encode_mp4, completion.rollout_frames, self.fps)
            body = self._completion_body(completion, chat, video)
            if chat.stream:
                return StreamingResponse(_sse_chunks(body), media_type="text/event-stream")
            return body

        @app.api_route("/v1/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
        async def unknown_api_route(request: Request, path: str):
            if f"/v1/{path}" in ROUTES:
                raise ApiError("method_not_allowed", f"{request.method} /v1/{path}: not allowed (see docs/serve.md)")
            raise ApiError("not_found", f"/v1/{path}: no such route (this server has /v1/chat/completions and "
                                        "/v1/models)")

        if demo:
            import gradio as gr

            from theworld.serving.demo import build_demo

            auth = None if not self.api_key else (lambda user, password: hmac.compare_digest(password, self.api_key))
            app = gr.mount_gradio_app(app, build_demo(self), path="/", auth=auth,
                                      auth_message="Password: the server's --api-key (any user name).")
        return app

    def _authorized(self, request: Request) -> bool:
        given = request.headers.get("authorization", "")
        return given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), self.api_key.encode())

    def _completion_body(self, completion: Completion, chat: ChatRequest, video: bytes | None) -> dict:
        message = {"role": "assistant", "content": completion.content}
        if chat.rollout:
            message["rollout_video"] = (None if video is None else
                                        "data:video/mp4;base64," + base64.b64encode(video).decode())
            message["rollout_blocked"] = completion.rollout_blocked
        return {
            "id": completion.id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [{"index": 0, "message": message, "finish_reason": completion.finish_reason, "logprobs": None}],
            "usage": {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
                      "total_tokens": completion.prompt_tokens + completion.completion_tokens},
        }


ROUTES = ("/v1/chat/completions", "/v1/models", "/health", "/ready", "/metrics")


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes (a declared length is checked first)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError("request_too_large", f"the body is {declared} bytes; the limit is {limit} (--max-request-bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError("request_too_large", f"the body is over {limit} bytes (--max-request-bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


async def _sse_chunks(body: dict):
    """`stream: true`: the checked answer as OpenAI `chat.completion.chunk` events. The answer is checked
    as a whole before anything is sent, so it arrives in one content chunk."""
    choice = body["choices"][0]
    base = {"id": body["id"], "object": "chat.completion.chunk", "created": body["created"], "model": body["model"]}
    delta = dict(choice["message"])
    for chunk in ({"role": "assistant", "content": ""}, {k: v for k, v in delta.items() if k != "role"}):
        yield f"data: {json.dumps({**base, 'choices': [{'index': 0, 'delta': chunk, 'finish_reason': None}]})}\n\n"
    final = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}],
             "usage": body["usage"]}
    yield f"data: {json.dumps(final)}\n\n"
    yield "data: [DONE]\n\n"
