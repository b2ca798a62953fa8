"""TheWorld as a service (`python -m theworld.serve`): an OpenAI-compatible HTTP API and a web demo, front
ends over the guarded pipeline of `theworld.inference` (the safety worker in front of every request and
every answer). One file per idea:

- `schema.py`: the one place that validates requests (and the error codes and types),
- `app.py`: the FastAPI routes; `demo.py`: the Gradio page mounted at `/` (with held-out motion clips),
- `metrics.py`: the Prometheus metrics; `server.py`: binding, loading and running (`run_server`).
"""
from theworld.serving.schema import ERROR_CODES, ApiError, ChatRequest, Limits

__all__ = ["ERROR_CODES", "ApiError", "ChatRequest", "Limits"]
