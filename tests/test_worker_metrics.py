"""`serve --metrics-port`: Prometheus text from the same counters as the `stats` op."""
import urllib.request

import msgpack
import pytest
from prometheus_client.parser import text_string_to_metric_families

from safety_worker import SafetyClient, WorkerError
from safety_worker import protocol as P
from safety_worker.tiny import BLOCKED_PHRASE, SAFE_EXAMPLE


def _scrape(url) -> dict:
    """{(sample name, sorted label items): value} of one scrape."""
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


@pytest.fixture(scope="module")
def metrics_url(tiny_safety_worker):
    url = tiny_safety_worker.hello["metrics_url"]
    assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
    return url


def test_metrics_count_requests_verdicts_errors_and_batches(tiny_safety_worker, metrics_url):
    import numpy as np
    import zmq

    before = _scrape(metrics_url)
    with SafetyClient(tiny_safety_worker.endpoint, timeout=60) as c:
        forbidden_before = c.stats()["errors"].get("forbidden", 0)
        assert c.check_text([SAFE_EXAMPLE, f"{BLOCKED_PHRASE}!"])[1].safe is False
        assert c.check_sample(SAFE_EXAMPLE, np.zeros((1, 16, 16, 3), np.uint8)).safe
        with pytest.raises(WorkerError, match="forbidden"):
            c.shutdown("not the owner")
        assert c.stats()["errors"]["forbidden"] == forbidden_before + 1  # stats.errors counts every error reply
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(tiny_safety_worker.endpoint)
    sock.send_multipart([P.TAG, msgpack.packb({"id": 1, "op": "ping", "bogus": 1})])
    assert sock.poll(30_000) and P.decode_reply(sock.recv_multipart()).error["code"] == "bad_message"
    sock.close(linger=0)
    ctx.term()
    after = _scrape(metrics_url)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("safety_worker_requests_total", op="check_text", outcome="ok") == 1
    assert delta("safety_worker_requests_total", op="check_sample", outcome="ok") == 1
    assert delta("safety_worker_requests_total", op="shutdown", outcome="error") == 1
    assert delta("safety_worker_errors_total", code="forbidden") == 1
    assert delta("safety_worker_errors_total", code="bad_message") == 1
    assert delta("safety_worker_verdicts_total", stage="none") == 2
    assert delta("safety_worker_verdicts_total", stage="text") == 1
    assert delta("safety_worker_check_latency_seconds_count") == 2  # one per check request
    assert delta("safety_worker_batch_size_count") == delta("safety_worker_batches_total") >= 1
    assert ("safety_worker_queue_depth", ()) in after


def test_stats_agrees_with_the_metrics(tiny_safety_worker, metrics_url):
    with SafetyClient(tiny_safety_worker.endpoint, timeout=60) as c:
        c.check_text(SAFE_EXAMPLE)
        first = _scrape(metrics_url)
        stats = c.stats()  # between the two scrapes: every counter lies between them
        second = _scrape(metrics_url)

    def between(value, name, **labels):
        key = (name, tuple(sorted(labels.items())))
        assert first.get(key, 0) <= value <= second.get(key, 0), (name, labels, value)

    for op, outcomes in stats["outcomes"].items():
        for outcome, n in outcomes.items():
            between(n, "safety_worker_requests_total", op=op, outcome=outcome)
    for code, n in stats["errors"].items():
        between(n, "safety_worker_errors_total", code=code)
    for stage, n in stats["verdicts_by_stage"].items():
        between(n, "safety_worker_verdicts_total", stage=stage)
    between(stats["batching"]["batches"], "safety_worker_batches_total")
    between(stats["checks"], "safety_worker_checks_total")
    between(stats["check_latency_s"]["count"], "safety_worker_check_latency_seconds_count")
    assert stats["safe"] + stats["blocked"] == sum(stats["verdicts_by_stage"].values())


def test_replicas_front_alone_serves_metrics_with_a_replica_label(tiny_replica_front):
    front = tiny_replica_front
    url = front.hello["metrics_url"]  # the front's own port, named in its hello like a single worker's
    assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
    with SafetyClient(front.endpoint, timeout=60) as c:
        before = _scrape(url)
        texts = [f"{SAFE_EXAMPLE} (metrics of the replica front) {i}" for i in range(6)]
        for t in texts + texts[:2]:  # the repeats are answered from the front's cache
            assert c.check_text(t).safe
        after = _scrape(url)
    replicas = {dict(labels).get("replica") for name, labels in after if name == "safety_worker_checks_total"}
    assert replicas == {"0", "1"}
    checked = sum(after[k] - before.get(k, 0) for k in after if k[0] == "safety_worker_checks_total")
    cached = after[("safety_worker_proxy_answered_from_cache_total", ())] - before.get(
        ("safety_worker_proxy_answered_from_cache_total", ()), 0)
    assert (checked, cached) == (6, 2)
