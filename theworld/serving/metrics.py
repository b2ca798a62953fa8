"""The server's Prometheus metrics (`GET /metrics`)."""
from __future__ import annotations


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
