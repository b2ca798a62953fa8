"""`python -m safety_worker curate` on a local Ray (num_cpus=2, one Ray session for the test session):
exact accounting, the worker's very verdicts and frames, the manifest, resume after kill -9, and
autograd kept in the driver while every actor holds the guard with grad off.

This pytest process is the Ray driver (and a client of the shared tiny workers): it must keep grad on
and never import cosmos_guardrail; the guard runs in Ray actor processes only."""
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fixtures_data import write_bad_jsonl, write_bad_parquet
from safety_worker.curate import CurateError, curate
from safety_worker.proxy import checker_identity
from safety_worker.tiny import BLOCKED_PHRASE

# Every test here runs curate jobs on a local Ray (about 45 s for the module on 2 CPU cores, most of it
# Ray's start): end-to-end runs, so the long test command runs them.
pytestmark = pytest.mark.long

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (2 CPUs); its address lets subprocess drivers join it."""
    import shutil
    import tempfile

    ray = pytest.importorskip("ray")
    # A private, short temp dir: Ray's unix socket paths must stay under ~100 characters, and the
    # engineers sharing this machine each run their own Ray.
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp_dir)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


def _preset(root, faces="all") -> dict:
    return {"preset": "tiny", "tiny_dir": str(root), "tiny_faces": faces}


def _with_blocked(path: Path, count: int = 2) -> dict:
    """Append `count` copies of the file's first good line whose question holds the tiny guard's
    blocked phrase; returns their ids."""
    lines = path.read_text().splitlines()
    first = json.loads(lines[0])
    ids = {}
    for k in range(count):
        record = json.loads(json.dumps(first))
        record["id"] = f"blocked-{k}"
        record["messages"][0]["content"][-1]["text"] = f"{BLOCKED_PHRASE}, variant {k}?"
        lines.append(json.dumps(record))
        ids[record["id"]] = "blocked"
    path.write_text("\n".join(lines) + "\n")
    return ids


def _shard_rows(out: Path) -> dict:
    """Every kept sample of a curate output: id -> (messages JSON, [frames])."""
    import pyarrow.parquet as pq
    from PIL import Image

    rows = {}
    for shard in sorted((out / "shards").glob("*.parquet")):
        for row in pq.read_table(shard).to_pylist():
            frames = [np.asarray(Image.open(io.BytesIO(image["bytes"]))) for image in row["images"]]
            rows[row["id"]] = (row["messages"], frames)
    return rows


def _ledger(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def curated_jsonl(ray_session, tiny_guardrail_root, tmp_path_factory):
    """A JSONL with good, bad (every kind) and blocked samples, curated in this process by 2 actors."""
    folder = tmp_path_factory.mktemp("curate-in")
    path, expected = write_bad_jsonl(folder)
    expected.update(_with_blocked(path))
    out = folder.parent / (folder.name + "-out")
    manifest = curate(str(path), out, preset=_preset(tiny_guardrail_root), actors=2, shard_size=5, batch_size=4)
    return path, expected, out, manifest


def test_every_sample_read_is_kept_blocked_or_ledgered_per_shard_and_in_total(curated_jsonl):
    path, expected, out, manifest = curated_jsonl
    counts = manifest["counts"]
    assert counts["read"] == len(expected) == counts["kept"] + counts["blocked"] + counts["errors"]
    for shard in manifest["shards"]:
        c = shard["counts"]
        assert c["read"] == shard["rows"][1] - shard["rows"][0] == c["kept"] + c["blocked"] + c["errors"]
    assert sum(s["counts"]["read"] for s in manifest["shards"]) == counts["read"]
    blocked, errors, kept = _ledger(out / "blocked.jsonl"), _ledger(out / "errors.jsonl"), _shard_rows(out)
    assert (len(kept), len(blocked), len(errors)) == (counts["kept"], counts["blocked"], counts["errors"])
    assert {r["id"] for r in blocked} == {i for i, why in expected.items() if why == "blocked"}
    assert set(kept) == {i for i, why in expected.items() if why is None}
    for record in errors:  # readable reasons, each with the sample's id
        assert record["kind"] == "data" and expected[record["id"]] in record["error"]


def test_verdicts_and_sanitized_frames_are_the_single_workers(curated_jsonl, tiny_safety_worker_faces):
    from safety_worker import SafetyClient
    from theworld.data.safety_filter import _frame_groups
    from theworld.data.sources import BadSample, JsonlDataset, sample_text

    path, expected, out, manifest = curated_jsonl
    kept, blocked = _shard_rows(out), {r["id"]: r for r in _ledger(out / "blocked.jsonl")}
    dataset = JsonlDataset(path)
    compared = 0
    with SafetyClient(tiny_safety_worker_faces.endpoint) as client:
        assert checker_identity(client.hello()) == manifest["checker"]["identity"]
        for i in range(len(dataset)):
            try:
                sample = dataset[i]
            except BadSample:
                continue
            verdicts = [client.check_sample(sample_text(sample), g) for g in _frame_groups(sample["images"])]
            if all(v.safe for v in verdicts):
                messages, frames = kept[sample["id"]]
                worker_frames = [f for v in verdicts for f in v.frames]
                assert [f.tobytes() for f in frames] == [f.tobytes() for f in worker_frames]
                assert any(not np.array_equal(f, o) for f, o in zip(frames, sample["images"]))  # faces pixelated
                assert json.loads(messages) == sample["messages"]  # the original texts
            else:
                assert blocked[sample["id"]]["reason"] == next(v.reason for v in verdicts if not v.safe)
            compared += 1
    assert compared == manifest["counts"]["kept"] + manifest["counts"]["blocked"]


def test_the_manifest_names_the_checker_counts_inputs_and_shards(curated_jsonl):
    path, expected, out, manifest = curated_jsonl
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["checker"]["policy"] == {"controversial": "block", "fail_closed": True}
    assert manifest["checker"]["models"]["tiny_faces"] == "all"
    assert set(manifest["counts"]) == {"read", "kept", "blocked", "errors"}
    import hashlib

    assert manifest["inputs"] == [{"path": str(path.resolve()), "bytes": path.stat().st_size,
                                   "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}]
    assert [s["path"] for s in manifest["shards"]] == [f"shards/part-{k:05d}.parquet" for k in range(len(manifest["shards"]))]
    assert all((out / s["path"]).is_file() for s in manifest["shards"])


def test_driver_keeps_grad_and_every_actor_holds_the_guard_with_grad_off(curated_jsonl):
    import torch

    *_, manifest = curated_jsonl
    assert torch.is_grad_enabled()
    assert "cosmos_guardrail" not in sys.modules and "retinaface" not in sys.modules
    actors = manifest["run"]["actors"]
    assert len(actors) == 2 and len({a["pid"] for a in actors}) == 2 and os.getpid() not in {a["pid"] for a in actors}
    for actor in actors:
        assert actor["guard_loaded"] and not actor["grad_enabled"] and not actor["theworld_loaded"]


def test_a_rerun_on_a_finished_output_checks_nothing_and_writes_the_same(curated_jsonl, tiny_guardrail_root):
    path, expected, out, manifest = curated_jsonl
    before = {p: p.read_bytes() for p in (out / "blocked.jsonl", out / "errors.jsonl", *sorted((out / "shards").iterdir()))}
    again = curate(str(path), out, preset=_preset(tiny_guardrail_root), actors=2, shard_size=5, batch_size=4)
    assert again["run"]["checked"] == 0 and again["run"]["units_committed_before"] == len(manifest["shards"])
    assert {k: v for k, v in again.items() if k != "run"} == {k: v for k, v in manifest.items() if k != "run"}
    assert before == {p: p.read_bytes() for p in before}


def test_an_output_of_other_input_or_checker_is_refused(curated_jsonl, tiny_guardrail_root):
    path, expected, out, manifest = curated_jsonl
    with pytest.raises(CurateError, match="another OUTPUT"):
        curate(str(path), out, preset=_preset(tiny_guardrail_root, faces="none"), actors=2, shard_size=5)


def test_parquet_shards_keep_one_output_shard_each(ray_session, tiny_guardrail_root, tmp_path):
    spec, expected = write_bad_parquet(tmp_path / "in", shards=2)
    manifest = curate(spec, tmp_path / "out", preset=_preset(tiny_guardrail_root), actors=1, batch_size=8)
    assert [s["source"] for s in manifest["shards"]] == sorted(str(p) for p in (tmp_path / "in").glob("*.parquet"))
    assert manifest["counts"]["read"] == len(expected)
    assert manifest["counts"]["kept"] == sum(why is None for why in expected.values())
    ledgered = {r["id"]: r["error"] for r in _ledger(tmp_path / "out" / "errors.jsonl")}
    assert all(expected[i] in why for i, why in ledgered.items()) and len(ledgered) == manifest["counts"]["errors"]


# ---------------------------------------------------------------------------------- kill -9 and resume

def _clips(folder: Path, n: int = 24) -> Path:
    from theworld.data.sources import write_jsonl
    from theworld.data.synthetic import SyntheticMotionTask

    task = SyntheticMotionTask(split="train", size=n, seed=3, num_frames=5, image_size=32, blocked_fraction=0.25)
    return write_jsonl([task[i] for i in range(n)], folder / "clips.jsonl")


_ARGS = ["--shard-size", "3", "--batch-size", "1", "--actors", "1", "--tiny-faces", "all"]


def _start(path, out, root, address) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "safety_worker", "curate", str(path), str(out), "--tiny-dir", str(root),
                             "--ray-address", address, *_ARGS], cwd=str(REPO_ROOT),
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for_a_commit(out: Path, proc: subprocess.Popen, timeout: float = 300) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        markers = list((out / "parts").glob("part-*[0-9].json")) if (out / "parts").is_dir() else []
        if markers:
            return len(markers)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        time.sleep(0.02)
    raise AssertionError("no unit was committed in time")


def _run_until_a_commit(clips_reference, root, address, tmp_path):
    """A curate driver of the reference's clips into tmp_path/out, once it has committed a unit."""
    path, reference = clips_reference
    out = tmp_path / "out"
    driver = _start(path, out, root, address)
    _wait_for_a_commit(out, driver)
    return path, reference, out, driver


def _same_output(a: Path, b: Path) -> None:
    for name in ("blocked.jsonl", "errors.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert _shard_rows(a).keys() == _shard_rows(b).keys()
    for key, (messages, frames) in _shard_rows(a).items():
        other = _shard_rows(b)[key]
        assert messages == other[0] and [f.tobytes() for f in frames] == [f.tobytes() for f in other[1]]
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    for m in (ma, mb):
        m.pop("run"), m.pop("verdict_store")
    assert ma == mb


@pytest.fixture(scope="module")
def clips_reference(ray_session, tiny_guardrail_root, tmp_path_factory):
    """The clips curated without interruption (what a resumed run must equal)."""
    folder = tmp_path_factory.mktemp("clips")
    path = _clips(folder)
    proc = _start(path, folder / "reference", tiny_guardrail_root, ray_session)
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-3000:]
    return path, folder / "reference"


@pytest.mark.long
def test_resume_after_kill_9_of_the_driver_equals_an_uninterrupted_run(clips_reference, tiny_guardrail_root, ray_session,
                                                                       tmp_path):
    from safety_worker.verdict_store import VerdictStore

    path, reference, out, driver = _run_until_a_commit(clips_reference, tiny_guardrail_root, ray_session, tmp_path)
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)
    units = len(json.loads((reference / "manifest.json").read_text())["shards"])
    committed = len(list((out / "parts").glob("part-*[0-9].json")))
    assert 0 < committed < units, "the driver was killed after the job was over: nothing to resume"
    with VerdictStore(out / "verdicts.sqlite") as store:
        stored = len(store)
        assert store.integrity_check() == "ok"
    again = _start(path, out, tiny_guardrail_root, ray_session)
    assert again.wait(timeout=600) == 0, again.stderr.read().decode()[-3000:]
    _same_output(out, reference)
    run = json.loads((out / "manifest.json").read_text())["run"]
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    # Nothing whose verdict was committed (in a unit or in the store) was checked again. At most: the killed
    # driver's actors can still store a verdict or two of their last batch after `stored` was read (Ray ends a
    # dead driver's actors a moment later), and those are not checked again either.
    assert run["units_committed_before"] == committed
    assert 0 < run["checked"] <= counts["read"] - counts["errors"] - stored


def _guard_actor_pids() -> list[int]:
    """Checker actors of this session's Ray (its raylet is this process's child; Ray titles an actor's
    process `ray::MapWorker(MapBatches(GuardActor))...`). No state API: it needs Ray's dashboard."""
    def parent(pid: int) -> int:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])

    found = []
    for entry in os.listdir("/proc"):
        try:
            pid = int(entry)
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"GuardActor" not in f.read():
                    continue
            ancestors, p = set(), pid
            for _ in range(4):
                p = parent(p)
                ancestors.add(p)
            if os.getpid() in ancestors:
                found.append(pid)
        except (ValueError, OSError):
            continue
    return found


@pytest.mark.long
def test_resume_after_kill_9_of_an_actor_equals_an_uninterrupted_run(clips_reference, tiny_guardrail_root, ray_session,
                                                                      tmp_path):
    path, reference, out, driver = _run_until_a_commit(clips_reference, tiny_guardrail_root, ray_session, tmp_path)
    guards = _guard_actor_pids()
    assert guards, "no live checker actor to kill"
    os.kill(guards[0], signal.SIGKILL)
    if driver.wait(timeout=600) != 0:  # Ray Data may retry on a restarted actor; if it gave up, run again
        again = _start(path, out, tiny_guardrail_root, ray_session)
        assert again.wait(timeout=600) == 0, again.stderr.read().decode()[-3000:]
    _same_output(out, reference)


# ---------------------------------------------------------------------------------- training on it

def test_training_on_curated_data_checks_nothing_and_accounts_exactly(curated_jsonl, tiny_models,
                                                                      tiny_safety_worker_faces, tmp_path):
    from safety_worker import SafetyClient
    from test_train import run_in_process

    *_, out, manifest = curated_jsonl
    with SafetyClient(tiny_safety_worker_faces.endpoint) as client:
        before = client.stats()["requests"].get("check_sample", 0)
        summary = run_in_process(tmp_path / "run", tiny_models, tiny_safety_worker_faces.endpoint, "--data", str(out),
                                 "--eval-data", str(out), "--max-steps", "3", "--eval-size", "4")
        assert client.stats()["requests"].get("check_sample", 0) == before  # the manifest covers every sample
    assert summary["trainer_grad_enabled"] and summary["accounting_holds"]
    assert summary["seen"] == summary["trained"] == 3 * 2 and summary["blocked"] == summary["errors"] == 0
    assert summary["curated"] == manifest["counts"]
    assert (tmp_path / "run" / "blocked.jsonl").read_text() == (tmp_path / "run" / "errors.jsonl").read_text() == ""


def test_curated_data_of_another_checker_is_a_start_up_error_unless_accepted(curated_jsonl, tiny_models,
                                                                              tiny_safety_worker, capsys, tmp_path):
    from test_train import run_in_process, small_run_args
    from theworld.train import main

    *_, out, manifest = curated_jsonl  # curated with faces=all; this worker finds no face: another checker
    code = main(small_run_args(tmp_path / "run", tiny_models, "--safety-endpoint", tiny_safety_worker.endpoint,
                               "--data", str(out), "--eval-data", str(out), "--max-steps", "1"))
    err = capsys.readouterr().err
    # The check needs the worker's hello, so it comes after the model loaded (its progress bars above it).
    errors = [line for line in err.splitlines() if line.startswith("theworld-train: error:")]
    assert code == 2 and "Traceback" not in err and len(errors) == 1, err
    assert "--accept-curated-identity" in errors[0] and "models" in errors[0]
    summary = run_in_process(tmp_path / "accepted", tiny_models, tiny_safety_worker.endpoint, "--data", str(out),
                             "--eval-data", str(out), "--max-steps", "1", "--accept-curated-identity")
    assert summary["trained"] == 2 and summary["accounting_holds"]


@pytest.mark.parametrize("front", [[], ["--replicas", "1"]], ids=["single", "replicas"])
def test_a_worker_on_the_same_store_answers_what_curate_checked(curated_jsonl, tiny_guardrail_root, front):
    from safety_worker import SafetyClient, spawn_worker
    from theworld.data.safety_filter import _frame_groups
    from theworld.data.sources import JsonlDataset, sample_text

    path, expected, out, manifest = curated_jsonl
    sample = JsonlDataset(path)[0]
    assert expected[sample["id"]] is None
    kept = _shard_rows(out)[sample["id"]][1]
    with spawn_worker(extra_args=["--tiny-dir", str(tiny_guardrail_root), "--tiny-faces", "all", *front,
                                  "--verdict-store", manifest["verdict_store"]]) as worker, \
            SafetyClient(worker.endpoint) as client:
        verdict = client.check_sample(sample_text(sample), _frame_groups(sample["images"])[0])
        stats = client.stats()
    if front:
        assert stats["proxy"]["answered_from_cache"] == 1 and stats["proxy"]["cache"]["path"] == manifest["verdict_store"]
    else:
        assert stats["verdict_store"]["answered"] == 1 and stats["checks"] == 0
        assert stats["verdict_store"]["path"] == manifest["verdict_store"]
    assert verdict.safe and [f.tobytes() for f in verdict.frames] == [f.tobytes() for f in kept]
