"""The opt-in trained tiny Cosmos VAE (``build_tiny_models(..., trained_vae=True)``): its latents are more
local in space and reach further in time than the random VAE's, and it decodes the frames better
(docs/world_model.md, "Tiny VAE"). The floors are what the current training (version 1) reaches with a
margin, not the issue's targets, which it does not meet yet (locality 50 %, PSNR 26 dB; the cause, a
mean-frame plateau, is in the doc). The random VAE fails all three (measured by scripts/eval_tiny_vae.py:
locality 18 %, temporal 0.7 %, PSNR 5.5 dB)."""
import pytest

# Training the tiny VAE takes 2-4.5 minutes on 2 cores the first time on a machine (a fresh CI machine):
# a full-budget run, so it runs with the long test command.
pytestmark = pytest.mark.long

# Measured on the trained VAE (seed 0): locality 36 %, temporal 39 %, PSNR 14.4 dB on clips, 14.5 dB on
# single frames encoded alone.
LOCALITY_FLOOR = 0.30
TEMPORAL_FLOOR = 0.25
PSNR_FLOOR_DB = 12.0


@pytest.fixture(scope="module")
def trained_cosmos_dir(tmp_path_factory):
    from theworld.tiny import build_tiny_models

    # The trained weights are cached under THEWORLD_TINY_DIR: only the first session on a machine trains.
    return build_tiny_models(tmp_path_factory.mktemp("tiny_trained_vae"), seed=0, trained_vae=True)[1]


@pytest.fixture(scope="module")
def trained_vae(trained_cosmos_dir):
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan.from_pretrained(trained_cosmos_dir, subfolder="vae").eval()


@pytest.fixture(scope="module")
def figures(trained_vae):
    from theworld.tiny import measure_tiny_vae

    return measure_tiny_vae(trained_vae, clips=32)


def test_moving_the_square_one_cell_changes_mostly_the_latents_under_it(figures):
    # Chance (a change spread evenly over the 16 latent cells): 2 / 16.
    assert figures["locality"] >= LOCALITY_FLOOR, figures


def test_changing_the_last_four_frames_moves_the_last_latent_frame(figures):
    assert figures["temporal"] >= TEMPORAL_FLOOR, figures


def test_held_out_clips_decode_closer_to_their_frames_than_a_random_vae(figures):
    assert figures["psnr_db"] >= PSNR_FLOOR_DB, figures


def test_single_frames_encoded_alone_decode_closer_than_a_random_vae(figures):
    # The spatial layers on their own (one latent frame): a clip figure alone would not say which half failed.
    assert figures["frame_psnr_db"] >= PSNR_FLOOR_DB, figures


def test_latent_statistics_are_recalibrated_after_training(trained_vae):
    import torch

    from theworld.modeling.world_encoder import CosmosWorldEncoder
    from theworld.video_processing_theworld import preprocess_world_clips
    from theworld.tiny import _calibration_clips

    encoder = CosmosWorldEncoder(trained_vae)
    pixels, _ = preprocess_world_clips(_calibration_clips(), 32, 32)
    with torch.no_grad():
        latents = encoder.normalize(trained_vae.encode(pixels).latent_dist.mode())
    per_channel = latents.transpose(0, 1).flatten(1)
    assert per_channel.mean(dim=1).abs().max() < 1e-3
    assert ((per_channel.std(dim=1) - 1).abs() < 1e-3).all()


def test_trained_build_is_marked_apart_from_the_default_one(trained_cosmos_dir, tiny_models):
    # A random-VAE cache must never be reused as a trained one, nor the other way round.
    from theworld.tiny import _COMPLETE_MARKER

    _, default_cosmos = tiny_models
    trained = (trained_cosmos_dir / _COMPLETE_MARKER).read_text()
    assert trained.split()[-1] == "trained-vae" and trained != (default_cosmos / _COMPLETE_MARKER).read_text()
