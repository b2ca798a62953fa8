"""The world model's per-element latent standardisation (theworld.modeling.latent_statistics): measured from
training latents, inverted exactly, saved beside the transformer and used by every consumer that loads it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from theworld.modeling.latent_statistics import LATENT_STATISTICS_FILE, WorldLatentStatistics
from theworld.modeling.rollout import sample_world_latents

SHAPE = (16, 3, 4, 4)  # the motion task's latents: 16 channels, 3 latent frames, a 4x4 grid


def structured_latents(count: int, seed: int = 0) -> torch.Tensor:
    """Latents with a large per-element offset and a small per-element spread, as the tiny VAEs give."""
    generator = torch.Generator().manual_seed(seed)
    offset = 3 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(99))
    spread = 0.05 + torch.rand(SHAPE, generator=torch.Generator().manual_seed(98))
    return offset + spread * torch.randn(count, *SHAPE, generator=generator)


def measured(latents: torch.Tensor, batch: int = 16, max_clips: int | None = None) -> WorldLatentStatistics:
    statistics = WorldLatentStatistics(SHAPE[0], SHAPE[1], SHAPE[2:], max_clips=max_clips)
    for start in range(0, len(latents), batch):
        statistics.update(latents[start : start + batch])
    return statistics


def test_standardised_training_latents_have_zero_mean_and_unit_variance_per_element():
    latents = structured_latents(256)
    standardised = measured(latents).standardize(latents)
    assert standardised.mean(0).abs().max() < 1e-4
    assert (standardised.var(0, unbiased=False) - 1).abs().max() < 1e-3


def test_destandardize_inverts_standardize_and_later_frames_reuse_the_last_frames_statistics():
    statistics = measured(structured_latents(64))
    longer = torch.randn(2, SHAPE[0], SHAPE[1] + 2, *SHAPE[2:])
    assert torch.allclose(statistics.destandardize(statistics.standardize(longer)), longer, atol=1e-5)
    standardised = statistics.standardize(longer)
    last = (longer[:, :, -1] - statistics.mean[:, -1].float()) / (statistics.var[:, -1].float() + statistics.eps).sqrt()
    assert torch.allclose(standardised[:, :, -1], last, atol=1e-5)


def test_statistics_are_fixed_after_max_clips_and_identity_before_any():
    assert torch.equal(WorldLatentStatistics(*SHAPE[:2], SHAPE[2:]).standardize(torch.ones(1, *SHAPE)), torch.ones(1, *SHAPE))
    latents = structured_latents(64)
    statistics = measured(latents[:32], max_clips=32)
    mean = statistics.mean.clone()
    statistics.update(latents[32:] + 10)
    assert statistics.frozen and float(statistics.count) == 32 and torch.equal(statistics.mean, mean)


def test_a_grid_other_than_the_training_one_is_refused_with_the_reason():
    statistics = measured(structured_latents(32))
    with pytest.raises(ValueError, match="latent grid"):
        statistics.standardize(torch.zeros(1, 16, 3, 8, 8))


def test_saved_world_model_carries_its_statistics_and_every_loader_uses_them(tiny_models, tmp_path):
    """save_world_model writes them beside the transformer's weights; diffusers still loads the transformer;
    WorldLatentStatistics.load, the evaluation script's loader and the sampler use them."""
    import importlib.util

    from diffusers import CosmosTransformer3DModel

    from theworld.train import TASK_FILE
    from theworld.training.world_model import save_world_model

    _, cosmos = tiny_models
    transformer = CosmosTransformer3DModel.from_pretrained(cosmos, subfolder="transformer").eval()
    statistics = measured(structured_latents(64))
    model = save_world_model(transformer, str(cosmos), tmp_path / "model", statistics)
    assert (model / "transformer" / LATENT_STATISTICS_FILE).is_file()
    assert not (cosmos / "transformer" / LATENT_STATISTICS_FILE).exists()
    CosmosTransformer3DModel.from_pretrained(model, subfolder="transformer")  # still a plain diffusers folder

    loaded = WorldLatentStatistics.load(model)
    assert torch.equal(loaded.mean, statistics.mean) and torch.equal(loaded.var, statistics.var)
    assert loaded.frozen and WorldLatentStatistics.load(cosmos) is None

    (model / TASK_FILE).write_text(json.dumps({"data": "synthetic"}))
    spec = importlib.util.spec_from_file_location(
        "eval_world_model", Path(__file__).resolve().parent.parent / "scripts" / "eval_world_model.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    *_, from_script = script.load_world_model(model)
    assert torch.equal(from_script.mean, statistics.mean)

    # The sampler runs in the transformer's space: standardised conditioning in, destandardised latents out.
    observed = structured_latents(2, seed=5)[:, :, :2]
    noise = torch.randn(2, *SHAPE)
    with_statistics = sample_world_latents(transformer, observed, 1, 2, noise=noise, statistics=loaded)
    in_its_space = sample_world_latents(transformer, loaded.standardize(observed), 1, 2, noise=noise)
    assert torch.equal(with_statistics[:, :, :2], observed)
    assert torch.allclose(with_statistics[:, :, 2:], loaded.destandardize(in_its_space)[:, :, 2:], atol=1e-5)
