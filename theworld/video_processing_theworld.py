"""World clips as the Cosmos VAE takes them, computed the way Cosmos-Predict2 Video2World preprocesses.

The pipeline's own `VideoProcessor` resizes each frame with PIL lanczos to exactly `(H, W)` and scales it
to `[-1, 1]`; clips of several lengths are padded into one batch. `TheWorldProcessor` calls this for the
world path of every sample (as Gemma 3's processor calls its image processor for the SigLIP path);
tests/test_model_parity.py checks it against the pipeline. The frame-count rules (`latent_frames`,
`check_clip_length`) are the configuration's, shared with the model.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch
from diffusers.video_processor import VideoProcessor

from theworld.configuration_theworld import check_clip_length


def _to_pil(image) -> PIL.Image.Image:
    if isinstance(image, PIL.Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(
            f"world images must be PIL images or uint8 arrays of shape [H, W, 3], got dtype {array.dtype} and "
            f"shape {array.shape}"
        )
    return PIL.Image.fromarray(array)


def preprocess_world_images(images: Sequence, height: int, width: int) -> torch.Tensor:
    """Images (PIL or uint8 `[H, W, 3]`) -> `[B, 3, 1, height, width]` float32 in `[-1, 1]`.

    The pipeline's preprocessing: its `VideoProcessor` resizes PIL images with lanczos and scales to
    `[-1, 1]`; the frame axis is added as in `Cosmos2VideoToWorldPipeline.__call__` for an image input.
    uint8 arrays go through PIL first, so they are treated exactly like the same picture as a PIL image.
    """
    if height % 16 or width % 16:
        raise ValueError(f"world image size must be divisible by 16, got {height}x{width}")
    processor = VideoProcessor(vae_scale_factor=8)
    pil_images = [_to_pil(image) for image in images]
    return processor.preprocess(pil_images, height, width).unsqueeze(2).to(torch.float32)


def preprocess_world_clips(clips: Sequence[Sequence], height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips (each a list of frames, oldest first; an image is a one-frame clip) -> Cosmos VAE input.

    Returns `(pixels, num_frames)`: `pixels` `[B, 3, F_max, height, width]` float32 in `[-1, 1]`, every
    frame preprocessed as `preprocess_world_images` does; a clip shorter than `F_max` is padded with
    zero frames after its last frame. `num_frames` `[B]` says how many frames of each row are real; each
    must be `1 + 4k`.
    """
    counts = [len(clip) for clip in clips]
    for count in counts:
        check_clip_length(count)
    frames = preprocess_world_images([frame for clip in clips for frame in clip], height, width)[:, :, 0]
    pixels = frames.new_zeros(len(clips), 3, max(counts), height, width)
    start = 0
    for row, count in enumerate(counts):
        pixels[row, :, :count] = frames[start : start + count].transpose(0, 1)
        start += count
    return pixels, torch.tensor(counts)


__all__ = ["preprocess_world_images", "preprocess_world_clips"]
