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
