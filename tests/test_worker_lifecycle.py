"""Worker lifecycle and defences: bounded queue, deadlines, SIGTERM drain, owner-only shutdown,
ipc endpoint protection, and the command line."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zmq
from PIL import Image

from safety_worker import SafetyClient, WorkerError, spawn_worker
from safety_worker import protocol as P
from safety_worker.tiny import BLOCKED_PHRASE, SAFE_EXAMPLE

from fixtures_worker import REPO_ROOT

ENV = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
SLOW_VIDEO = np.random.default_rng(0).integers(0, 256, (8, 224, 224, 3), dtype=np.uint8)  # ~1 s of checking here


def _cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "safety_worker", *args], capture_output=True, text=True,
                          env=ENV, timeout=timeout, cwd=str(REPO_ROOT))


@pytest.fixture(scope="module")
def small_queue_worker(spawn_tiny_worker):
    # --max-batch-frames 8: a batch holds exactly one SLOW_VIDEO, so "running + queued" is 1 + 2 checks.
    worker = spawn_tiny_worker("all", "--queue-size", "2", "--max-message-bytes", str(2 * 2**20), "--max-batch-frames", "8")
    yield worker
    worker.stop()


def test_full_queue_answers_busy_at_once(small_queue_worker):
    # busy_retries=0: see the raw `busy` (by default the client retries it with backoff).
    with SafetyClient(small_queue_worker.endpoint, timeout=60, busy_retries=0) as c:
        futures = [c.submit_video(SLOW_VIDEO) for _ in range(6)]
        outcomes = []
        for f in futures:
            try:
                outcomes.append(f.result().safe)
            except WorkerError as e:
                outcomes.append(e.code)
    assert outcomes.count("busy") >= 3 and outcomes[0] is True, outcomes


def test_busy_answers_are_retried_until_every_check_is_answered(small_queue_worker):
    """A burst against the full queue gets `busy` at first; the client's Lazy Pirate resends get every check
    answered (the rules themselves: test_client_retries.py)."""
    clip = np.random.default_rng(1).integers(0, 256, (4, 96, 96, 3), dtype=np.uint8)
    with SafetyClient(small_queue_worker.endpoint, timeout=120, busy_retries=None) as client:  # as the trainer's
        busy_before = client.stats()["errors"].get("busy", 0)
        verdicts = [f.result(timeout=120) for f in [client.submit_video(clip) for _ in range(8)]]
        assert all(v.safe and v.frames.shape == clip.shape for v in verdicts)
        assert client.resends > 0 and client.stats()["errors"].get("busy", 0) > busy_before


def test_request_past_its_deadline_is_skipped_not_computed(small_queue_worker):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(small_queue_worker.endpoint)
    try:
        sock.send_multipart(P.encode_request(P.Request(id=1, op="check_video", arrays=[SLOW_VIDEO])))
        sock.send_multipart(P.encode_request(P.Request(id=2, op="check_text", args={"texts": [SAFE_EXAMPLE]}, timeout_ms=1)))
        replies = {}
        while len(replies) < 2:
            assert sock.poll(30_000)
            r = P.decode_reply(sock.recv_multipart(copy=False))
            replies[r.id] = r
    finally:
        sock.close(linger=0)
        ctx.term()
    assert replies[1].status == "ok" and replies[1].result["safe"]
    assert replies[2].status == "error" and replies[2].error["code"] == "deadline_exceeded"


def test_oversize_frame_disconnects_the_peer_and_the_worker_keeps_serving(small_queue_worker):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(small_queue_worker.endpoint)
    try:
        big = np.zeros((4, 512, 512, 3), np.uint8)  # 3 MiB > --max-message-bytes 2 MiB
        sock.send_multipart(P.encode_request(P.Request(id=1, op="echo", arrays=[big])))
        assert sock.poll(1500) == 0  # dropped by ZeroMQ, no reply
    finally:
        sock.close(linger=0)
        ctx.term()
    with SafetyClient(small_queue_worker.endpoint, timeout=30) as c:
        assert c.ping()["instance_id"]


def test_sigterm_drains_queued_checks_refuses_new_ones_and_exits_0(small_queue_worker):
    with SafetyClient(small_queue_worker.endpoint, timeout=60) as c:
        before = c.stats()["requests"].get("check_video", 0)
        queued = [c.submit_video(SLOW_VIDEO) for _ in range(2)]
        assert c.stats()["requests"]["check_video"] == before + 2  # replies keep order: both are queued now
        small_queue_worker.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while True:  # the signal is noticed within one poll interval; then new requests are refused
            try:
                c.ping()
            except WorkerError as e:
                assert e.code == "shutting_down"
                break
            assert time.monotonic() < deadline, "worker never started refusing requests after SIGTERM"
            time.sleep(0.01)
        assert all(f.result().safe for f in queued)
    assert small_queue_worker.proc.wait(30) == 0


@pytest.fixture(scope="module")
def own_worker(spawn_tiny_worker):
    worker = spawn_tiny_worker("none")
    yield worker
    worker.stop()


def test_second_worker_cannot_steal_a_bound_ipc_path(own_worker, tiny_guardrail_root):
    r = _cli("serve", "--endpoint", own_worker.endpoint, "--tiny-dir", str(tiny_guardrail_root))
    assert r.returncode == 2 and "another safety worker" in r.stderr and str(own_worker.pid) in r.stderr
    with SafetyClient(own_worker.endpoint, timeout=10) as c:
        assert c.hello()["pid"] == own_worker.pid


def test_only_the_owner_can_shut_the_worker_down(own_worker):
    with SafetyClient(own_worker.endpoint, timeout=10) as c:
        with pytest.raises(WorkerError) as err:
            c.shutdown("not-the-token")
        assert err.value.code == "forbidden"
        assert c.shutdown(own_worker.owner_token) == {"stopping": True}
    assert own_worker.proc.wait(30) == 0


def test_ipc_directory_must_be_private(tmp_path, tiny_guardrail_root):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    r = _cli("serve", "--endpoint", f"ipc://{shared}/w.sock", "--tiny-dir", str(tiny_guardrail_root))
    assert r.returncode == 2 and "not private" in r.stderr and "chmod 700" in r.stderr
    assert "omit --endpoint" not in r.stderr  # --endpoint is required: the advice must be one the user can take
    assert f"ipc://{shared}/safety-worker/worker.sock" in r.stderr


def test_tcp_endpoint_requires_explicit_insecure(tiny_guardrail_root):
    r = _cli("serve", "--endpoint", "tcp://127.0.0.1:5999", "--tiny-dir", str(tiny_guardrail_root))
    assert r.returncode == 2 and "--insecure" in r.stderr


def test_cli_check_text_exit_codes(tiny_safety_worker):
    safe = _cli("check", "--endpoint", tiny_safety_worker.endpoint, "--text", SAFE_EXAMPLE)
    assert safe.returncode == 0 and json.loads(safe.stdout)["safe"] is True
    blocked = _cli("check", "--endpoint", tiny_safety_worker.endpoint, "--text", f"{BLOCKED_PHRASE} now")
    assert blocked.returncode == 1 and json.loads(blocked.stdout)["safe"] is False


def test_cli_check_image_writes_the_pixelated_image(tiny_safety_worker_faces, tmp_path):
    src, out = tmp_path / "in.png", tmp_path / "out.png"
    image = np.random.default_rng(5).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(image).save(src)
    r = _cli("check", "--endpoint", tiny_safety_worker_faces.endpoint, "--image", str(src), "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["shape"] == [1, 48, 64, 3]
    written = np.asarray(Image.open(out))
    assert written.shape == image.shape and (written != image).any()


def test_cli_check_video_writes_the_pixelated_video(tiny_safety_worker_faces, tmp_path):
    import imageio.v3 as iio

    src, out = tmp_path / "in.mp4", tmp_path / "out.mp4"
    iio.imwrite(src, np.random.default_rng(6).integers(0, 256, (4, 64, 96, 3), dtype=np.uint8), fps=8)
    r = _cli("check", "--endpoint", tiny_safety_worker_faces.endpoint, "--video", str(src), "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["shape"] == [4, 64, 96, 3]
    assert iio.imread(out).shape == (4, 64, 96, 3) and iio.immeta(out)["fps"] == 8


def test_cli_status_and_unreachable_worker(tiny_safety_worker, tmp_path):
    r = _cli("status", "--endpoint", tiny_safety_worker.endpoint)
    assert r.returncode == 0 and json.loads(r.stdout)["hello"]["pid"] == tiny_safety_worker.pid
    dead = _cli("check", "--endpoint", f"ipc://{tmp_path}/nobody.sock", "--text", "x", "--timeout", "1")
    assert dead.returncode == 2 and "WorkerTimeout" in json.loads(dead.stdout)["error"]


def test_help_documents_every_subcommand():
    for sub in ("serve", "check", "status"):
        r = _cli(sub, "--help")
        assert r.returncode == 0 and "--endpoint" in r.stdout


ORPHAN_PARENT = """
import sys, time
from safety_worker import spawn_worker
w = spawn_worker(extra_args=["--tiny-dir", sys.argv[1]])
print(w.pid, flush=True)
time.sleep(600)
"""


def _alive(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\tZ" not in next(line for line in f if line.startswith("State:"))
    except FileNotFoundError:
        return False


def test_worker_exits_when_its_parent_is_killed(tiny_guardrail_root):
    parent = subprocess.Popen([sys.executable, "-c", ORPHAN_PARENT, str(tiny_guardrail_root)], stdout=subprocess.PIPE,
                              text=True, env=ENV)
    worker_pid = int(parent.stdout.readline())
    assert _alive(worker_pid)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 20
    while _alive(worker_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(worker_pid)


def test_readme_safety_worker_example_runs(tiny_guardrail_root, monkeypatch, capsys):
    import re

    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("<!-- section: safety-worker -->")[1].split("<!-- /section: safety-worker -->")[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.setenv("SAFETY_WORKER_TINY_DIR", str(tiny_guardrail_root))  # already built: reused
    exec(compile(code, "README.md#safety-worker", "exec"), {})
    assert capsys.readouterr().out.splitlines() == ["[(True, None), (False, 'text')]", "[True, True]"]


def test_a_request_made_while_the_worker_is_down_is_sent_once_it_is_back(tiny_guardrail_root, tmp_path):
    args = ["--tiny-dir", str(tiny_guardrail_root), "--tiny-faces", "none"]
    endpoint = f"ipc://{tmp_path}/worker.sock"
    with SafetyClient(endpoint, timeout=120) as client:
        with spawn_worker(endpoint=endpoint, extra_args=args, restarts=0):
            assert client.ping()
        deadline = time.monotonic() + 30
        while not client._disconnected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client._disconnected, "the client never saw the worker go away"
        fut = client.submit_sample(SAFE_EXAMPLE)  # no worker connected: must wait, not fail
        time.sleep(0.3)
        assert not fut.done()
        with spawn_worker(endpoint=endpoint, extra_args=args, restarts=0):
            assert fut.result(timeout=120).safe
