"""Session fixtures for the safety worker side (tiny guardrail checkpoint, shared workers).

The pytest process is a *client* process: it must never import cosmos_guardrail or retinaface
(that would switch autograd off for every other test in the session). Workers run as
subprocesses; anything that needs the checker in-process runs in a subprocess too
(`run_in_checker_process`).
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from safety_worker import spawn_worker

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_guardrail_root(tmp_path_factory):
    """Cache root for tiny guardrail variants (workers build into it on first use)."""
    return tmp_path_factory.mktemp("safety-tiny")


def _spawn_tiny(root, faces, *extra):
    return spawn_worker(preset="tiny", extra_args=["--tiny-dir", str(root), "--tiny-faces", faces, *extra])


@pytest.fixture(scope="session")
def tiny_safety_worker(tiny_guardrail_root):
    """One tiny worker shared by the session: text guard blocks BLOCKED_PHRASE, no faces found;
    Prometheus metrics on a free port (`worker.hello["metrics_url"]`)."""
    with _spawn_tiny(tiny_guardrail_root, "none", "--metrics-port", "0") as worker:
        yield worker


@pytest.fixture(scope="session")
def tiny_replica_front(tiny_guardrail_root):
    """`serve --replicas 2` shared by the session, the same checker as `tiny_safety_worker` behind
    the replica front; Prometheus metrics on a free port."""
    with _spawn_tiny(tiny_guardrail_root, "none", "--replicas", "2", "--metrics-port", "0") as worker:
        yield worker


@pytest.fixture(scope="session", params=["single", "replicas"])
def worker_front(request):
    """Each worker front in turn, for tests of what docs/PROTOCOL.md promises at any endpoint: the
    single worker (`serve`) and the replica front (`serve --replicas 2`). Both are session workers."""
    return request.getfixturevalue({"single": "tiny_safety_worker", "replicas": "tiny_replica_front"}[request.param])


@pytest.fixture(scope="session")
def tiny_safety_worker_faces(tiny_guardrail_root):
    """A tiny worker whose face filter pixelates every frame."""
    with _spawn_tiny(tiny_guardrail_root, "all") as worker:
        yield worker


@pytest.fixture(scope="session")
def spawn_tiny_worker(tiny_guardrail_root):
    """Factory for a private short-lived worker (lifecycle tests); the caller stops it."""
    return lambda faces="none", *extra: _spawn_tiny(tiny_guardrail_root, faces, *extra)


@pytest.fixture(scope="session")
def run_in_checker_process(tiny_guardrail_root):
    """Run `code` in a fresh Python that has the real checker in-process; returns its JSON output.

    `code` sees `checker` (CosmosSafetyChecker on the tiny variant `faces`), `np`, `json`, and must
    print one JSON document last.
    """

    def run(code: str, faces: str = "none", timeout: float = 120) -> dict:
        prelude = textwrap.dedent(f"""
            import os, sys, json
            from safety_worker.presets import use_preset
            use_preset("tiny", tiny_dir={str(tiny_guardrail_root)!r}, tiny_faces={faces!r})  # as a worker does
            import numpy as np, torch
            torch.set_num_threads(1)
            from cosmos_guardrail import CosmosSafetyChecker
            checker = CosmosSafetyChecker()
        """)
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True,
                              text=True, timeout=timeout, env=env, cwd=str(REPO_ROOT))
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    return run
