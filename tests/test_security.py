"""CURVE on tcp://: only clients whose public key the worker authorized get an answer.

(The ipc defences — 0700 directory, lock against a second `serve`, owner-only shutdown, size cap,
prompts kept out of logs — are tested in tests/test_worker_lifecycle.py and tests/test_worker.py.)
"""
import json
import os
import selectors
import socket
import subprocess
import sys

import pytest
import zmq

from safety_worker import SafetyClient, WorkerDead, WorkerTimeout
from safety_worker.security import server_public_key
from safety_worker.tiny import BLOCKED_PHRASE, SAFE_EXAMPLE

from fixtures_worker import REPO_ROOT

ENV = dict(os.environ, PYTHONPATH=str(REPO_ROOT))


def _cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "safety_worker", *args], capture_output=True, text=True,
                          env=ENV, timeout=timeout, cwd=str(REPO_ROOT))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("curve")
    good, other = root / "good", root / "other"
    for d in (good, other):
        r = _cli("keys", str(d))
        assert r.returncode == 0, r.stderr
    assert (good / "server.key_secret").stat().st_mode & 0o777 == 0o600
    assert good.stat().st_mode & 0o777 == 0o700
    return good, other


@pytest.fixture(scope="module")
def curve_worker(keys, tiny_guardrail_root, tmp_path_factory):
    good, _ = keys
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    log = tmp_path_factory.mktemp("curve-log") / "worker.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "safety_worker", "serve", "--endpoint", endpoint,
                                 "--curve-dir", str(good), "--tiny-dir", str(tiny_guardrail_root)],
                                stdout=subprocess.PIPE, stderr=err, env=ENV, cwd=str(REPO_ROOT))
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    assert sel.select(timeout=120), log.read_text()
    line = proc.stdout.readline().decode()
    assert "safety-worker ready" in line, log.read_text()
    yield endpoint
    proc.terminate()
    assert proc.wait(timeout=30) == 0
    proc.stdout.close()


def test_authorized_client_gets_verdicts(curve_worker, keys):
    good, _ = keys
    with SafetyClient(curve_worker, timeout=30, curve_server_key=server_public_key(good), curve_keys_dir=str(good)) as c:
        assert c.check_text(BLOCKED_PHRASE).safe is False
        assert c.check_text(SAFE_EXAMPLE).safe is True
    r = _cli("status", "--endpoint", curve_worker, "--curve-dir", str(good))
    assert r.returncode == 0 and json.loads(r.stdout)["hello"]["endpoint"] == curve_worker


@pytest.mark.parametrize("who", ["unauthorized client key", "wrong server key", "no CURVE at all"])
def test_client_without_the_right_keys_gets_no_answer(curve_worker, keys, who):
    good, other = keys
    kwargs = {
        "unauthorized client key": {"curve_server_key": server_public_key(good), "curve_keys_dir": str(other)},
        "wrong server key": {"curve_server_key": server_public_key(other), "curve_keys_dir": str(good)},
        "no CURVE at all": {},
    }[who]
    with SafetyClient(curve_worker, timeout=2.0, heartbeat=0.2, dead_after=1.5, **kwargs) as c:
        with pytest.raises((WorkerTimeout, WorkerDead)):
            c.check_text(SAFE_EXAMPLE)
    # The worker is still there for the right client.
    with SafetyClient(curve_worker, timeout=30, curve_server_key=server_public_key(good), curve_keys_dir=str(good)) as c:
        assert c.ping()


def test_raw_plaintext_peer_cannot_talk_to_a_curve_worker(curve_worker):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    # A DEALER with no peer blocks on send. When the worker refuses the plaintext handshake before the send,
    # the pipe is gone and the send would hang for ever (seen in CI): give it a deadline; "could not even
    # queue the request" is the same outcome as "no answer".
    sock.setsockopt(zmq.SNDTIMEO, 1500)
    sock.connect(curve_worker)
    try:
        try:
            sock.send_multipart([b"SWKR\x01", b"\x80"])
        except zmq.Again:
            return
        assert sock.poll(1500) == 0
    finally:
        sock.close()
        ctx.term()


def test_tcp_serve_refuses_without_keys_or_insecure_and_bad_key_dirs(tmp_path, tiny_guardrail_root):
    port = _free_port()
    r = _cli("serve", "--endpoint", f"tcp://127.0.0.1:{port}", "--tiny-dir", str(tiny_guardrail_root))
    assert r.returncode == 2 and "--curve-dir" in r.stderr and "--insecure" in r.stderr
    assert _cli("keys", str(tmp_path / "k")).returncode == 0
    secret = tmp_path / "k" / "server.key_secret"
    secret.chmod(0o644)
    r = _cli("serve", "--endpoint", f"tcp://127.0.0.1:{port}", "--curve-dir", str(tmp_path / "k"),
             "--tiny-dir", str(tiny_guardrail_root))
    assert r.returncode == 2 and "chmod 600" in r.stderr
    secret.chmod(0o600)
    for key in (tmp_path / "k" / "authorized").iterdir():
        key.unlink()
    r = _cli("serve", "--endpoint", f"tcp://127.0.0.1:{port}", "--curve-dir", str(tmp_path / "k"),
             "--tiny-dir", str(tiny_guardrail_root))
    assert r.returncode == 2 and "no client public key" in r.stderr
