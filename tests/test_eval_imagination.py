"""scripts/eval_imagination.py's own parts (issue 23): the headline budget, the control arm's world model, the plot.
The whole experiment trains a dozen runs; docs/imagination.md records its measured run."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import eval_imagination  # noqa: E402


def entry(accuracy: float) -> dict:
    return {"accuracy": accuracy, "ci_low": accuracy - 0.05, "ci_high": accuracy + 0.05, "majority": 0.27, "n": 512}


def test_headline_budget_is_the_smallest_where_imagined_reaches_80_percent_else_the_largest():
    arms = {"imagined": {"256": {"future": entry(0.5)}, "1024": {"future": entry(0.8)}, "4096": {"future": entry(0.9)}}}
    assert eval_imagination.headline_budget(arms, [256, 1024, 4096]) == 1024
    arms["imagined"]["1024"]["future"] = entry(0.79)
    assert eval_imagination.headline_budget(arms, [256, 1024, 4096]) == 4096
    assert eval_imagination.headline_budget({"imagined": {"256": {"future": entry(0.3)}}}, [256, 1024]) == 1024


def test_budgets_flag_takes_positive_counts():
    assert eval_imagination.parse_budgets("4096, 256,1024") == [256, 1024, 4096]
    with pytest.raises(Exception, match="positive sample counts"):
        eval_imagination.parse_budgets("0,256")


def test_random_world_model_keeps_everything_but_the_transformer_weights(tmp_path):
    import torch
    from diffusers import CosmosTransformer3DModel
    from safetensors.torch import load_file

    from theworld.tiny import default_tiny_dir

    cosmos = next(p for p in Path(default_tiny_dir()).rglob("model_index.json")
                  if (p.parent / "transformer").is_dir()).parent
    control = eval_imagination.random_world_model(cosmos, tmp_path / "random", seed=0)
    assert sorted(p.name for p in control.iterdir()) == sorted(p.name for p in cosmos.iterdir())
    assert (CosmosTransformer3DModel.load_config(control / "transformer")
            == CosmosTransformer3DModel.load_config(cosmos / "transformer"))
    assert (control / "vae").is_dir() and (control / "scheduler").is_dir()
    # A post-trained world model's latent statistics go along (the same denoising space); the tiny build has none.
    from theworld.modeling.latent_statistics import LATENT_STATISTICS_FILE

    assert ((control / "transformer" / LATENT_STATISTICS_FILE).is_file()
            == (cosmos / "transformer" / LATENT_STATISTICS_FILE).is_file())
    trained = load_file(next((cosmos / "transformer").glob("*.safetensors")))
    fresh = load_file(next((control / "transformer").glob("*.safetensors")))
    assert trained.keys() == fresh.keys()
    assert any(not torch.equal(trained[k], fresh[k]) for k in trained)


def test_plot_draws_future_against_budget_per_arm(tmp_path):
    report = {"headline_budget": 256, "arms": {arm: {"256": {"future": entry(0.3)}, "1024": {"future": entry(0.5)}}
                                               for arm in eval_imagination.ARMS},
              "ablations": {"imagined_shuffled": {"256": {"future": entry(0.27)}}}}
    eval_imagination.plot(json.loads(json.dumps(report)), tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 1000


@pytest.mark.long
def test_the_script_runs_every_arm_and_writes_the_fixed_layout(tmp_path):
    """The experiment end to end at a toy scale, through its real command line: every arm trains with the
    trainer's code path (and its safety worker), is evaluated on the same held-out clips, and the JSON has the
    fixed layout; the rollout arms' comparison with the true future is recorded beside it."""
    import subprocess

    from theworld.tiny import default_tiny_dir

    cosmos = next(p for p in Path(default_tiny_dir()).rglob("model_index.json")
                  if (p.parent / "transformer").is_dir()).parent
    out, plot, runs = tmp_path / "imagination.json", tmp_path / "imagination.png", tmp_path / "runs"
    script = Path(eval_imagination.__file__)
    done = subprocess.run([sys.executable, str(script), "--json", str(out), "--plot", str(plot), "--output-dir",
                           str(runs), "--world-model", str(cosmos), "--budgets", "32,64", "--steps", "4",
                           "--eval-size", "24", "--rollout-steps", "2", "--quiet"],
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["headline_budget"] == 64  # 4 steps learn nothing: no budget reaches 80 %, so the largest
    assert set(report["arms"]) == set(eval_imagination.ARMS)
    for arm, by_budget in report["arms"].items():
        assert set(by_budget) == {"32", "64"}, arm
        for by_question in by_budget.values():
            assert set(by_question) == set(eval_imagination.QUESTIONS)
            for entry_ in by_question.values():
                assert set(entry_) == {"accuracy", "ci_low", "ci_high", "majority", "n"}
                assert 0 <= entry_["ci_low"] <= entry_["accuracy"] <= entry_["ci_high"] <= 1
    assert sum(report["arms"]["observed"]["64"][q]["n"] for q in eval_imagination.QUESTIONS) == 24
    for name in eval_imagination.ABLATIONS:
        assert set(report["ablations"][name]) == {"32", "64"} and set(report["ablations"][name]["64"]) == {"future"}
    record = json.loads((runs / "imagination_run.json").read_text())
    assert set(record["rollout_check"]) == {f"{arm}@{b}" for arm in ("imagined", "random_world_model") for b in (32, 64)}
    assert plot.stat().st_size > 0
    # Reused, not retrained: a second invocation finds every run's model and only evaluates.
    again = subprocess.run([sys.executable, str(script), "--json", str(out), "--plot", "", "--output-dir", str(runs),
                            "--world-model", str(cosmos), "--budgets", "32", "--steps", "4", "--eval-size", "24",
                            "--rollout-steps", "2", "--arms", "observed"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "training observed" not in again.stdout, again.stdout[-2000:]
