"""A guard fleet on Ray Serve (`serve --ray --replicas 2` on a local Ray of 2 CPUs) behind the worker front.

One fleet serves the module (Ray and two replicas take ~30-60 s to start on 2 cores): the single worker's
protocol conformance tests run against it unchanged (imported from test_worker_protocol, with its
`worker_front` fixture overridden here), its verdicts and sanitized frames are compared byte for byte
with a single worker's, a replica is killed with SIGKILL under load, and the owner stops it last."""
import inspect
import os
import signal
import time

import msgpack
import numpy as np
import pytest
import zmq

import test_worker_protocol as conformance
from safety_worker import SafetyClient, spawn_worker
from safety_worker import protocol as P
from safety_worker.tiny import BLOCKED_PHRASE, SAFE_EXAMPLE

pytestmark = pytest.mark.long

# The single worker's conformance tests (those that talk to an endpoint), run against the fleet's front.
for _name, _test in vars(conformance).items():
    if _name.startswith("test_") and {"raw", "worker_front"} & set(inspect.signature(_test).parameters):
        globals()[_name] = _test
raw = conformance.raw


@pytest.fixture(scope="module")
def fleet(tiny_guardrail_root):
    """`serve --ray --replicas 2`: a local Ray of 2 CPUs, two replicas whose face filter pixelates every frame
    (a safe reply with unchanged frames would be one the guard never saw), metrics on a free port."""
    worker = spawn_worker(extra_args=["--tiny-dir", str(tiny_guardrail_root), "--tiny-faces", "all", "--ray",
                                      "--replicas", "2", "--num-cpus", "2", "--metrics-port", "0"], startup_timeout=300)
    yield worker
    worker.stop(timeout=30)


@pytest.fixture(scope="module")
def worker_front(fleet):
    return fleet


def _dealer(endpoint):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return ctx, sock


def _requests():
    rng = np.random.default_rng(0)
    clip = lambda t, h, w: rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)  # noqa: E731
    return [
        P.Request(1, "check_text", {"texts": [SAFE_EXAMPLE, BLOCKED_PHRASE, "What is 2*3?", "zorbl\u00e1x"]}),
        P.Request(2, "check_sample", {"text": SAFE_EXAMPLE}, [clip(3, 32, 32)]),
        P.Request(3, "check_sample", {"text": BLOCKED_PHRASE}, [clip(2, 32, 32)]),
        P.Request(4, "check_video", {}, [clip(1, 48, 64)]),
        P.Request(5, "check_video", {}, [clip(5, 32, 32)]),
        P.Request(6, "check_sample", {"text": "a red ball rolls left"}, []),
    ]


def _answers(endpoint, requests):
    """Each request's reply header (id aside) and buffers, as bytes, all sent at once (so they batch)."""
    ctx, sock = _dealer(endpoint)
    try:
        for req in requests:
            sock.send_multipart(P.encode_request(req))
        out = {}
        while len(out) < len(requests):
            assert sock.poll(120_000), "no reply"
            tag, header, *buffers = sock.recv_multipart()
            head = msgpack.unpackb(header)
            out[head.pop("id")] = (head, buffers)
        return out
    finally:
        sock.close()
        ctx.term()


def test_verdicts_and_sanitized_frames_are_byte_equal_to_a_single_workers(fleet, tiny_safety_worker_faces):
    requests = _requests()
    single, fleet_answers = _answers(tiny_safety_worker_faces.endpoint, requests), _answers(fleet.endpoint, requests)
    assert fleet_answers == single
    assert single[2][0]["result"]["safe"] is True and single[2][1][0] != requests[1].arrays[0].tobytes()  # pixelated
    assert [v["safe"] for v in single[1][0]["result"]["verdicts"]] == [True, False, True, False]


def test_the_front_holds_no_guard_and_every_replica_holds_it_with_grad_off(fleet):
    with SafetyClient(fleet.endpoint, timeout=60) as c:
        hello, stats = c.hello(), c.stats()
    assert stats["fleet"]["front"]["pid"] == fleet.pid == hello["pid"]
    front = stats["fleet"]["front"]
    assert front["modules_loaded"]["cosmos_guardrail"] is False and front["modules_loaded"]["retinaface"] is False
    assert front["grad_enabled"] is not False  # None: torch never imported there
    roster = stats["fleet"]["roster"]
    assert len(roster) == 2 and all(r["pid"] != fleet.pid for r in roster)
    assert all(r["grad_enabled"] is False and r["guard_loaded"] is True and r["theworld_loaded"] is False for r in roster)
    assert hello["grad_enabled"] is False and hello["modules_loaded"]["cosmos_guardrail"] is True  # the replicas'
    assert hello["fleet"]["engine"] == "ray-serve" and hello["fleet"]["target"] == {"min": 2, "max": 2}
    assert hello["fleet"]["replicas"] == 2


def test_the_fleet_shares_the_load_and_says_so_in_stats_and_metrics(fleet):
    import urllib.request

    rng = np.random.default_rng(2)
    with SafetyClient(fleet.endpoint, timeout=120) as c:
        futures = [c.submit_sample(f"{SAFE_EXAMPLE} {i}", rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8))
                   for i in range(48)]
        assert all(f.result().safe for f in futures)
        time.sleep(2.5)  # the replicas report their load every second
        stats = c.stats()
        metrics_url = c.hello()["metrics_url"]
    checks = [r["load"]["checks"] for r in stats["fleet"]["roster"]]
    assert sum(checks) >= 48 and min(checks) > 0, checks  # both replicas checked
    with urllib.request.urlopen(metrics_url, timeout=10) as r:
        text = r.read().decode()
    assert "safety_worker_fleet_replicas 2.0" in text and 'safety_worker_checks_total{replica="' in text


def test_a_replica_killed_under_load_is_restarted_and_every_request_is_answered_once_checked(fleet):
    rng = np.random.default_rng(3)
    videos = [rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8) for _ in range(120)]
    with SafetyClient(fleet.endpoint, timeout=60) as c:
        before = c.stats()
    victim = before["fleet"]["roster"][0]["pid"]
    ctx, sock = _dealer(fleet.endpoint)
    try:
        for i, video in enumerate(videos):
            sock.send_multipart(P.encode_request(P.Request(1000 + i, "check_sample", {"text": SAFE_EXAMPLE}, [video])))
        assert sock.poll(60_000)
        replies = [P.decode_reply(sock.recv_multipart(copy=False))]
        os.kill(victim, signal.SIGKILL)
        while len(replies) < len(videos):
            assert sock.poll(180_000), f"{len(videos) - len(replies)} requests unanswered after the kill"
            replies.append(P.decode_reply(sock.recv_multipart(copy=False)))
        assert not sock.poll(3_000), "a request was answered twice"
    finally:
        sock.close()
        ctx.term()
    assert sorted(r.id for r in replies) == [1000 + i for i in range(len(videos))]  # each exactly once
    for reply in replies:
        assert reply.status == "ok", reply.error  # resent to a live replica, not failed
        verdict = P.Verdict.from_wire(reply.result, reply.arrays[0] if reply.arrays else None)
        assert verdict.safe and not verdict.fault
        assert verdict.frames.shape == videos[reply.id - 1000].shape
        assert not np.array_equal(verdict.frames, videos[reply.id - 1000])  # through the guard: pixelated
    deadline = time.monotonic() + 120
    with SafetyClient(fleet.endpoint, timeout=60) as c:
        while True:
            proxy = c.stats()["proxy"]
            if proxy["replicas"] == 2 and victim not in proxy["replica_pids"]:
                break
            assert time.monotonic() < deadline, f"the killed replica was not replaced: {proxy}"
            time.sleep(0.5)
        assert proxy["replicas_lost"] >= 1 and proxy["replicas_started"] >= 3 and proxy["failed"] == 0
        assert c.check_text(BLOCKED_PHRASE).safe is False


def test_a_training_run_attached_to_the_fleet_loses_nothing_when_a_replica_is_killed(fleet, tiny_models, tmp_path):
    """The trainer's safety filter on the fleet; a replica killed with SIGKILL once the run is checking: every
    sample is still trained, blocked or ledgered (exact accounting), none is an error."""
    import threading

    from test_train import run_in_process

    with SafetyClient(fleet.endpoint, timeout=60) as c:
        before = c.stats()
    victim = before["fleet"]["roster"][0]["pid"]
    killed = threading.Event()

    def kill_once_checking():
        with SafetyClient(fleet.endpoint, timeout=60) as watcher:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if watcher.stats()["proxy"]["dispatched"][0] > before["proxy"]["dispatched"][0] + 2:
                    os.kill(victim, signal.SIGKILL)
                    killed.set()
                    return
                time.sleep(0.05)

    killer = threading.Thread(target=kill_once_checking, daemon=True)
    killer.start()
    summary = run_in_process(tmp_path / "run", tiny_models, fleet.endpoint, "--max-steps", "4")
    killer.join(5)
    assert killed.is_set(), "the run ended before a replica could be killed"
    assert summary["trainer_grad_enabled"] and summary["accounting_holds"]
    assert summary["seen"] == summary["trained"] + summary["blocked"] + summary["errors"] and summary["trained"] > 0
    assert summary["errors"] == 0  # the checks the dead replica owed were resent, not failed


def test_the_owner_stops_the_fleet_and_its_replicas_with_it(fleet):
    """Last in this module: it stops the module's fleet."""
    with SafetyClient(fleet.endpoint, timeout=60) as c:
        replica_pids = c.stats()["proxy"]["replica_pids"]
        assert c.shutdown(fleet.owner_token) == {"stopping": True}
    assert fleet.proc.wait(60) == 0
    deadline = time.monotonic() + 30
    while any(_running(pid) for pid in replica_pids):
        assert time.monotonic() < deadline, "replicas outlived their fleet"
        time.sleep(0.5)


def _running(pid: int) -> bool:
    """Alive and not a zombie (a replica whose raylet is gone may wait unreaped in a container)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
