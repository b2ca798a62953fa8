"""TheWorld as a service (`python -m theworld.serve`): an OpenAI-compatible HTTP API and a web demo, with
the safety worker in front of every request and every answer. One file per idea:

- `schema.py`: the one place that validates requests (and the error codes),
- `guard.py`: safety checks bounded by the request's deadline, surviving worker restarts,
- `engine.py`: the model thread that batches requests arriving together,
- `service.py`: one request from validated input to checked answer (the API and the demo call it),
- `app.py`: the FastAPI routes; `demo.py`: the Gradio page mounted at `/`.
"""
from theworld.serving.schema import ERROR_CODES, ApiError, ChatRequest, Limits

__all__ = ["ERROR_CODES", "ApiError", "ChatRequest", "Limits"]
