"""`python -m theworld.serve --ray --model-replicas N`: the same API through Ray Serve's ingress, the model a
deployment of replicas, the safety worker in front as without Ray.

The flag tests are quick. The rest are `long`: one server on a local Ray of 2 CPUs with two model replicas
and the demo (~30-70 s to start on 2 cores) and one plain server without it, both attached to the session's tiny worker, serve the
module; it compares their answers, reads `/ready`, and kills a model replica with SIGKILL under load.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

from safety_worker import SafetyClient
from safety_worker.tiny import BLOCKED_PHRASE
from test_serve import chat, metric, scene, serving

RAY_FLAGS = ["--ray", "--num-cpus", "2", "--model-replicas", "2"]
FLAGS = ["--served-model-name", "theworld-tiny", "--batch-wait-ms", "100", "--request-timeout", "120"]


# ------------------------------------------------------------------------------------------- the flags


def _refused(capsys, *argv: str) -> str:
    from theworld.serve import main

    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    assert exited.value.code == 2
    return capsys.readouterr().err


def test_help_documents_the_ray_flags(capsys):
    from theworld.serve import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps at the terminal's width
    for flag in ("--ray [ADDRESS]", "--model-replicas N|MIN,MAX", "--num-cpus", "--model-replica-cpus",
                 "--model-replica-gpus"):
        assert flag in text
    assert "Ray Serve" in text and "ray start --head" in text


@pytest.mark.parametrize("argv, says", [
    (["--model-replicas", "2"], "--model-replicas apply to a Ray Serve deployment only: add --ray"),
    (["--num-cpus", "2", "--model-replica-gpus", "1"], "--num-cpus, --model-replica-gpus apply to a Ray Serve"),
    (["--ray", "--model-replicas", "0"], "--model-replicas must be N or MIN,MAX with 1 <= MIN <= MAX, got '0'"),
    (["--ray", "--model-replicas", "3,2"], "got '3,2'"),
    (["--ray", "--model-replicas", "two"], "got 'two'"),
    (["--ray", "HEAD:6379", "--num-cpus", "2"], "--num-cpus sizes a local Ray"),
    (["--ray", "--model-replica-cpus", "-1"], "--model-replica-cpus must be >= 0"),
])
def test_ray_flags_are_checked_before_anything_starts(capsys, argv, says):
    assert says in _refused(capsys, *argv)


def test_ray_flags_parse_to_replica_bounds():
    from theworld.serve import _validate, build_parser

    parser = build_parser()
    for given, bounds in ((["--ray"], (1, 1)), (["--ray", "--model-replicas", "3"], (3, 3)),
                          (["--ray", "auto", "--model-replicas", "1,4"], (1, 4))):
        args = parser.parse_args(given)
        _validate(parser, args)
        assert args.model_replicas == bounds and args.model_replica_cpus == 1.0 and args.model_replica_gpus == 0.0
    args = parser.parse_args(["--ray", "HEAD:6379"])
    assert args.ray == "HEAD:6379" and parser.parse_args(["--ray"]).ray == "local"
    plain = parser.parse_args([])
    _validate(parser, plain)
    assert plain.ray is None and plain.model_replicas is None  # without --ray nothing changes


# ------------------------------------------------------------------------------------------- the servers


@pytest.fixture(scope="module")
def ray_server(tiny_models, tiny_safety_worker):
    gemma_dir, cosmos_dir = tiny_models
    with serving("--model", str(gemma_dir), "--cosmos", str(cosmos_dir), "--safety-endpoint",
                 tiny_safety_worker.endpoint, *FLAGS, *RAY_FLAGS) as url:  # with the demo
        yield url


@pytest.fixture(scope="module")
def plain_server(tiny_models, tiny_safety_worker):
    gemma_dir, cosmos_dir = tiny_models
    with serving("--model", str(gemma_dir), "--cosmos", str(cosmos_dir), "--safety-endpoint",
                 tiny_safety_worker.endpoint, *FLAGS, "--no-demo") as url:
        yield url


@pytest.mark.long
def test_the_ray_served_api_answers_as_the_plain_server(ray_server, plain_server):
    requests = [chat(), chat("Which way does it move?", [scene(seed) for seed in range(5)]),
                {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 6, "temperature": 0},
                chat(temperature=1.0, seed=1234, max_tokens=12)]
    with httpx.Client(base_url=ray_server, timeout=120) as ray, httpx.Client(base_url=plain_server, timeout=120) as plain:
        for body in requests:
            ours, theirs = ray.post("/v1/chat/completions", json=body), plain.post("/v1/chat/completions", json=body)
            assert ours.status_code == theirs.status_code == 200, ours.text
            ours, theirs = ours.json(), theirs.json()
            assert ours["choices"] == theirs["choices"] and ours["usage"] == theirs["usage"]
        assert ray.get("/v1/models").json()["data"][0]["id"] == plain.get("/v1/models").json()["data"][0]["id"]
        blocked = ray.post("/v1/chat/completions", json=chat(BLOCKED_PHRASE))
        assert blocked.status_code == 400 and blocked.json()["error"]["stage"] == "prompt"  # the guard in front
        bad = ray.post("/v1/chat/completions", json=chat(max_tokens="ten"))
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_type"  # the same validation


@pytest.mark.long
def test_the_demo_page_is_served_through_the_ingress(ray_server):
    with httpx.Client(base_url=ray_server, timeout=60) as api:
        page = api.get("/")
    assert page.status_code == 200 and "gradio" in page.text.lower()


@pytest.mark.long
def test_ready_reports_the_safety_worker_and_the_model_replicas(ray_server, tiny_safety_worker):
    with httpx.Client(base_url=ray_server, timeout=60) as api:
        ready = api.get("/ready")
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["status"] == "ready" and body["model"] == "theworld-tiny"
    assert body["safety_worker"]["pid"] == tiny_safety_worker.pid
    deployment = body["model_deployment"]
    assert deployment["engine"] == "ray-serve" and deployment["replicas"] == 2
    assert len(set(deployment["replica_pids"])) == 2 and os.getpid() not in deployment["replica_pids"]
    assert deployment["guard_loaded"] == {"ingress": False, "replicas": [False, False]}


@pytest.mark.long
def test_concurrent_requests_are_batched_inside_a_replica(ray_server):
    with httpx.Client(base_url=ray_server, timeout=120) as api:
        before = api.get("/metrics").text
        statuses = _ask_concurrently(ray_server, [chat(images=[scene(seed)], max_tokens=8) for seed in range(8)])
        after = api.get("/metrics").text
    assert [s for s, _ in statuses] == [200] * 8
    batches = metric(after, "theworld_serve_batch_size_count") - metric(before, "theworld_serve_batch_size_count")
    rows = metric(after, "theworld_serve_batch_size_sum") - metric(before, "theworld_serve_batch_size_sum")
    assert rows == 8 and batches < 8, f"8 concurrent requests ran as {batches:g} batches"


def _ask_concurrently(url: str, bodies: list[dict], clients: int = 8, on_answer=None) -> list[tuple[int, dict]]:
    """`(status, body)` of each request, in order, asked by `clients` threads; `on_answer()` after each."""
    answers: list = [None] * len(bodies)

    def client(indices):
        with httpx.Client(base_url=url, timeout=180) as http:
            for i in indices:
                response = http.post("/v1/chat/completions", json=bodies[i])
                answers[i] = (response.status_code, response.json())
                if on_answer:
                    on_answer()

    threads = [threading.Thread(target=client, args=(range(c, len(bodies), clients),)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert all(a is not None for a in answers), "a request got no answer"
    return answers


@pytest.mark.long
def test_a_model_replica_killed_under_load_every_request_gets_one_checked_answer(ray_server, tiny_safety_worker):
    """SIGKILL one of two model replicas while 8 clients ask: each request is answered once, 200 (resent to a
    live replica: the same greedy answer) or a clear 503; blocked prompts stay blocked; every answer returned
    was checked by the worker; Serve replaces the replica."""
    with httpx.Client(base_url=ray_server, timeout=60) as api:
        victim = api.get("/ready").json()["model_deployment"]["replica_pids"][0]
        expected = {seed: api.post("/v1/chat/completions", json=chat(images=[scene(seed)], max_tokens=16)).json()
                    ["choices"][0]["message"]["content"] for seed in range(4)}
    with SafetyClient(tiny_safety_worker.endpoint, timeout=60) as c:
        checked_before = c.stats()["requests"].get("check_text", 0)
    bodies = [chat(BLOCKED_PHRASE) if i % 8 == 7 else chat(images=[scene(i % 4)], max_tokens=16) for i in range(48)]
    answered, killed, lock = [0], threading.Event(), threading.Lock()

    def kill_after_a_few():
        with lock:
            answered[0] += 1
            if answered[0] == 4:
                os.kill(victim, signal.SIGKILL)
                killed.set()

    answers = _ask_concurrently(ray_server, bodies, on_answer=kill_after_a_few)
    assert killed.is_set()
    served = 0
    for i, (status, body) in enumerate(answers):
        if i % 8 == 7:
            assert status == 400 and body["error"]["code"] == "content_blocked", body
        elif status == 200:
            served += 1
            assert body["choices"][0]["message"]["content"] == expected[i % 4]
        else:
            assert status == 503 and body["error"]["code"] in ("model_unavailable", "timeout"), body
    assert served >= len(bodies) // 2, f"only {served} of {len(bodies)} answered"
    with SafetyClient(tiny_safety_worker.endpoint, timeout=60) as c:
        checked = c.stats()["requests"].get("check_text", 0) - checked_before
    assert checked >= served  # every answer returned went through check_text first
    deadline = time.monotonic() + 180
    with httpx.Client(base_url=ray_server, timeout=60) as api:
        while True:
            ready = api.get("/ready")
            deployment = ready.json().get("model_deployment", {}) if ready.status_code == 200 else {}
            if deployment.get("replicas") == 2 and victim not in deployment["replica_pids"]:
                break
            assert time.monotonic() < deadline, f"the killed replica was not replaced: {ready.text}"
            time.sleep(1)
        assert deployment["replicas_lost"] >= 1 and deployment["replicas_started"] >= 3
        unavailable = sum(1 for status, _ in answers if status == 503)
        assert deployment["resent"] + unavailable >= 1, "the killed replica owed nothing: the fault was not exercised"
        again = api.post("/v1/chat/completions", json=chat(images=[scene(0)], max_tokens=16))
        assert again.status_code == 200 and again.json()["choices"][0]["message"]["content"] == expected[0]
