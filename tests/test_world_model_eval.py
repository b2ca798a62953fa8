"""The counterfactual rollout evaluation (theworld.evaluation_world) on cases whose answer is known.

Real clips of the motion task, encoded by the real tiny Cosmos VAE; the "rollouts" are constructed so that
the right score is known in advance: the true future scores 100 %, any alternative 0 %, copying the last
frame exactly what the copy-last baseline scores.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan

from theworld.data.synthetic import CONTINUATIONS, SyntheticMotionTask
from theworld.evaluation_world import (
    RidgePredictor, baseline_forced_choice, copy_last, encode_counterfactuals, forced_choice_accuracy, latent_mse,
)
from theworld.modeling.world_encoder import CosmosWorldEncoder

SIZE = 16


@pytest.fixture(scope="module")
def counterfactuals(tiny_models):
    _, cosmos_dir = tiny_models
    encoder = CosmosWorldEncoder(AutoencoderKLWan.from_pretrained(cosmos_dir, subfolder="vae")).eval()
    return encode_counterfactuals(SyntheticMotionTask(split="heldout", size=SIZE, seed=1000), encoder, SIZE)


def test_counterfactual_clips_share_the_observed_frames_and_the_true_one_is_the_sample():
    task = SyntheticMotionTask(split="heldout", size=4, seed=3)
    for index in range(4):
        clips = task.counterfactual_clips(index)
        assert list(clips) == list(CONTINUATIONS)
        assert all(np.array_equal(a, b) for a, b in zip(clips["continues"], task[index]["images"]))
        for name, clip in clips.items():
            assert len(clip) == task.num_frames
            assert all(np.array_equal(a, b) for a, b in zip(clip[:5], clips["continues"][:5]))
            if name != "continues":
                assert not np.array_equal(clip[-1], clips["continues"][-1]), name


def test_counterfactual_latents_are_two_observed_frames_and_five_futures(counterfactuals):
    assert counterfactuals.observed.shape == (SIZE, 16, 2, 4, 4)
    assert counterfactuals.candidates.shape == (SIZE, len(CONTINUATIONS), 16, 1, 4, 4)
    assert counterfactuals.names[0] == "continues"


def test_the_true_future_as_rollout_scores_every_clip(counterfactuals):
    assert forced_choice_accuracy(counterfactuals.truth, counterfactuals.candidates) == 1.0
    assert latent_mse(counterfactuals.truth, counterfactuals.truth) == 0.0


@pytest.mark.parametrize("alternative", [1, 2, 3, 4])
def test_an_alternative_future_as_rollout_scores_nothing(counterfactuals, alternative):
    """A rollout that predicts the square stopping (or reversing, or turning) is never counted right."""
    assert forced_choice_accuracy(counterfactuals.candidates[:, alternative], counterfactuals.candidates) == 0.0


def test_copying_the_last_frame_scores_what_the_copy_last_baseline_scores(counterfactuals):
    copied = copy_last(counterfactuals.observed, 1)
    ridge = RidgePredictor.fit(counterfactuals.observed, counterfactuals.truth)
    assert forced_choice_accuracy(copied, counterfactuals.candidates) == baseline_forced_choice(counterfactuals, ridge)["copy_last"]
    assert torch.equal(copied[:, :, 0], counterfactuals.observed[:, :, -1])


def test_ties_count_as_wrong():
    candidates = torch.zeros(3, 5, 2)
    assert forced_choice_accuracy(torch.zeros(3, 2), candidates) == 0.0


def test_ridge_recovers_an_exact_linear_map():
    generator = torch.Generator().manual_seed(0)
    observed = torch.randn(200, 4, 2, 1, 1, generator=generator)
    weight = torch.randn(8, 4, generator=generator)
    future = (observed.flatten(1) @ weight + 0.5).view(200, 4, 1, 1, 1)
    ridge = RidgePredictor.fit(observed, future, alpha=1e-6)
    assert torch.allclose(ridge(observed), future, atol=1e-4)
