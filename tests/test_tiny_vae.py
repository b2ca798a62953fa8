"""The tiny Cosmos VAE of the default build (``build_tiny_models``), trained as an autoencoder: its latents are
more local in space and reach further in time than the random VAE's, and it decodes the frames better
(docs/world_model.md, "Tiny VAE"). The floors are what the current training (version 1) reaches with a
margin, not the issue's targets, which it does not meet yet (locality 50 %, PSNR 26 dB; the cause, a
mean-frame plateau, is in the doc). The random VAE (``--random-vae``) fails all three (measured by
scripts/eval_tiny_vae.py: locality 18 %, temporal 0.7 %, PSNR 5.5 dB)."""
import threading

import pytest

# Measured on the trained VAE (seed 0): locality 36 %, temporal 39 %, PSNR 14.4 dB on clips, 14.5 dB on
# single frames encoded alone.
LOCALITY_FLOOR = 0.30
TEMPORAL_FLOOR = 0.25
PSNR_FLOOR_DB = 12.0


@pytest.fixture(scope="module")
def trained_cosmos_dir(tiny_models):
    # The session's default build: its VAE is trained once per machine (the weights are cached under
    # THEWORLD_TINY_DIR, and a lock keeps concurrent test processes from training it twice).
    return tiny_models[1]


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


def test_random_vae_build_is_marked_apart_from_the_default_one(trained_cosmos_dir, tmp_path):
    # A random-VAE cache must never be reused as the default (trained) one, nor the other way round.
    from safetensors.torch import load_file

    from theworld.tiny import _COMPLETE_MARKER, RANDOM_VAE_VARIANT, TINY_FORMAT_VERSION, build_tiny_models

    _, random_cosmos = build_tiny_models(tmp_path, seed=0, trained_vae=False)
    default_marker = (trained_cosmos_dir / _COMPLETE_MARKER).read_text().split()
    random_marker = (random_cosmos / _COMPLETE_MARKER).read_text().split()
    assert default_marker == [str(TINY_FORMAT_VERSION), "seed=0"]
    assert random_marker == default_marker + [RANDOM_VAE_VARIANT]
    weights = "vae/diffusion_pytorch_model.safetensors"
    trained, random = load_file(trained_cosmos_dir / weights), load_file(random_cosmos / weights)
    assert any(not trained[name].equal(random[name]) for name in trained)
    # Asked for the default in the random build's directory, the builder rebuilds it instead of reusing it.
    build_tiny_models(tmp_path, seed=0)
    assert (random_cosmos / _COMPLETE_MARKER).read_text().split() == default_marker
    rebuilt = load_file(random_cosmos / weights)
    assert all(rebuilt[name].equal(trained[name]) for name in trained)


def test_the_default_builds_vae_is_the_cached_training(trained_cosmos_dir):
    from safetensors.torch import load_file

    from theworld.tiny import _trained_vae_weights

    cached, saved = load_file(_trained_vae_weights(0)), load_file(trained_cosmos_dir / "vae" / "diffusion_pytorch_model.safetensors")
    assert cached.keys() == saved.keys() and all(saved[name].equal(cached[name]) for name in cached)


def test_concurrent_builds_train_the_vae_once(tmp_path, monkeypatch):
    """Two builders with an empty weight cache (two test processes on a fresh machine, each building into its
    own directory under its own build lock): one trains, the other waits and loads its weights."""
    import time

    import torch
    from diffusers import AutoencoderKLWan

    from theworld import tiny

    monkeypatch.setenv("THEWORLD_TINY_DIR", str(tmp_path))
    fits = []

    def fit(vae, seed):  # the training itself is tested above; here only who runs it
        fits.append(seed)
        time.sleep(0.5)  # long enough for the other builder to find no weights without the lock
        with torch.no_grad():
            for parameter in vae.parameters():
                parameter.fill_(len(fits))

    monkeypatch.setattr(tiny, "_fit_tiny_vae", fit)
    vaes = [AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                             temperal_downsample=[False, True, True]) for _ in range(2)]
    builders = [threading.Thread(target=tiny._train_tiny_vae, args=(vae, 0)) for vae in vaes]
    for builder in builders:
        builder.start()
    for builder in builders:
        builder.join()
    assert fits == [0]
    assert all(torch.equal(a, b) for a, b in zip(vaes[0].state_dict().values(), vaes[1].state_dict().values()))
    assert tiny._trained_vae_weights(0).is_file()


def test_a_random_vae_build_needs_its_own_directory(capsys):
    from theworld.tiny import build_tiny_models, main

    with pytest.raises(ValueError, match="random VAE"):
        build_tiny_models(None, trained_vae=False)
    with pytest.raises(SystemExit):
        main(["--random-vae"])
    assert "--random-vae needs an OUTDIR" in capsys.readouterr().err
