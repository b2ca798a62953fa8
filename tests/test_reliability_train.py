"""kill -9 the trainer's safety worker in the middle of a real training run (`python -m theworld.train`).

The trainer spawned the worker; its supervisor restarts it on the same endpoint and the trainer's
SafetyClient resends the checks it was owed. The run must finish with every sample accounted for
(`seen == trained + blocked + errors`), no check failed, no sample lost or trained twice.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from theworld.data.sources import SampleStream
from theworld.data.synthetic import SyntheticMotionTask

from fixtures_worker import REPO_ROOT

SIZE, STEPS, BATCH = 96, 30, 2


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(x) for x in (task / "children").read_text().split()]
    return kids


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


@pytest.mark.long  # an end-to-end run of the real commands: CI runs it with `pytest -m long`
def test_kill9_worker_mid_training_loses_no_sample(tmp_path, tiny_models, tiny_guardrail_root):
    gemma, cosmos = tiny_models
    args = [
        "--output-dir", str(tmp_path), "--gemma-model", str(gemma), "--cosmos-model", str(cosmos),
        "--synthetic-size", str(SIZE), "--synthetic-eval-size", "8", "--eval-size", "8", "--batch-size", str(BATCH),
        "--max-steps", str(STEPS), "--warmup-steps", "2", "--eval-every", str(STEPS), "--save-every", str(STEPS),
        "--log-every", "5", "--blocked-fraction", "0.25",
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), SAFETY_WORKER_TINY_DIR=str(tiny_guardrail_root))
    proc = subprocess.Popen([sys.executable, "-m", "theworld.train", *args], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # Wait until training (not just the held-out pass) has taken blocked samples, then kill the worker.
        deadline = time.monotonic() + 240
        while not _lines(tmp_path / "blocked.jsonl"):
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            assert time.monotonic() < deadline, "training never reached a blocked sample"
            time.sleep(0.05)
        workers = _children(proc.pid)
        assert len(workers) == 1, workers
        victim = workers[0]
        os.kill(victim, signal.SIGKILL)
        replacement = None
        while replacement is None and proc.poll() is None and time.monotonic() < deadline + 120:
            replacement = next((pid for pid in _children(proc.pid) if pid != victim), None)
            time.sleep(0.05)
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["worker"]["pid"] == victim
    assert summary["seen"] < SIZE, "the run must end before the stream does, or nothing was at stake"
    # Nothing lost: every sample read is trained, blocked or an error, and no check failed.
    assert summary["seen"] == summary["trained"] + summary["blocked"] + summary["errors"]
    assert summary["errors"] == 0, _lines(tmp_path / "errors.jsonl")
    assert summary["trained"] == STEPS * BATCH
    # Nothing decided twice, nothing skipped: the blocked ledger is exactly the blocked ids the run read.
    task = SyntheticMotionTask(size=SIZE, seed=0, blocked_fraction=0.25)
    stream = SampleStream(task, seed=0)
    read = [task.sample_id(stream.index_at(p)) for p in range(summary["seen"])]
    assert len(set(read)) == len(read)
    ledger = _lines(tmp_path / "blocked.jsonl")
    assert [r["id"] for r in ledger] == [i for i in read if i in task.blocked_ids]
    assert [r["position"] for r in ledger] == sorted({r["position"] for r in ledger})
    # The worker was restarted, and the replacement went away with the trainer (no orphans).
    assert replacement is not None, "no replacement worker was started"
    assert not Path(f"/proc/{replacement}").exists()
