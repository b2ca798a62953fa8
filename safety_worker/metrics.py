"""The worker's counters: one source for the `stats` op and for Prometheus (`serve --metrics-port`).

`WorkerMetrics` is updated by the worker's two threads (main: requests, errors, replies; checker:
batches) under one lock, and `snapshot()` is what `stats` returns. The Prometheus endpoint renders
the same snapshot (`prometheus_families`), so a scrape and a `stats` taken at the same moment agree
by construction; with `serve --replicas N` the front process renders each replica's `stats` with a
`replica` label. Histograms are kept here as plain cumulative bucket counts (Prometheus' own
format), which is what lets them travel inside `stats` from a replica to the front.
"""
from __future__ import annotations

import bisect
import threading
from typing import Any, Callable, Iterable, Sequence

# Seconds from receiving a check to answering it (queue wait + batch wait + compute).
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Texts-or-samples per checker batch (a check_text list counts one per text).
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Stage of a verdict: "none" for safe, else what blocked it (docs/PROTOCOL.md).
STAGES = ("none", "text", "video", "timeout", "error")
PREFIX = "safety_worker_"


class _Histogram:
    def __init__(self, bounds: Sequence[float]):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # last one: +Inf
        self.sum = 0.0

    def observe(self, x: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, x)] += 1
        self.sum += x

    def to_dict(self) -> dict[str, Any]:
        cumulative, total = [], 0
        for c in self.counts:
            total += c
            cumulative.append(total)
        return {"le": list(self.bounds), "cumulative": cumulative, "sum": self.sum, "count": total}


class WorkerMetrics:
    """Thread-safe counters of one worker process (see the module docstring)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[str, int] = {}  # op -> well-formed requests received
        self.outcomes: dict[str, dict[str, int]] = {}  # op -> {"ok"|"error": replies sent}
        self.errors: dict[str, int] = {}  # code -> error replies (malformed requests included)
        self.verdicts: dict[str, int] = {s: 0 for s in STAGES}  # stage -> verdicts answered
        self.timed_out = 0
        self.unroutable_replies = 0
        self.checks = 0  # check requests computed (a batch of 5 jobs counts 5)
        self.check_seconds = 0.0  # checker busy time (a batch counts its wall time once)
        self.batches = 0
        self.batch_jobs = 0
        self.batch_units = 0
        self.batch_frames = 0
        self.largest_batch = 0
        self.retried_one_by_one = 0  # jobs re-run alone because their batch raised
        self.latency = _Histogram(LATENCY_BUCKETS_S)
        self.batch_size = _Histogram(BATCH_SIZE_BUCKETS)

    def request(self, op: str) -> None:
        with self._lock:
            self.requests[op] = self.requests.get(op, 0) + 1

    def replied(self, op: str | None, code: str | None) -> None:
        """One reply sent: `code` None for ok, else the error code; `op` None if the request was unreadable."""
        with self._lock:
            if code is not None:
                self.errors[code] = self.errors.get(code, 0) + 1
            if op is not None:
                per_op = self.outcomes.setdefault(op, {})
                outcome = "ok" if code is None else "error"
                per_op[outcome] = per_op.get(outcome, 0) + 1

    def verdict(self, stage: str | None, latency_s: float | None = None, timed_out: bool = False) -> None:
        with self._lock:
            self.verdicts[stage or "none"] = self.verdicts.get(stage or "none", 0) + 1
            if timed_out:
                self.timed_out += 1
            if latency_s is not None:
                self.latency.observe(latency_s)

    def batch(self, jobs: int, units: int, frames: int, seconds: float) -> None:
        with self._lock:
            self.batches += 1
            self.batch_jobs += jobs
            self.batch_units += units
            self.batch_frames += frames
            self.largest_batch = max(self.largest_batch, units)
            self.batch_size.observe(units)
            self.checks += jobs
            self.check_seconds += seconds

    def retried(self, jobs: int) -> None:
        with self._lock:
            self.retried_one_by_one += jobs

    def unroutable(self) -> None:
        with self._lock:
            self.unroutable_replies += 1

    def snapshot(self) -> dict[str, Any]:
        """The counters as `stats` reports them (docs/PROTOCOL.md, `stats` result)."""
        with self._lock:
            safe = self.verdicts["none"]
            return {
                "requests": dict(self.requests),
                "outcomes": {op: dict(v) for op, v in self.outcomes.items()},
                "errors": dict(self.errors),
                "safe": safe,
                "blocked": sum(self.verdicts.values()) - safe,
                "verdicts_by_stage": dict(self.verdicts),
                "timed_out": self.timed_out,
                "unroutable_replies": self.unroutable_replies,
                "checks": self.checks,
                "check_seconds": self.check_seconds,
                "batching": {
                    "batches": self.batches, "jobs": self.batch_jobs, "units": self.batch_units,
                    "frames": self.batch_frames, "largest": self.largest_batch,
                    "mean_units": self.batch_units / self.batches if self.batches else 0.0,
                    "retried_one_by_one": self.retried_one_by_one,
                },
                "check_latency_s": self.latency.to_dict(),
                "batch_size": self.batch_size.to_dict(),
            }


# ---------------------------------------------------------------- Prometheus exposition

def prometheus_families(sources: Iterable[tuple[dict[str, str], dict[str, Any]]]):
    """Prometheus metric families from `stats` snapshots, one (labels, stats) per worker process."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    sources = list(sources)
    names = list(sources[0][0]) if sources else []
    fam = {
        "requests": CounterMetricFamily(PREFIX + "requests", "Replies to well-formed requests, by op and outcome "
                                        "(ok: answered, a blocked verdict included; error: an error reply)",
                                        labels=names + ["op", "outcome"]),
        "errors": CounterMetricFamily(PREFIX + "errors", "Error replies by code (malformed requests included)",
                                      labels=names + ["code"]),
        "verdicts": CounterMetricFamily(PREFIX + "verdicts", "Verdicts answered, by stage (none: safe; text, video, "
                                        "timeout, error: what blocked it); one per text of a check_text",
                                        labels=names + ["stage"]),
        "timed_out": CounterMetricFamily(PREFIX + "timed_out", "Checks answered blocked at --check-timeout", labels=names),
        "unroutable": CounterMetricFamily(PREFIX + "unroutable_replies", "Replies that could not be delivered", labels=names),
        "checks": CounterMetricFamily(PREFIX + "checks", "Check requests computed", labels=names),
        "busy": CounterMetricFamily(PREFIX + "check_busy_seconds", "Seconds the checker spent computing", labels=names),
        "batches": CounterMetricFamily(PREFIX + "batches", "Checker batches run", labels=names),
        "retried": CounterMetricFamily(PREFIX + "batch_retried_jobs", "Jobs re-run one by one because their batch raised",
                                       labels=names),
        "queued": GaugeMetricFamily(PREFIX + "queue_depth", "Checks waiting for the checker", labels=names),
        "running": GaugeMetricFamily(PREFIX + "running_checks", "Checks being computed now", labels=names),
        "latency": HistogramMetricFamily(PREFIX + "check_latency_seconds", "Seconds from receiving a check to "
                                         "answering it (queue, batch wait and compute)", labels=names),
        "batch_size": HistogramMetricFamily(PREFIX + "batch_size", "Texts-or-samples per checker batch", labels=names),
    }
    for labels, s in sources:
        lv = [labels[n] for n in names]
        for op, outs in sorted(s.get("outcomes", {}).items()):
            for outcome, n in sorted(outs.items()):
                fam["requests"].add_metric(lv + [op, outcome], n)
        for code, n in sorted(s.get("errors", {}).items()):
            fam["errors"].add_metric(lv + [code], n)
        for stage, n in s.get("verdicts_by_stage", {}).items():
            fam["verdicts"].add_metric(lv + [stage], n)
        fam["timed_out"].add_metric(lv, s.get("timed_out", 0))
        fam["unroutable"].add_metric(lv, s.get("unroutable_replies", 0))
        fam["checks"].add_metric(lv, s.get("checks", 0))
        fam["busy"].add_metric(lv, s.get("check_seconds", 0.0))
        fam["batches"].add_metric(lv, s.get("batching", {}).get("batches", 0))
        fam["retried"].add_metric(lv, s.get("batching", {}).get("retried_one_by_one", 0))
        fam["queued"].add_metric(lv, s.get("queued", 0))
        fam["running"].add_metric(lv, s.get("running_checks", 0))
        for key in ("latency", "batch_size"):
            h = s.get("check_latency_s" if key == "latency" else "batch_size")
            if h:
                buckets = [(repr(float(b)), c) for b, c in zip(h["le"], h["cumulative"])] + [("+Inf", h["count"])]
                fam[key].add_metric(lv, buckets, h["sum"])
    return list(fam.values())


class _SnapshotCollector:
    def __init__(self, sources: Callable[[], Iterable[tuple[dict[str, str], dict[str, Any]]]]):
        self._sources = sources

    def collect(self):
        return prometheus_families(self._sources())


def _front_families(snapshot: dict[str, Any]) -> list:
    """Counters of a front that forwards checks (`--replicas`, `--ray`): cache hits never reach a checker."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    requests = CounterMetricFamily(PREFIX + "proxy_requests", "Well-formed requests the front process received")
    requests.add_metric([], snapshot["requests"])
    cached = CounterMetricFamily(PREFIX + "proxy_answered_from_cache", "Checks answered from the verdict cache")
    cached.add_metric([], snapshot["answered_from_cache"])
    cache = GaugeMetricFamily(PREFIX + "proxy_cache_bytes", "Bytes held by the verdict cache")
    cache.add_metric([], snapshot["cache"]["bytes"])
    return [requests, cached, cache]


def proxy_families(snapshot: dict[str, Any]):
    """The front process's own counters under `serve --replicas` (cache hits never reach a replica)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    dispatched = CounterMetricFamily(PREFIX + "proxy_dispatched", "Requests sent to each replica", labels=["replica"])
    outstanding = GaugeMetricFamily(PREFIX + "proxy_outstanding", "Requests a replica owes the front", labels=["replica"])
    for i, (d, o) in enumerate(zip(snapshot["dispatched"], snapshot["outstanding"])):
        dispatched.add_metric([str(i)], d)
        outstanding.add_metric([str(i)], o)
    return _front_families(snapshot) + [dispatched, outstanding]


def fleet_families(snapshot: dict[str, Any]):
    """The front's own counters under `serve --ray` (the replicas' own come with a `replica` label)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    def one(kind, name, doc, value):
        family = kind(PREFIX + name, doc)
        family.add_metric([], value)
        return family

    return _front_families(snapshot) + [
        one(GaugeMetricFamily, "fleet_replicas", "Replicas of the fleet serving now", snapshot["replicas"]),
        one(CounterMetricFamily, "fleet_replicas_started", "Replicas that loaded the guard since the front started",
            snapshot["replicas_started"]),
        one(CounterMetricFamily, "fleet_replicas_lost", "Replicas that died without being stopped (Serve restarted them)",
            snapshot["replicas_lost"]),
        one(CounterMetricFamily, "fleet_dispatched", "Requests sent to the fleet", snapshot["dispatched"][0]),
        one(GaugeMetricFamily, "fleet_outstanding", "Requests the fleet owes the front", snapshot["outstanding"][0]),
        one(CounterMetricFamily, "fleet_resent", "Requests sent again after the replica checking them died",
            snapshot["resent"]),
        one(CounterMetricFamily, "fleet_failed", "Requests answered with an error after every resend failed",
            snapshot["failed"]),
    ]


class _FunctionCollector:
    def __init__(self, families: Callable[[], list]):
        self.collect = families


def serve_metrics(port: int, sources: Callable[[], Iterable[tuple[dict[str, str], dict[str, Any]]]],
                  extra: Callable[[], list] | None = None) -> tuple[Any, str]:
    """Serve Prometheus text at http://127.0.0.1:PORT/metrics (0: a free port) from a daemon thread.

    `sources()` is called at every scrape and returns (labels, stats) per worker process; `extra()`
    returns more metric families. Returns (the HTTP server, its URL); `.shutdown()` the server to stop it."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(sources))
    if extra is not None:
        registry.register(_FunctionCollector(extra))
    server, _thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    return server, f"http://127.0.0.1:{server.server_address[1]}/metrics"
