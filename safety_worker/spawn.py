"""spawn_worker: start `python -m safety_worker serve` as a child process and wait until it answers."""
from __future__ import annotations

import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path
from typing import Sequence

from . import protocol as P
from .client import SafetyClient
from .liveness import HANG_TIMEOUT_S, Supervisor

READY_PREFIX = "safety-worker ready"
_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)


class WorkerStartFailed(RuntimeError):
    """The child worker exited or did not become ready in time (the message has its log tail)."""


class WorkerProcess:
    """A running child worker. `.endpoint`, `.pid`, `.hello` (its handshake), `.log_path`; `.stop()`.

    `.supervisor` (a `safety_worker.liveness.Supervisor`, or None) restarts it on the same endpoint
    if it dies or hangs; `.restart()` does that once."""

    def __init__(self, proc: subprocess.Popen, endpoint: str, owner_token: str, rundir: str, log_path: str,
                 cmd: Sequence[str] = (), env: dict | None = None, startup_timeout: float = 180.0):
        self._procs = [proc]  # shared with the finalizer, which must stop whichever process is current
        self.endpoint = endpoint
        self.owner_token = owner_token
        self.log_path = log_path
        self.hello: dict = {}
        self.client_kwargs: dict = {}  # e.g. CURVE keys, for the supervisor's pings
        self.supervisor = None
        self._cmd, self._env, self._startup_timeout = list(cmd), env, startup_timeout
        self._finalizer = weakref.finalize(self, _stop_current, self._procs, rundir, 10.0)

    @property
    def proc(self) -> subprocess.Popen:
        return self._procs[0]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def client(self, timeout: float = 60.0) -> SafetyClient:
        return SafetyClient(self.endpoint, timeout=timeout, **self.client_kwargs)

    def restart(self) -> None:
        """Kill the current process if it still runs and start the same command on the same endpoint."""
        old = self.proc
        if old.poll() is None:
            old.kill()
        old.wait()
        if old.stdout is not None:
            old.stdout.close()
        with open(self.log_path, "ab") as log:
            proc = subprocess.Popen(self._cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, env=self._env)
        self._procs[0] = proc
        _wait_ready(proc, self._startup_timeout, self.log_path)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (the worker drains in-flight checks and exits 0), SIGKILL after `timeout`."""
        self._finalizer.detach()
        if self.supervisor is not None:
            self.supervisor.stop()
        return _stop_process(self.proc, os.path.dirname(self.log_path), timeout)

    def __enter__(self) -> "WorkerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _stop_current(procs: list, rundir: str, timeout: float) -> int | None:
    return _stop_process(procs[0], rundir, timeout)


def _stop_process(proc: subprocess.Popen, rundir: str, timeout: float) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
    shutil.rmtree(rundir, ignore_errors=True)
    return proc.returncode


def spawn_worker(
    preset: str = "tiny",
    endpoint: str | None = None,
    device: str = "cpu",
    extra_args: Sequence[str] = (),
    startup_timeout: float = 180.0,
    env: dict[str, str] | None = None,
    restarts: int = 3,
    hang_timeout: float = HANG_TIMEOUT_S,
) -> WorkerProcess:
    """Start a safety worker subprocess and return once it has answered `hello`.

    With `endpoint=None` the worker gets an ipc socket in a fresh private (0700) directory. The
    child runs this same copy of `safety_worker` (its parent directory is put first on the child's
    PYTHONPATH). A random owner token is passed through the environment (not argv, which other
    users can read); it lets this process send `shutdown`. The worker's log goes to `.log_path`.
    The worker stops by itself when this process exits, even if it is killed (`--parent-pid`).

    With `restarts > 0` a supervisor thread restarts the worker on the same endpoint when it exits
    abnormally or does not answer a ping within `hang_timeout` seconds, at most `restarts` times
    (clients resend what they were owed).
    """
    rundir = tempfile.mkdtemp(prefix="safety-worker-")  # mode 0700
    endpoint = endpoint or f"ipc://{rundir}/worker.sock"
    token = secrets.token_hex(16)
    child_env = dict(os.environ if env is None else env)
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, child_env.get("PYTHONPATH")) if p)
    child_env[P.OWNER_TOKEN_ENV] = token
    child_env.setdefault("HF_HUB_OFFLINE", "1")
    cmd = [sys.executable, "-m", "safety_worker", "serve", "--endpoint", endpoint, "--preset", preset,
           "--device", device, "--parent-pid", str(os.getpid()), *extra_args]
    log_path = os.path.join(rundir, "worker.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, env=child_env)
    worker = WorkerProcess(proc, endpoint, token, rundir, log_path, cmd, child_env, startup_timeout)
    try:
        _wait_ready(proc, startup_timeout, log_path)
        with SafetyClient(endpoint, timeout=30.0) as client:
            worker.hello = client.hello()
    except BaseException:
        worker.stop(timeout=2.0)
        raise
    if restarts > 0:
        worker.supervisor = Supervisor(worker, restarts=restarts, hang_timeout=hang_timeout).start()
    return worker


def _wait_ready(proc: subprocess.Popen, timeout: float, log_path: str) -> None:
    deadline = time.monotonic() + timeout
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    buf = b""
    try:
        while time.monotonic() < deadline:
            if sel.select(timeout=min(0.5, max(0.0, deadline - time.monotonic()))):
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break  # stdout closed: the child exited
                buf += chunk
                if READY_PREFIX.encode() in buf:
                    return
            elif proc.poll() is not None:
                break
    finally:
        sel.close()
    proc.poll()
    state = f"exited with code {proc.returncode}" if proc.returncode is not None else f"not ready after {timeout:g}s"
    raise WorkerStartFailed(f"safety worker {state}; log {log_path}:\n{_tail(log_path)}")


def _tail(path: str, lines: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
