"""Configuration of TheWorld: a Gemma 3 configuration plus the world-model settings."""
from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoConfig, Gemma3Config

WORLD_PROJECTIONS = ("spatial", "channel", "frame")
WORLD_PROJECTOR_TYPES = ("mlp", "linear")
# The Wan VAE of Cosmos-Predict2 compresses time by 4, causally: 1 + 4k frames -> 1 + k latent frames.
VAE_TEMPORAL_FACTOR = 4


# The frame-count rules live with the configuration (whose `world_max_frames` counts latent frames) because
# both sides need them: the processor sizes each world block with them, the model checks its input with
# them, and neither may import the other.
def latent_frames(num_frames: int) -> int:
    """Latent frames the Cosmos VAE makes of a clip of `num_frames` frames (which must be 1 + 4k)."""
    check_clip_length(num_frames)
    return (num_frames - 1) // VAE_TEMPORAL_FACTOR + 1


def check_clip_length(num_frames: int) -> None:
    """Raise unless the Cosmos VAE can take a clip of this many frames whole (1 + 4k: 1, 5, 9, 13, ...).

    The Wan VAE silently drops frames beyond the last 1 + 4k, so any other count would lose frames.
    """
    if num_frames < 1 or (num_frames - 1) % VAE_TEMPORAL_FACTOR:
        below = max(1, (num_frames - 1) // VAE_TEMPORAL_FACTOR * VAE_TEMPORAL_FACTOR + 1)
        raise ValueError(
            f"a world clip must have 1 + 4k frames (1, 5, 9, 13, 17, ...: the Cosmos VAE compresses time by 4), "
            f"got {num_frames}; use {below} or {below + VAE_TEMPORAL_FACTOR} frames"
        )


def check_world_image_size(size) -> list[int]:
    """`[height, width]` of a world image as ints; raise unless both are positive multiples of 16.

    The one rule for the size the Cosmos VAE sees: TheWorld's configuration and `theworld.train_world`'s
    `--world-image-size` both apply it."""
    size = [int(v) for v in size]
    if len(size) != 2 or any(v <= 0 or v % 16 for v in size):
        raise ValueError(
            f"world_image_size must be [height, width], both positive multiples of 16 (the Cosmos VAE "
            f"downsamples by 8 and the transformer patches by 2), got {size}"
        )
    return size


class TheWorldConfig(Gemma3Config):
    r"""
    Everything `Gemma3Config` holds (the language and vision towers), plus where the base models come
    from and how Cosmos world latents become world tokens.

    A saved TheWorld directory holds this configuration and only the trainable weights; the frozen parts
    are rebuilt from `gemma_model_name_or_path` and `cosmos_model_name_or_path` on load.

    Args:
        gemma_model_name_or_path (`str`, *optional*):
            Hub id or local directory of the base Gemma 3 model (e.g. `google/gemma-3-4b-it`, or the tiny
            model written by `python -m theworld.tiny`).
        cosmos_model_name_or_path (`str`, *optional*):
            Hub id or local directory of a Cosmos-Predict2 Video2World diffusers repository (e.g.
            `nvidia/Cosmos-Predict2-2B-Video2World`). Its `vae` subfolder is always loaded when
            `enable_world` is set; its `transformer` and `scheduler` only for a world rollout.
        enable_world (`bool`, *optional*, defaults to `True`):
            Insert world tokens. `False` makes TheWorld exactly the base Gemma 3 (no Cosmos weights loaded).
        world_projection (`str`, *optional*, defaults to `"spatial"`):
            `"spatial"`: one world token per latent position (after optional pooling), projecting the
            latent channels. `"channel"`: one world token per latent channel, projecting its spatial map.
            `"frame"`: `world_frame_tokens` tokens per latent frame, each projecting the whole latent frame
            and its change since the previous latent frame (how the tiny models learn motion in minutes).
        world_projector_type (`str`, *optional*, defaults to `"mlp"`):
            `"mlp"` (Linear-GELU-Linear) or `"linear"`.
        world_tokens_per_side (`int`, *optional*):
            Average-pool each latent frame to this many positions per side before projecting. `None`
            keeps every latent position (a 256x256 image is a 32x32 latent: 1024 tokens per frame).
        world_frame_tokens (`int`, *optional*, defaults to 16):
            World tokens per latent frame of the `"frame"` projection (ignored by the others).
        world_image_size (`list[int]`, *optional*):
            `[height, width]` the world image is resized to before the Cosmos VAE, both divisible by 16.
            `None` uses the Gemma vision tower's image size.
        num_world_steps (`int`, *optional*, defaults to 0):
            Future latent frames predicted by the Cosmos transformer (world rollout) after the clip's own and
            added as world tokens. 0 encodes the input clip only and loads no transformer.
        world_rollout_steps (`int`, *optional*):
            Sampling steps of the world rollout this model was trained with (`theworld.train
            --world-rollout-steps`): the rollout its world tokens were learnt on, so inference (`generate`,
            `serve`, evaluation) rolls out the same way unless told otherwise. `None`: the pipeline's 35.
        world_max_frames (`int`, *optional*, defaults to 8):
            Most latent frames one sample's world may have: the clip's own (`1 + (F - 1) // 4` for `F` video
            frames, `F = 1 + 4k`) plus `num_world_steps`. The projector has one learned temporal embedding
            per latent frame index up to this.
        world_latent_channels (`int`, *optional*, defaults to 16):
            Latent channels of the Cosmos VAE (`z_dim`; 16 for Cosmos-Predict2). Checked when the VAE loads.
        freeze_gemma_vision (`bool`, *optional*, defaults to `True`):
            Freeze the SigLIP vision tower and Gemma's multimodal projector.
        freeze_gemma_language (`bool`, *optional*, defaults to `True`):
            Freeze the language model (embeddings, decoder layers, LM head).
        freeze_cosmos_vae (`bool`, *optional*, defaults to `True`):
            Freeze the Cosmos VAE encoder. Its decoder is never trained and never saved.
        sow_token / eow_token / world_token (`str`, *optional*):
            The tokens that open a world block, close it, and hold one world embedding each. They are added
            to the tokenizer when missing; the embedding table is only ever grown, never shrunk.
        sow_token_index / eow_token_index / world_token_index (`int`, *optional*):
            Their ids, filled in when the tokenizer is extended.
    """

    model_type = "theworld"

    gemma_model_name_or_path: str | None = None
    cosmos_model_name_or_path: str | None = None
    enable_world: bool = True
    world_projection: str = "spatial"
    world_projector_type: str = "mlp"
    world_tokens_per_side: int | None = None
    world_frame_tokens: int = 16
    world_image_size: list[int] | None = None
    num_world_steps: int = 0
    world_rollout_steps: int | None = None
    world_max_frames: int = 8
    world_latent_channels: int = 16
    freeze_gemma_vision: bool = True
    freeze_gemma_language: bool = True
    freeze_cosmos_vae: bool = True
    sow_token: str = "<start_of_world>"
    eow_token: str = "<end_of_world>"
    world_token: str = "<world_soft_token>"
    sow_token_index: int | None = None
    eow_token_index: int | None = None
    world_token_index: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.world_projection not in WORLD_PROJECTIONS:
            raise ValueError(f"world_projection must be one of {WORLD_PROJECTIONS}, got {self.world_projection!r}")
        if self.world_projector_type not in WORLD_PROJECTOR_TYPES:
            raise ValueError(
                f"world_projector_type must be one of {WORLD_PROJECTOR_TYPES}, got {self.world_projector_type!r}"
            )
        if self.num_world_steps < 0:
            raise ValueError(f"num_world_steps must be >= 0, got {self.num_world_steps}")
        if self.world_max_frames < 1 + self.num_world_steps:
            raise ValueError(
                f"world_max_frames={self.world_max_frames} leaves no room for a clip plus {self.num_world_steps} "
                f"rolled-out frame(s): use at least {1 + self.num_world_steps}"
            )
        if self.world_rollout_steps is not None and self.world_rollout_steps < 2:
            raise ValueError(f"world_rollout_steps must be at least 2 (1 step returns the noise), got "
                             f"{self.world_rollout_steps}")
        if self.world_frame_tokens < 1:
            raise ValueError(f"world_frame_tokens must be >= 1, got {self.world_frame_tokens}")
        if self.world_tokens_per_side is not None and self.world_tokens_per_side < 1:
            raise ValueError(f"world_tokens_per_side must be >= 1 or None, got {self.world_tokens_per_side}")
        if self.world_image_size is not None:
            self.world_image_size = check_world_image_size(self.world_image_size)

    @property
    def resolved_world_image_size(self) -> tuple[int, int]:
        """`(height, width)` of the world image: `world_image_size`, else the vision tower's image size."""
        if self.world_image_size is not None:
            return tuple(self.world_image_size)
        side = self.vision_config.image_size
        if side % 16:
            raise ValueError(
                f"the vision tower's image size {side} is not a multiple of 16; set world_image_size=[H, W]"
            )
        return side, side


def saved_theworld_config(path) -> TheWorldConfig | None:
    """The TheWorldConfig of a directory written by `TheWorld.save_pretrained`, else None (a hub id, a base
    Gemma 3, anything else). The one rule for "is this a saved TheWorld": the loader, `from_pretrained`
    and the trainer all ask it."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return None
    if json.loads(config_file.read_text()).get("model_type") != TheWorldConfig.model_type:
        return None
    return TheWorldConfig.from_pretrained(path)


AutoConfig.register("theworld", TheWorldConfig)

__all__ = ["TheWorldConfig", "saved_theworld_config", "latent_frames", "check_clip_length", "check_world_image_size",
           "VAE_TEMPORAL_FACTOR"]
