"""World preprocessing and normalised latents equal the diffusers Video2World pipeline's own.

The pipeline imports cosmos_guardrail (autograd off), so its side runs in a subprocess and hands back
tensors in a safetensors file.
"""
import subprocess
import sys

import numpy as np
import PIL.Image
import torch
from safetensors.torch import load_file

from theworld.modeling import CosmosWorldEncoder
from theworld.video_processing_theworld import preprocess_world_images

HEIGHT, WIDTH = 32, 48  # non-square, and the images below need real resizing
SEED = 7

PIPELINE_SIDE = """
import sys
import PIL.Image
import torch
from safetensors.torch import save_file
from diffusers import Cosmos2VideoToWorldPipeline

cosmos_dir, image_paths, out, height, width, seed = sys.argv[1], sys.argv[2].split(","), sys.argv[3], *map(int, sys.argv[4:])
class NoGuard(torch.nn.Module):  # the guard plays no part in preprocessing or latents
    pass
pipe = Cosmos2VideoToWorldPipeline.from_pretrained(cosmos_dir, safety_checker=NoGuard())
images = [PIL.Image.open(p) for p in image_paths]
tensors = {}
for i, image in enumerate(images):
    # Exactly the pipeline's __call__ for an image input, then its prepare_latents.
    video = pipe.video_processor.preprocess(image, height, width).unsqueeze(2)
    _, cond_latents, *_ = pipe.prepare_latents(
        video, 1, pipe.transformer.config.in_channels - 1, height, width, num_frames=1,
        do_classifier_free_guidance=False, dtype=torch.float32, device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(seed),
    )
    tensors[f"video{i}"] = video.contiguous()
    tensors[f"latents{i}"] = cond_latents.contiguous()
tensors["grad_enabled"] = torch.tensor([torch.is_grad_enabled()])
save_file(tensors, out)
"""


def _images(tmp_path):
    rng = np.random.default_rng(3)
    paths = []
    for i, size in enumerate([(37, 53), (64, 40)]):
        path = tmp_path / f"image{i}.png"
        PIL.Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_preprocessing_and_latents_match_the_pipeline(tiny_models, tmp_path):
    _, cosmos_dir = tiny_models
    paths = _images(tmp_path)
    out = tmp_path / "pipeline.safetensors"
    result = subprocess.run(
        [sys.executable, "-c", PIPELINE_SIDE, str(cosmos_dir), ",".join(map(str, paths)), str(out),
         str(HEIGHT), str(WIDTH), str(SEED)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    pipeline = load_file(out)
    # The pipeline process did lose autograd (the reason this runs in a subprocess) ...
    assert not bool(pipeline["grad_enabled"])
    # ... and this one did not.
    assert torch.is_grad_enabled()

    # uint8 arrays, as the dataset yields them, preprocess exactly like the pipeline's PIL input.
    arrays = [np.asarray(PIL.Image.open(p)) for p in paths]
    ours = preprocess_world_images(arrays, HEIGHT, WIDTH)
    assert ours.shape == (2, 3, 1, HEIGHT, WIDTH)
    for i in range(2):
        assert torch.equal(ours[i : i + 1], pipeline[f"video{i}"])

    encoder = CosmosWorldEncoder.from_pretrained(cosmos_dir)
    for i in range(2):
        with torch.no_grad():
            latents = encoder(ours[i : i + 1], generator=torch.Generator().manual_seed(SEED), sample=True)
        assert latents.shape == (1, 16, 1, HEIGHT // 8, WIDTH // 8)
        assert torch.equal(latents, pipeline[f"latents{i}"])


def test_batched_encoding_equals_one_image_at_a_time(tiny_models):
    _, cosmos_dir = tiny_models
    encoder = CosmosWorldEncoder.from_pretrained(cosmos_dir)
    rng = np.random.default_rng(5)
    video = preprocess_world_images([rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(3)], 32, 32)
    with torch.no_grad():
        batched = encoder(video)
        single = torch.cat([encoder(video[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)
    # Normalisation is invertible: denormalize gives back the VAE's raw posterior mean.
    with torch.no_grad():
        raw = encoder.vae.encode(video).latent_dist.mode()
    torch.testing.assert_close(encoder.denormalize(batched), raw, rtol=1e-5, atol=1e-5)
