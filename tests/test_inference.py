"""theworld.inference: the one loader and the one "is this a saved TheWorld" rule, on the real tiny models."""
from __future__ import annotations

import pytest

from theworld.inference.loading import is_saved_theworld, load_model


@pytest.fixture(scope="module")
def saved_model(tiny_models, tmp_path_factory):
    gemma_dir, cosmos_dir = tiny_models
    path = tmp_path_factory.mktemp("saved") / "model"
    load_model(gemma_dir, cosmos_dir, num_world_steps=1).save_pretrained(path)
    return path


def test_only_a_saved_theworld_is_one(saved_model, tiny_models, tmp_path):
    gemma_dir, cosmos_dir = tiny_models
    assert is_saved_theworld(saved_model)
    assert not is_saved_theworld(gemma_dir)  # a base Gemma 3 directory: config.json of model_type gemma3
    assert not is_saved_theworld(cosmos_dir)
    assert not is_saved_theworld(tmp_path / "missing")
    assert not is_saved_theworld("google/gemma-3-4b-it")  # a hub id is a base model, never a saved TheWorld


def test_a_saved_theworld_loads_with_its_own_settings(saved_model):
    model = load_model(saved_model)
    assert model.config.num_world_steps == 1 and model.world_encoder is not None


def test_a_saved_theworld_refuses_another_rollout(saved_model):
    with pytest.raises(ValueError, match=r"trained with num_world_steps=1 .* use --rollout 1"):
        load_model(saved_model, num_world_steps=2)


def test_a_base_gemma_without_cosmos_is_refused_with_what_to_pass(tiny_models):
    gemma_dir, _ = tiny_models
    with pytest.raises(ValueError, match="not a saved TheWorld .* pass --cosmos"):
        load_model(gemma_dir)


def test_the_trainer_continues_a_saved_theworld_through_the_same_loader(saved_model):
    from theworld.training import build_model
    from theworld.training.arguments import ModelArguments

    model = build_model(ModelArguments(gemma_model=str(saved_model), freeze_gemma_language=True), seed=0)
    assert model.config.num_world_steps == 1  # the saved model's own settings, not the trainer's defaults
    assert not any(p.requires_grad for p in model.model.language_model.parameters())
