"""Load (8 client processes) on one worker, and `serve --replicas 2` with its verdict cache under
load balancing, a replica killed mid-flight, and hostile input at the proxy."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from safety_worker import SafetyClient, spawn_worker
from safety_worker.proxy import VerdictCache, checker_identity, replica_args
from safety_worker.tiny import BLOCKED_PHRASE, SAFE_EXAMPLE

from fixtures_worker import REPO_ROOT
from test_reliability_fuzz import SIZE_CAP, run_fuzz

ENV = dict(os.environ, PYTHONPATH=str(REPO_ROOT))


def _bench(*args, timeout=600):
    r = subprocess.run([sys.executable, "scripts/bench_reliability.py", *args, "--json"], capture_output=True,
                       text=True, env=ENV, timeout=timeout, cwd=str(REPO_ROOT))
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_load_8_client_processes_lose_and_misroute_nothing(tiny_safety_worker):
    """Short CI version (8 x 60); the full 8 x 1,000 is `python scripts/bench_reliability.py --only load`."""
    r = _bench("--only", "load", "--endpoint", tiny_safety_worker.endpoint, "--processes", "8", "--requests", "60")["load"]
    print(f"\nload 8 x 60: p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, {r['throughput_rps']:.0f} req/s")
    assert r["total"] == 480 and r["answered"] == 480
    assert r["lost"] == 0 and r["misrouted_or_wrong"] == 0


@pytest.fixture(scope="module")
def replicated(tiny_guardrail_root):
    worker = spawn_worker(extra_args=["--tiny-dir", str(tiny_guardrail_root), "--replicas", "2",
                                      "--max-message-bytes", str(SIZE_CAP), "--cache-mb", "64"])
    yield worker
    worker.stop()


def test_replicas_share_the_load_and_the_cache_answers_repeats(replicated):
    rng = np.random.default_rng(0)
    videos = [rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8) for _ in range(24)]
    texts = [BLOCKED_PHRASE if i % 4 == 0 else f"{SAFE_EXAMPLE} {i}" for i in range(24)]
    with SafetyClient(replicated.endpoint, timeout=120) as c:
        before = c.stats()["proxy"]
        first = [f.result() for f in [c.submit_sample(t, v) for t, v in zip(texts, videos)]]
        mid = c.stats()["proxy"]
        again = [f.result() for f in [c.submit_sample(t, v) for t, v in zip(texts, videos)]]
        after = c.stats()["proxy"]
    assert [v.safe for v in first] == [i % 4 != 0 for i in range(24)]
    assert [v.safe for v in again] == [v.safe for v in first]
    assert all(np.array_equal(a.frames, b.frames) for a, b in zip(first, again) if a.safe)
    dispatched = [m - b for m, b in zip(mid["dispatched"], before["dispatched"])]
    # (each `stats` call is dispatched to a replica too: +1 per snapshot)
    assert sum(dispatched) == 24 + 1 and min(dispatched) > 0, dispatched  # both replicas worked
    assert sum(after["dispatched"]) == sum(mid["dispatched"]) + 1  # the repeat pass computed nothing
    assert after["answered_from_cache"] - mid["answered_from_cache"] == 24


def test_a_replica_killed_mid_flight_is_restarted_and_nothing_is_lost(replicated):
    rng = np.random.default_rng(1)
    videos = [rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8) for _ in range(40)]
    with SafetyClient(replicated.endpoint, timeout=120) as c:
        victim = c.stats()["proxy"]["replica_pids"][0]
        futures = [c.submit_sample(SAFE_EXAMPLE, v) for v in videos]
        futures[0].result(timeout=60)
        os.kill(victim, signal.SIGKILL)
        verdicts = [f.result(timeout=120) for f in futures]
        assert all(v.safe and np.array_equal(v.frames, x) for v, x in zip(verdicts, videos))
        deadline = time.monotonic() + 60
        while victim in c.stats()["proxy"]["replica_pids"]:
            assert time.monotonic() < deadline, "the killed replica was not replaced"
            time.sleep(0.2)
        assert c.check_text(BLOCKED_PHRASE).safe is False


def test_proxy_survives_hostile_messages(replicated):
    result = run_fuzz(replicated, 500, seed=3)
    assert result["stats"]["proxy"]["replicas"] == 2


def test_cache_key_is_the_checker_identity_not_the_process():
    hello = {"models": {"preset": "tiny", "tiny_faces": "none"}, "policy": {"controversial": "block"},
             "versions": {"worker": "0.1.0", "cosmos-guardrail": "0.3.2"}, "protocol": [1, 0], "pid": 1, "instance_id": "a"}
    same_checker_other_process = dict(hello, pid=2, instance_id="b", endpoint="ipc:///elsewhere")
    other_policy = dict(hello, policy={"controversial": "allow"})
    other_models = dict(hello, models={"preset": "tiny", "tiny_faces": "all"})
    assert checker_identity(hello) == checker_identity(same_checker_other_process)
    assert len({checker_identity(h) for h in (hello, other_policy, other_models)}) == 3


def test_replica_args_keep_checker_options_and_drop_front_options():
    argv = ["serve", "--endpoint", "tcp://0.0.0.0:5555", "--replicas", "2", "--curve-dir=/k", "--insecure",
            "--tiny-dir", "/t", "--check-timeout", "5", "--cache-mb", "8", "--cache-file", "/c", "--preset", "tiny", "--device=cpu"]
    assert replica_args(argv) == ["--tiny-dir", "/t", "--check-timeout", "5"]


def test_verdict_cache_persists_for_the_same_checker_only_and_refuses_a_shared_file(tmp_path):
    cache = VerdictCache(1 << 20)
    frames = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    cache.put("k1", {"safe": True, "reason": "safe", "stage": None}, [frames])
    cache.put("k2", {"verdicts": [{"safe": False, "reason": "blocked"}]}, [])
    path = tmp_path / "verdicts.msgpack"
    cache.save(path, "checker-A")
    assert path.stat().st_mode & 0o777 == 0o600
    again = VerdictCache(1 << 20)
    assert again.load(path, "checker-A") == 2
    result, arrays = again.get("k1")
    assert result["safe"] is True and np.array_equal(arrays[0], frames)
    assert again.get("k2")[0]["verdicts"][0]["safe"] is False
    other = VerdictCache(1 << 20)
    assert other.load(path, "checker-B") == 0 and other.get("k1") is None  # another checker's verdicts
    path.chmod(0o644)  # anyone could have planted a forged "safe" here
    with pytest.raises(PermissionError, match="chmod 600"):
        VerdictCache(1 << 20).load(path, "checker-A")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_owner_shuts_the_replica_front_down_and_its_replicas_with_it(replicated):
    """Last in this module: it stops the module's front (the owner rule and drain of every front)."""
    with SafetyClient(replicated.endpoint, timeout=60) as c:
        replica_pids = c.stats()["proxy"]["replica_pids"]
        assert c.shutdown(replicated.owner_token) == {"stopping": True}
    assert replicated.proc.wait(60) == 0
    assert [pid for pid in replica_pids if _running(pid)] == []
