"""The Cosmos safety checker as a ZeroMQ service (light client side imports no torch).

    from safety_worker import SafetyClient, spawn_worker

    with spawn_worker(preset="tiny") as worker, SafetyClient(worker.endpoint) as client:
        verdict = client.check_sample("a prompt", frames)   # uint8 [T, H, W, 3]
        if verdict.safe:
            frames = verdict.frames                          # faces pixelated

The worker side (`safety_worker.server`) is the only code that imports cosmos_guardrail.
"""
from .client import ClientClosed, SafetyClient, Verdict, WorkerDead, WorkerError, WorkerTimeout
from .spawn import WorkerProcess, WorkerStartFailed, spawn_worker

__all__ = [
    "SafetyClient", "Verdict", "WorkerError", "WorkerTimeout", "WorkerDead", "ClientClosed",
    "spawn_worker", "WorkerProcess", "WorkerStartFailed",
]
