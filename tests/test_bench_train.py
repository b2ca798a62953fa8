"""`scripts/bench_train.py` part 3 (the cost of imagination): how it orders its runs and reads them back per epoch.

The measurement itself (minutes of training) is not run here: `python scripts/bench_train.py --imagination-only`
prints it (docs/imagination.md, "Cost"). The trainer's per-step times it reads are checked in tests/test_train.py."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "scripts"))

import bench_train  # noqa: E402


def summary(step_seconds, blocked=0, errors=0, bad_samples=0) -> dict:
    return {"step_seconds": step_seconds, "blocked": blocked, "errors": errors, "bad_samples": bad_samples}


def test_the_runs_alternate_so_that_a_drift_in_load_hits_both_arms():
    assert bench_train.imagination_order(1) == [0, 1]
    assert bench_train.imagination_order(2) == [0, 1, 1, 0]
    assert bench_train.imagination_order(3) == [0, 1, 1, 0, 0, 1]


def test_epochs_are_summed_from_the_trainers_step_times():
    assert bench_train.epoch_seconds(summary([1.0, 1.0, 0.5, 0.25, 0.5, 0.25]), 2) == [2.0, 0.75, 0.75]


@pytest.mark.parametrize("run", [summary([1.0] * 4, blocked=1), summary([1.0] * 4, errors=1),
                                 summary([1.0] * 4, bad_samples=1), summary([1.0] * 5)])
def test_a_run_whose_epochs_do_not_fall_on_step_boundaries_is_refused(run):
    with pytest.raises(RuntimeError, match="--blocked-fraction 0"):
        bench_train.epoch_seconds(run, 2)


def test_the_verdict_reads_each_arms_best_run_figure_by_figure_and_the_pooled_figures_are_kept_beside_it():
    runs = [{"k": 0, "epoch_seconds": [4.0, 2.0, 2.0]}, {"k": 1, "epoch_seconds": [10.0, 3.0, 3.0]},
            {"k": 1, "epoch_seconds": [6.0, 3.0, 3.0]}, {"k": 0, "epoch_seconds": [3.0, 6.0, 6.0]}]
    rates = bench_train.imagination_rates(runs, steps_per_epoch=2)
    # k = 0: the first epoch's best is the second run's, the warm epochs' best the first run's.
    assert rates[0] == {"best": {"first": 1.5, "warm": 1.0}, "pooled": {"first": 1.75, "warm": 2.0}, "warm_spread": 3.0}
    assert rates[1] == {"best": {"first": 3.0, "warm": 1.5}, "pooled": {"first": 4.0, "warm": 1.5}, "warm_spread": 1.0}


def test_an_epoch_that_is_not_a_whole_number_of_steps_is_refused_before_anything_runs():
    result = subprocess.run([sys.executable, "scripts/bench_train.py", "--imagination-only", "--imagination-size", "20"],
                            capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 2
    assert "--imagination-size (20) must be a multiple of --batch-size (16)" in result.stderr


def test_rollout_sizes_and_step_counts_are_checked_when_parsed():
    assert bench_train.size_flag("240,320") == [240, 320] and bench_train.size_flag("") is None
    assert bench_train.steps_flag("1,4,35") == [1, 4, 35] and bench_train.steps_flag("") == []
    for bad_size in ("30,40", "240", "a,b"):
        with pytest.raises(argparse.ArgumentTypeError, match="multiples of 16"):
            bench_train.size_flag(bad_size)
    for bad_steps in ("0", "1,x", "-4"):
        with pytest.raises(argparse.ArgumentTypeError, match="step counts >= 1"):
            bench_train.steps_flag(bad_steps)
