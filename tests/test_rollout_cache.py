"""The rollout cache (`TheWorld.rollout_cache`, `--rollout-cache-mb`): a frozen world model with noise seeded
per clip rolls a clip out the same way every time, so its rollouts are reused, bounded, and exactly what
an empty cache (a resumed run) computes again (issue 23)."""
import pytest
import torch

from fixtures_model import load_tiny_world
from theworld.modeling.world_encoder import LatentCache
from theworld.training.model import configure_rollout

STEPS = 2  # sampling steps: the tiny shapes keep every rollout cheap


@pytest.fixture(scope="module")
def clips():
    """Normalised latents of six 9-frame clips at the tiny model's world size: [6, 16, 3, 4, 4]."""
    return torch.randn(6, 16, 3, 4, 4, generator=torch.Generator().manual_seed(0))


def rolling_model(tiny_models, cache_mb: float = 1):
    model = load_tiny_world(tiny_models, num_world_steps=1).eval()
    configure_rollout(model, STEPS, cache_mb)
    return model


def test_a_cached_rollout_is_a_function_of_the_clip_alone_and_exact_after_a_restart(tiny_models, clips):
    model = rolling_model(tiny_models)
    first = model.roll_out(clips[:4])
    assert first.shape == (4, 16, 4, 4, 4) and torch.equal(first[:, :, :3], clips[:4])
    assert (model.rollout_cache.misses, model.rollout_cache.hits, len(model.rollout_cache)) == (4, 0, 4)
    # Another batch, another order: the same clips get the same rollouts, from the cache.
    again = model.roll_out(clips[[2, 0, 5]])
    assert torch.equal(again[:2], first[[2, 0]]) and model.rollout_cache.hits == 2
    # A resumed run starts with an empty cache: it rolls the clips out again, in other batches, bit for bit.
    restarted = rolling_model(tiny_models)
    assert torch.equal(restarted.roll_out(clips[[0, 2]]), first[[0, 2]])
    assert torch.equal(restarted.roll_out(clips[5:6]), again[2:3])
    # Not a constant: different clips roll out differently.
    assert not torch.equal(first[0, :, 3:], first[1, :, 3:])


def test_the_cache_key_holds_the_sampling_settings_and_the_world_model(tiny_models, clips):
    model = rolling_model(tiny_models)
    base = model.roll_out(clips[:2])
    for change in ({"seed": 1}, {"num_inference_steps": STEPS + 1}, {"fps": 24}):
        other = rolling_model(tiny_models)
        other.rollout_cache = model.rollout_cache  # one shared cache: only the key can tell them apart
        for name, value in change.items():
            setattr(other.rollout_config, name, value)
        misses = model.rollout_cache.misses
        assert not torch.equal(other.roll_out(clips[:2]), base), change
        assert model.rollout_cache.misses == misses + 2, change
    retrained = rolling_model(tiny_models)
    retrained.rollout_cache = model.rollout_cache
    with torch.no_grad():
        next(retrained.world_transformer.parameters()).add_(0.01)
    misses = model.rollout_cache.misses
    assert not torch.equal(retrained.roll_out(clips[:2]), base)
    assert model.rollout_cache.misses == misses + 2


def test_the_cache_is_bounded_and_a_transformer_in_training_bypasses_it(tiny_models, clips):
    model = rolling_model(tiny_models)
    model.roll_out(clips[:1])
    entry = model.rollout_cache.bytes
    model.rollout_cache = LatentCache(max_bytes=2 * entry)
    model.roll_out(clips)
    assert len(model.rollout_cache) == 2 and model.rollout_cache.bytes <= 2 * entry
    model.world_transformer.requires_grad_(True)
    calls = (model.rollout_cache.hits, model.rollout_cache.misses)
    model.roll_out(clips[:2])
    assert (model.rollout_cache.hits, model.rollout_cache.misses) == calls


def test_rollout_flags_are_checked_before_training(tiny_models):
    with pytest.raises(ValueError, match="at least 2"):
        configure_rollout(load_tiny_world(tiny_models, num_world_steps=1), 1, 0)
    still = load_tiny_world(tiny_models)
    with pytest.raises(ValueError, match="add --num-world-steps"):
        configure_rollout(still, 4, 256)
    configure_rollout(still, None, 256)
    assert still.rollout_cache is None  # nothing to roll out, nothing to cache


def test_the_rollout_steps_of_training_are_saved_and_inference_rolls_out_the_same_way(tiny_models, tmp_path):
    """A model trained with --world-rollout-steps learnt its world tokens on rollouts of that many steps:
    saved in its config, they are what `generate` and `serve` (the batching engine) use unless told otherwise."""
    from theworld import TheWorld
    from theworld.inference.engine import BatchingEngine
    from theworld.modeling.rollout import RolloutConfig

    model = rolling_model(tiny_models, cache_mb=0)
    assert model.config.world_rollout_steps == STEPS
    model.save_pretrained(tmp_path / "model")
    loaded = TheWorld.from_pretrained(tmp_path / "model").eval()
    assert loaded.config.world_rollout_steps == STEPS and loaded.rollout_config.num_inference_steps == STEPS
    untrained = load_tiny_world(tiny_models, num_world_steps=1)
    assert untrained.config.world_rollout_steps is None
    for model_, asked, expected in ((loaded, None, STEPS), (loaded, 7, 7), (untrained, None, RolloutConfig.num_inference_steps)):
        engine = BatchingEngine(model_, rollout_steps=asked)
        try:
            assert model_.rollout_config.num_inference_steps == expected, (asked, expected)
        finally:
            engine.close()
    with pytest.raises(ValueError, match="world_rollout_steps must be at least 2"):
        type(loaded.config)(world_rollout_steps=1)
