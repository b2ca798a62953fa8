"""The shared verdict store (safety_worker.verdict_store): several writer processes, kill -9, the
bound, faults. No checker needed: the store holds whatever verdict maps and frames it is given."""
import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

from safety_worker.verdict_store import ENTRY_OVERHEAD, VerdictStore, VerdictStoreError

SAFE = {"safe": True, "reason": "safe", "stage": None, "fault": False}
BLOCKED = {"safe": False, "reason": "BLOCKLIST: word", "stage": "text", "fault": False}
FAULT = {"safe": False, "reason": "checker timed out after 60s, blocked (fail closed)", "stage": "timeout", "fault": True}

# A writer process: puts keys PREFIX-0 .. PREFIX-(N-1), each committed before the next; prints each key
# once committed, so the test knows what must survive a kill.
_WRITER = r"""
import sys, numpy as np
from safety_worker.verdict_store import VerdictStore
path, prefix, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = VerdictStore(path)
for i in range(n):
    frames = np.full((2, 16, 16, 3), i % 251, np.uint8)
    store.put(f"{prefix}-{i}", {"safe": True, "reason": "safe", "stage": None, "fault": False}, [frames])
    print(f"{prefix}-{i}", flush=True)
"""


def _writer(path, prefix, n):
    return subprocess.Popen([sys.executable, "-c", _WRITER, str(path), prefix, str(n)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def test_a_verdict_and_its_frames_come_back_from_another_process(tmp_path):
    frames = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    with VerdictStore(tmp_path / "v.db") as store:
        assert store.put("k", SAFE, [frames])
        assert store.put("b", BLOCKED, [])
    out = subprocess.run([sys.executable, "-c", "import sys; from safety_worker.verdict_store import VerdictStore; "
                          "r, a = VerdictStore(sys.argv[1]).get('k'); print(r['safe'], a[0].tobytes().hex())",
                          str(tmp_path / "v.db")], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.stdout.split() == ["True", frames.tobytes().hex()]
    with VerdictStore(tmp_path / "v.db") as store:
        assert store.get("b") == (BLOCKED, [])
        assert store.get("missing") is None


def test_two_writer_processes_at_once_lose_nothing(tmp_path):
    path = tmp_path / "v.db"
    writers = [_writer(path, p, 150) for p in ("a", "b")]
    for w in writers:
        assert w.wait(timeout=120) == 0
    with VerdictStore(path) as store:
        assert len(store) == 300
        assert store.integrity_check() == "ok"
        result, arrays = store.get("b-149")
        assert result == SAFE and arrays[0].shape == (2, 16, 16, 3) and int(arrays[0][0, 0, 0, 0]) == 149
        assert store.bytes == sum(len(_packed(store, k)) + ENTRY_OVERHEAD for k in ("a-0",)) * 300


def _packed(store, key):
    return store._db.execute("SELECT arrays FROM verdicts WHERE key = ?", (key,)).fetchone()[0]


def test_a_writer_killed_mid_write_leaves_every_committed_verdict_and_a_sound_file(tmp_path):
    path = tmp_path / "v.db"
    writer = _writer(path, "k", 100000)
    committed = []
    for line in writer.stdout:  # kill it while it is writing, after some commits
        committed.append(line.strip())
        if len(committed) == 200:
            break
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=30)
    committed += [line.strip() for line in writer.stdout]  # printed after commit, before the kill landed
    with VerdictStore(path) as store:
        assert store.integrity_check() == "ok"
        assert all(key in store for key in committed)
        n = len(store)
        assert n >= len(committed)
        # The running total was kept in the same transactions as the rows.
        (total,) = store._db.execute("SELECT sum(size) FROM verdicts").fetchone()
        assert store.bytes == total
        assert store.put("after", SAFE, []) and len(store) == n + 1


def test_the_store_stays_within_its_bound_and_evicts_the_least_recently_used(tmp_path):
    frames = np.zeros((1, 8, 8, 3), np.uint8)
    with VerdictStore(tmp_path / "v.db", max_bytes=10 * (frames.nbytes + ENTRY_OVERHEAD + 64)) as store:
        for i in range(10):
            store.put(f"k{i}", SAFE, [frames])
            time.sleep(0.002)  # distinct last_used
        assert store.get("k0") is not None  # k0 becomes the most recently used
        for i in range(10, 13):
            store.put(f"k{i}", SAFE, [frames])
            time.sleep(0.002)
            assert store.bytes <= store.max_bytes
        assert "k0" in store and "k1" not in store and "k12" in store
        for i in range(13, 40):
            store.put(f"k{i}", SAFE, [frames])
            assert store.bytes <= store.max_bytes
        assert store.evicted > 0


def test_faults_are_never_stored(tmp_path):
    with VerdictStore(tmp_path / "v.db") as store:
        assert not store.put("t", FAULT, [])
        assert not store.put("texts", {"verdicts": [SAFE, FAULT]}, [])
        assert store.put("ok", {"verdicts": [SAFE, BLOCKED]}, [])
        assert "t" not in store and "texts" not in store and "ok" in store
        assert store.refused_faults == 2


def test_a_store_others_could_write_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "v.db"
    VerdictStore(path).close()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    path.chmod(0o666)
    with pytest.raises(VerdictStoreError, match="chmod 600"):
        VerdictStore(path)


def test_a_file_that_is_not_a_store_is_refused(tmp_path):
    path = tmp_path / "v.db"
    path.write_bytes(b"not sqlite at all" * 100)
    path.chmod(0o600)
    with pytest.raises(VerdictStoreError, match="not a verdict store"):
        VerdictStore(path)
    assert sqlite3.sqlite_version


@pytest.mark.long  # an end-to-end run of the real commands: CI runs it with `pytest -m long`
def test_a_single_worker_answers_from_the_store_what_another_worker_checked(spawn_tiny_worker, tmp_path):
    """`serve --verdict-store` without --replicas: the worker fills the store where it checks, and a second
    worker process on the same store answers the same content without checking it (its `stats`)."""
    from safety_worker import SafetyClient
    from safety_worker.tiny import BLOCKED_PHRASE

    store = tmp_path / "verdicts.sqlite"
    frames = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    requests = [("a red square moves left", frames), (f"please {BLOCKED_PHRASE}", frames), ("an image alone", frames[:1])]

    def check_all(worker):
        with SafetyClient(worker.endpoint) as client:
            verdicts = [client.check_sample(text, clip) for text, clip in requests]
            texts = client.check_text(["plain words", BLOCKED_PHRASE])
            return verdicts, texts, client.stats()

    with spawn_tiny_worker("all", "--verdict-store", str(store)) as first:
        checked, checked_texts, first_stats = check_all(first)
    with spawn_tiny_worker("all", "--verdict-store", str(store)) as second:
        reused, reused_texts, stats = check_all(second)
    assert first_stats["checks"] == 4 and first_stats["verdict_store"]["answered"] == 0
    assert first_stats["verdict_store"]["entries"] == 4
    # Nothing checked again: every check answered from the store, with the first worker's verdicts and frames.
    assert stats["checks"] == 0 and stats["verdict_store"]["answered"] == stats["verdict_store"]["hits"] == 4
    assert stats["verdict_store"]["checker_identity"] == first_stats["verdict_store"]["checker_identity"]
    assert [v.safe for v in reused] == [v.safe for v in checked] == [True, False, True]
    assert [v.reason for v in reused] == [v.reason for v in checked]
    assert [v.frames.tobytes() for v in (reused[0], reused[2])] == [v.frames.tobytes() for v in (checked[0], checked[2])]
    assert not np.array_equal(reused[0].frames, frames)  # the sanitized (pixelated) frames, not the originals
    assert [(v.safe, v.reason) for v in reused_texts] == [(v.safe, v.reason) for v in checked_texts]
    assert stats["safe"] + stats["blocked"] == 5  # verdicts from the store are counted like checked ones


@pytest.mark.long  # an end-to-end run of the real commands: CI runs it with `pytest -m long`
def test_a_second_training_run_with_the_same_store_checks_nothing_again(tiny_models, tmp_path):
    """`--safety-verdict-store`: the worker each run spawns shares the store, so the second experiment on the
    same data (one epoch of 8 samples, 8 held out) is answered wholly from what the first one checked."""
    from test_train import small_run_args
    from theworld.train import parse_args, train

    store = tmp_path / "verdicts.sqlite"

    def run(name):
        args = small_run_args(tmp_path / name, tiny_models, "--safety-verdict-store", str(store),
                              "--synthetic-size", "8", "--max-steps", "4", "--eval-every", "4", "--save-every", "4",
                              "--report-to", "none")
        summary = train(*parse_args(args))
        assert summary["safety_worker_spawned"] and summary["accounting_holds"]
        return summary["worker_stats"]

    first, second = run("first"), run("second")
    assert first["checks"] > 0 and first["verdict_store"]["answered"] == 0
    requests = sum(n for op, n in second["requests"].items() if op.startswith("check_"))
    assert requests >= 16  # the 8 training samples and the 8 held out
    assert second["checks"] == 0 and second["verdict_store"]["answered"] == second["verdict_store"]["hits"] == requests
    assert second["verdict_store"]["checker_identity"] == first["verdict_store"]["checker_identity"]


def test_a_verdict_store_is_for_the_spawned_worker_only(tiny_models, tmp_path, capsys):
    from test_train import small_run_args
    from theworld.train import main

    code = main(small_run_args(tmp_path / "run", tiny_models, "--safety-verdict-store", str(tmp_path / "v.sqlite"),
                               "--safety-endpoint", "ipc:///nonexistent/worker.sock"))
    err = capsys.readouterr().err
    assert code == 2 and "serve --verdict-store" in err and "Traceback" not in err
