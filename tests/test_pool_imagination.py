"""`scripts/pool_imagination.py`: the imagination experiment's arms compared over seeds, through its command line."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "pool_imagination.py"
sys.path.insert(0, str(REPO_ROOT / "scripts"))

from pool_imagination import mean_interval, t_quantile, wilcoxon_p  # noqa: E402


def entry(accuracy: float, half: float = 0.03) -> dict:
    return {"accuracy": accuracy, "ci_low": accuracy - half, "ci_high": accuracy + half, "majority": 0.05, "n": 500}


def report(path: Path, arms: dict[str, float], budget: str = "1024", shuffled: float | None = None) -> Path:
    ablations = {} if shuffled is None else {"imagined_shuffled": {budget: {"future": entry(shuffled)}}}
    path.write_text(json.dumps({"headline_budget": int(budget), "ablations": ablations,
                                "arms": {arm: {budget: {"future": entry(a), "direction": entry(0.9)}} for arm, a in arms.items()}}))
    return path


def test_the_t_interval_is_the_textbook_one():
    assert t_quantile(1) == 12.706 and t_quantile(7) == 2.365 and t_quantile(100) == 1.960
    pooled = mean_interval([0.1, 0.3, 0.2])
    assert pooled["mean"] == pytest.approx(0.2) and pooled["sd"] == pytest.approx(0.1)
    assert pooled["ci_high"] - pooled["mean"] == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    assert mean_interval([0.5])["ci_low"] is None


def test_the_wilcoxon_p_is_exact_counts_both_tails_and_averages_tied_ranks():
    assert wilcoxon_p([0.1, 0.2, 0.3]) == pytest.approx(2 / 8)  # all positive: 1 of 8 sign patterns per tail
    assert wilcoxon_p([0.4, 0.02, -0.3]) == pytest.approx(6 / 8)
    assert wilcoxon_p([0.1, -0.1, 0.0]) == 1.0  # the zero dropped, the tie at the centre
    assert wilcoxon_p([0.0]) is None
    assert wilcoxon_p([0.1] * 10) == pytest.approx(2 / 2**10)


def test_seeds_pair_their_own_arms_merge_their_reports_and_count_above_level_below(tmp_path):
    specs = [f"0={report(tmp_path / 'a.json', {'observed': 0.50, 'imagined': 0.90}, shuffled=0.2)}",
             f"1={report(tmp_path / 'b.json', {'observed': 0.80, 'imagined': 0.82})}",
             f"1={report(tmp_path / 'c.json', {'random_world_model': 0.40})}",  # a later invocation of seed 1
             f"2={report(tmp_path / 'd.json', {'observed': 0.90, 'imagined': 0.60, 'random_world_model': 0.70}, shuffled=0.3)}"]
    out, png = tmp_path / "pooled.json", tmp_path / "seeds.png"
    r = subprocess.run([sys.executable, str(SCRIPT), *specs, "--json", str(out), "--plot", str(png)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pooled = json.loads(out.read_text())
    gain = pooled["pairs"]["imagined - observed"]["1024"]
    assert gain["seeds"] == ["0", "1", "2"] and gain["differences"] == pytest.approx([0.40, 0.02, -0.30])
    assert (gain["above"], gain["level"], gain["below"]) == (1, 1, 1)
    assert gain["mean"] == pytest.approx(0.04) and gain["ci_low"] < 0 < gain["ci_high"]
    assert gain["wilcoxon_p"] == pytest.approx(6 / 8)
    control = pooled["pairs"]["random_world_model - observed"]["1024"]
    assert control["seeds"] == ["1", "2"] and control["differences"] == pytest.approx([-0.40, -0.20])
    observed = pooled["arms"]["observed"]["1024"]
    assert observed["n"] == 3 and (observed["min"], observed["max"]) == pytest.approx((0.50, 0.90))
    assert observed["majority_min"] == observed["majority_max"] == 0.05
    ablation = pooled["pairs"]["imagined - imagined_shuffled"]["1024"]  # the ablations pair like arms
    assert ablation["seeds"] == ["0", "2"] and ablation["differences"] == pytest.approx([0.70, 0.30])
    assert "imagined - observed" in r.stdout and "+4.0" in r.stdout
    per_seed = r.stdout[r.stdout.index('"future" per seed at 1024 labels'):].splitlines()
    assert per_seed[2].split() == ["0", "50.0", "90.0", "-", "20.0"]  # observed, imagined, random, shuffled


def test_bare_reports_take_their_seed_from_the_file_name_and_seeds_sort_by_number(tmp_path):
    from pool_imagination import load_reports

    paths = [report(tmp_path / name, {"observed": 0.5}) for name in ("seed10.json", "seed2.json", "seed2_oracle.json", "other.json")]
    assert list(load_reports([str(path) for path in paths])) == ["2", "3", "10"]  # other.json: its position, 3


def test_a_file_that_is_not_a_report_is_refused_by_name(tmp_path):
    bad = tmp_path / "summary.json"
    bad.write_text("{}")
    r = subprocess.run([sys.executable, str(SCRIPT), str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "summary.json" in r.stderr and "eval_imagination" in r.stderr
