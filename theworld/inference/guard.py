"""The link to the safety worker for inference: checks bounded by each request's deadline, surviving restarts.

A `SafetyClient` already resends what it was owed when its (supervised) worker comes back on the same
endpoint. If the worker stays silent long enough for the client to declare it dead (`WorkerDead`), the
guard opens a fresh client and tries again, until the request's deadline: then the request fails with
`safety_unavailable` (HTTP 503 from the server). Nothing is ever treated as safe because a check could not be made.
"""
from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np

from safety_worker import ClientClosed, SafetyClient, Verdict, WorkerDead, WorkerError, WorkerTimeout
from theworld.inference.messages import InferenceError

_RECONNECT_PAUSE = 0.2  # seconds between a dead client and the next try with a fresh one


class Guard:
    """Async safety checks for the pipeline (thread-safe; usable from any event loop)."""

    def __init__(self, endpoint: str, **client_kwargs):
        self.endpoint = endpoint
        # The client's liveness defaults (safety_worker.liveness): a supervised worker that hangs is
        # restarted before its clients give up on it, so a request waits for the restart, not a new client.
        self._client_kwargs = client_kwargs
        self._lock = threading.Lock()
        self._client = SafetyClient(endpoint, **self._client_kwargs)
        self.reconnects = 0

    async def check_sample(self, text: str, frames: np.ndarray, deadline: float) -> Verdict:
        """The prompt and every frame in one round trip; a safe verdict carries the sanitised frames."""
        return await self._request(lambda client, left: client.submit_sample(text, frames, timeout=left), deadline)

    async def check_text(self, text: str, deadline: float) -> Verdict:
        """One text (a text-only question, or an answer)."""
        return (await self._request(lambda client, left: client.submit_text([text], timeout=left), deadline))[0]

    async def check_video(self, frames: np.ndarray, deadline: float) -> Verdict:
        return await self._request(lambda client, left: client.submit_video(frames, timeout=left), deadline)

    async def hello(self, timeout: float) -> dict:
        """The worker's handshake (pid, instance id, models), or `safety_unavailable`."""
        reply = await self._request(lambda client, left: client.request("hello", timeout=left),
                                    time.monotonic() + timeout)
        return reply.result

    def close(self) -> None:
        with self._lock:
            self._client.close()

    async def _request(self, submit: Callable[[SafetyClient, float], Future], deadline: float):
        """``submit(client, seconds_left)``'s result, on a fresh client if the worker was declared dead."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise InferenceError("safety_unavailable", f"the safety worker at {self.endpoint} did not answer in "
                                                           "time; nothing was returned unchecked, try again")
            client = self._client
            try:
                return await asyncio.wrap_future(submit(client, left))
            except (WorkerDead, ClientClosed):
                self._replace(client)
                await asyncio.sleep(_RECONNECT_PAUSE)
            except WorkerTimeout:
                continue  # the loop's deadline check answers 503
            except WorkerError as e:
                raise InferenceError("safety_unavailable", f"the safety worker could not check this request "
                                                           f"({e.code}): {e.message}") from None

    def _replace(self, dead: SafetyClient) -> None:
        """Swap a client that declared its worker dead for a fresh one (once, whoever notices first)."""
        with self._lock:
            if self._client is not dead:
                return
            self._client = SafetyClient(self.endpoint, **self._client_kwargs)
            self.reconnects += 1
        threading.Thread(target=dead.close, daemon=True).start()  # close() joins its I/O thread


@contextlib.contextmanager
def safety_endpoint(endpoint: str | None, preset: str = "tiny", device: str = "cpu"):
    """`endpoint` when given (a running, shared worker); else a spawned, supervised worker's endpoint,
    stopped on exit."""
    if endpoint is not None:
        yield endpoint
        return
    from safety_worker import spawn_worker

    with spawn_worker(preset=preset, device=device) as worker:
        yield worker.endpoint
