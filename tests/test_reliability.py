"""Liveness under faults: kill -9, hangs (SIGSTOP). (Busy retries: test_worker_lifecycle.py against a real
full queue, test_client_retries.py for the client's rules.)

Every worker here is a real `python -m safety_worker serve` subprocess on the tiny guardrail; faults
are real signals. Nothing is mocked.
"""
import os
import signal
import time

import numpy as np
import pytest

from safety_worker import SafetyClient, WorkerDead, WorkerTimeout, spawn_worker
from safety_worker.tiny import BLOCKED_PHRASE, SAFE_EXAMPLE

FRAMES = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)


def _spawn(root, *extra, **kwargs):
    return spawn_worker(preset="tiny", extra_args=["--tiny-dir", str(root), *extra], **kwargs)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_until(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_kill9_mid_flight_restarts_worker_and_resends_every_request(tiny_guardrail_root):
    """A spawned worker killed -9 with requests in flight: the supervisor restarts it on the same
    endpoint, the client resends what it was owed, every request gets its correct verdict."""
    with _spawn(tiny_guardrail_root, "--tiny-faces", "none") as worker, \
            SafetyClient(worker.endpoint, timeout=120, dead_after=90) as client:
        first_pid = worker.pid
        texts = [BLOCKED_PHRASE if i % 3 == 0 else f"{SAFE_EXAMPLE} {i}" for i in range(60)]
        futures = [client.submit_sample(t, FRAMES) for t in texts]
        futures[0].result(timeout=60)  # the worker is busy with the batch now
        os.kill(first_pid, signal.SIGKILL)
        verdicts = [f.result(timeout=120) for f in futures]
        assert [v.safe for v in verdicts] == [i % 3 != 0 for i in range(60)]
        assert all(v.frames.shape == FRAMES.shape for v in verdicts if v.safe)
        assert worker.pid != first_pid and worker.supervisor.restarted == 1
        assert client.resends > 0, "nothing was resent: the kill came too late to test anything"
        assert client.check_text(BLOCKED_PHRASE).safe is False  # and it keeps working
        # A clean exit (owner shutdown drains, exits 0) is not "restarted".
        assert client.shutdown(worker.owner_token)["stopping"]
        _wait_until(lambda: worker.proc.poll() is not None, 30, "the owner shutdown")
        time.sleep(1.0)
        assert worker.proc.returncode == 0 and worker.supervisor.restarted == 1


def test_hung_worker_fails_closed_then_supervisor_restarts_it_within_its_budget(tiny_guardrail_root):
    """SIGSTOP freezes the whole worker (a hang no in-process timer can answer): a client with a short
    deadline gets WorkerDead (never a verdict); the supervisor's ping times out, it kills and restarts
    the worker, and a new client works."""
    worker = _spawn(tiny_guardrail_root, restarts=1, hang_timeout=2.0)
    worker.supervisor.ping_every = 1.0
    try:
        hung_pid = worker.pid
        os.kill(hung_pid, signal.SIGSTOP)
        with SafetyClient(worker.endpoint, timeout=30, heartbeat=0.2, dead_after=1.5) as client:
            start = time.monotonic()
            with pytest.raises(WorkerDead, match="did not answer"):
                client.check_sample(BLOCKED_PHRASE, FRAMES)
            assert time.monotonic() - start < 10  # dead_after, not the 30 s request timeout
            # Dead is final for this client: every later call fails at once, none is answered "safe".
            for call in (client.ping, lambda: client.check_text(SAFE_EXAMPLE), lambda: client.submit_sample("x", FRAMES)):
                with pytest.raises(WorkerDead):
                    call()
        with SafetyClient(worker.endpoint, timeout=0.5, heartbeat=None, dead_after=None) as client:
            with pytest.raises(WorkerTimeout, match="no reply"):  # plain deadline: a clear error, no verdict
                client.check_text(SAFE_EXAMPLE)
        _wait_until(lambda: worker.supervisor.restarted == 1, 120, "the supervisor to restart the hung worker")
        assert worker.pid != hung_pid and not _alive(hung_pid)
        with SafetyClient(worker.endpoint, timeout=60) as client:
            assert client.check_text(BLOCKED_PHRASE).safe is False
        # The restart budget (1) is spent: the next death is final, and the supervisor says so.
        os.kill(worker.pid, signal.SIGKILL)
        _wait_until(lambda: worker.supervisor.gave_up is not None, 30, "the supervisor to give up")
        assert "no restarts left" in worker.supervisor.gave_up
    finally:
        worker.stop(timeout=5)
