"""`scripts/seed_sweep.py`: one trainer run per seed through its real command line, one table, resumable."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "seed_sweep.py"
sys.path.insert(0, str(REPO_ROOT / "scripts"))

from seed_sweep import meets, parse_seeds  # noqa: E402


def sweep(*args, timeout=600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_seed_lists_and_ranges_parse_in_order_each_seed_once():
    assert parse_seeds("0-9") == list(range(10))
    assert parse_seeds("6,0-2,1") == [6, 0, 1, 2]
    for bad in ("", "a-3", "5-2", "-1"):
        with pytest.raises(ValueError):
            parse_seeds(bad)


def test_targets_are_at_least_except_shuffled_which_is_at_most_and_a_missing_figure_misses():
    met = meets({"direction": 0.80, "reversed_flips": 0.79, "shuffled": 0.35, "colour": None})
    assert met == {"direction": True, "reversed_flips": False, "shuffled": True, "colour": False}


def test_flags_the_sweep_sets_per_seed_are_refused_after_the_separator(tmp_path):
    r = sweep("--seeds", "0", "--runs-dir", str(tmp_path), "--", "--seed", "3")
    assert r.returncode == 2 and "--seed is set by the sweep" in r.stderr, r.stderr
    assert not any(tmp_path.iterdir())


def test_two_seeds_run_through_the_trainer_and_a_second_sweep_reads_them(tmp_path, tiny_models, tiny_safety_worker):
    gemma, cosmos = tiny_models
    runs, out = tmp_path / "runs", tmp_path / "sweep.json"
    trainer = ["--gemma-model", str(gemma), "--cosmos-model", str(cosmos), "--safety-endpoint",
               tiny_safety_worker.endpoint, "--synthetic-size", "32", "--synthetic-eval-size", "16", "--eval-size", "16",
               "--batch-size", "2", "--max-steps", "3", "--warmup-steps", "1", "--report-to", "none"]
    r = sweep("--seeds", "0-1", "--runs-dir", str(runs), "--json", str(out), "--", *trainer)
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    assert "[1/2] seed 0: ran" in r.stderr and "[2/2] seed 1: ran" in r.stderr, r.stderr
    result = json.loads(out.read_text())
    assert result["count"] == 2 and result["trainer_flags"] == trainer
    assert result["targets"] == {"direction": 0.8, "reversed_flips": 0.8, "shuffled": 0.35, "colour": 0.7}
    for seed, record in zip((0, 1), result["seeds"]):
        summary = json.loads((runs / f"seed-{seed}" / "summary.json").read_text())
        assert summary["steps"] == 3 and record["seed"] == seed and record["status"] == "ran"
        table = summary["eval_by_question"]
        assert record["direction"] == table["direction"]["accuracy"]
        assert record["reversed_flips"] == table["direction"]["reversed_flips"]
        assert record["shuffled"] == table["direction"]["shuffled_world"]
        assert record["colour"] == table["colour"]["accuracy"]
        assert record["meets_all"] == all(record["meets"].values())
    assert result["meeting_all"] == sum(r["meets_all"] for r in result["seeds"])
    assert f"seeds meeting every target: {result['meeting_all']} of 2" in r.stdout
    # The two seeds' runs differ: the seed reaches the trainer.
    assert (json.loads((runs / "seed-0" / "model" / "theworld_task.json").read_text())["seed"],
            json.loads((runs / "seed-1" / "model" / "theworld_task.json").read_text())["seed"]) == (0, 1)

    # Resumable: the finished seeds are read, not run again; a new seed would run.
    again = sweep("--seeds", "0-1", "--runs-dir", str(runs), "--json", str(out), "--", *trainer)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "seed 0: read" in again.stderr and "seed 1: read" in again.stderr
    assert [r["status"] for r in json.loads(out.read_text())["seeds"]] == ["read", "read"]
    assert not (runs / "seed-0" / "checkpoints" / "step-000006").exists()
