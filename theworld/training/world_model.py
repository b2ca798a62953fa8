"""The world model `python -m theworld.train_world` post-trains: the Cosmos transformer with its Video2World
objective, the VAE frozen, and the Cosmos directory it is saved as.

The objective (Cosmos-Predict2's Video2World post-training: cosmos-predict2,
documentations/post-training_video2world.md, and `RectifiedFlowScaling` in imaginaire's
`modules/denoiser_scaling.py`):

- clips are encoded by the frozen VAE (posterior mode, normalised latents) and, for a transformer trained from
  scratch (the tiny default), standardised per element with statistics of the training latents
  (`theworld.modeling.latent_statistics`: accumulated over the first clips, then fixed, saved with the
  transformer); the first `condition_frames`
  latent frames are given clean, flagged in the condition-mask channel, at timestep `1e-4 / (1 + 1e-4)`;
- the rest are noised at one sigma per clip, `x_sigma = x0 + sigma * eps`, with `ln sigma ~ N(sigma_mean,
  sigma_std)` times `sqrt(latent frames)` when `sigma_frame_scaling` (Cosmos scales sigma so for video);
- parameterisation: rectified flow in EDM form, `t = sigma / (1 + sigma)`; the transformer sees
  `(1 - t) x0 + t eps` and predicts the velocity `v = eps - x0`; `x0_hat = (1 - t) x_sigma - t v_hat`
  (`theworld.modeling.rollout.video2world_x0`, the same arithmetic as the rollout);
- loss: MSE of `x0_hat` on the predicted frames, weighted per clip by `(1 + sigma)^2 / sigma^2`
  (`loss_weighting="rectified-flow"`, Cosmos's; algebraically the velocity MSE) or unweighted
  (`"x0"`, the plain x0 objective, which helped a small DiT on these latents in a measurement by hand,
  issue 22). Cosmos also multiplies the loss by 10; under AdamW that constant only rescales epsilon, so
  it is left out.
"""
from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from theworld.modeling.latent_statistics import WorldLatentStatistics
from theworld.modeling.rollout import SIGMA_MAX, SIGMA_MIN, video2world_x0
from theworld.modeling.world_encoder import CosmosWorldEncoder

LOSS_WEIGHTINGS = ("rectified-flow", "x0")
# Attention and feed-forward projections of diffusers' CosmosTransformerBlock.
DEFAULT_TRANSFORMER_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class WorldModelOutput:
    """`loss`: the mean weighted x0 error of the batch; `sigma`: the noise level of each clip."""

    loss: torch.Tensor
    sigma: torch.Tensor


class VideoToWorldTrainee(nn.Module):
    """The Cosmos transformer under Video2World training, with the frozen VAE that encodes its clips.

    `forward(world_pixel_values)` takes clips `[B, 3, F, H, W]` in `[-1, 1]` (all of one length) and returns
    a `WorldModelOutput`; `noise` and `sigma` may be given (held-out evaluation fixes them), else they are
    drawn from torch's global generator (saved in checkpoints, so a resumed run draws the same ones).

    `statistics`: the per-element latent statistics the transformer denoises in (None: the VAE's latent space).
    Unless frozen, the training forward folds each batch into them until their `max_clips` are seen; the loss
    is the x0 error in that standardised space."""

    def __init__(self, transformer: nn.Module, encoder: CosmosWorldEncoder, condition_frames: int = 2,
                 loss_weighting: str = "rectified-flow", sigma_mean: float = 0.0, sigma_std: float = 1.0,
                 sigma_frame_scaling: bool = True, statistics: WorldLatentStatistics | None = None):
        super().__init__()
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {loss_weighting!r}")
        if condition_frames < 1:
            raise ValueError(f"condition_frames must be >= 1 (Video2World predicts from observed frames), got {condition_frames}")
        self.transformer, self.encoder = transformer, encoder
        self.encoder.requires_grad_(False)
        self.condition_frames, self.loss_weighting = condition_frames, loss_weighting
        self.sigma_mean, self.sigma_std, self.sigma_frame_scaling = sigma_mean, sigma_std, sigma_frame_scaling
        self.statistics = statistics

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: the trainable weights (the transformer's, or its LoRA adapters) and the
        latent statistics (accumulated in training: a resumed run must continue from them)."""
        state = {name: p.detach().contiguous() for name, p in self.named_parameters() if p.requires_grad}
        if self.statistics is not None:
            state.update({f"statistics.{name}": b.detach().contiguous() for name, b in self.statistics.named_buffers()})
        return state

    def sample_sigma(self, batch: int, latent_frames: int, generator: torch.Generator | None = None,
                     device=None) -> torch.Tensor:
        """One noise level per clip: log-normal, times sqrt(latent frames) for video, within the schedule."""
        log_sigma = self.sigma_mean + self.sigma_std * torch.randn(batch, generator=generator, device=device)
        sigma = log_sigma.exp() * (math.sqrt(latent_frames) if self.sigma_frame_scaling else 1.0)
        return sigma.clamp(SIGMA_MIN, SIGMA_MAX)

    def encode(self, world_pixel_values: torch.Tensor, num_frames: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            latents, lengths = self.encoder.encode_clips(world_pixel_values, num_frames)
        if len(set(lengths.tolist())) != 1:
            raise ValueError("world-model training takes clips of one length per batch; got latent lengths "
                             f"{sorted(set(lengths.tolist()))} (give clips of one frame count)")
        if latents.shape[2] <= self.condition_frames:
            raise ValueError(f"clips of {latents.shape[2]} latent frames leave nothing to predict after "
                             f"--condition-frames {self.condition_frames}: use longer clips (1 + 4k frames, "
                             f"k >= {self.condition_frames}) or fewer condition frames")
        return latents.float()

    def forward(self, world_pixel_values: torch.Tensor, num_frames: torch.Tensor | None = None,
                noise: torch.Tensor | None = None, sigma: torch.Tensor | None = None) -> WorldModelOutput:
        x0 = self.encode(world_pixel_values, num_frames)
        if self.statistics is not None:
            if self.training:
                self.statistics.update(x0)
            x0 = self.statistics.standardize(x0)
        batch, latent_frames = x0.shape[0], x0.shape[2]
        if sigma is None:
            sigma = self.sample_sigma(batch, latent_frames, device=x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        sigma = sigma.to(x0.device, torch.float32)
        noisy = x0 + sigma.view(-1, 1, 1, 1, 1) * noise
        cond = self.condition_frames
        predicted = video2world_x0(self.transformer, noisy, sigma, x0[:, :, :cond])
        error = (predicted[:, :, cond:] - x0[:, :, cond:]).pow(2).flatten(1).mean(1)
        weight = ((1 + sigma) / sigma).pow(2) if self.loss_weighting == "rectified-flow" else torch.ones_like(sigma)
        return WorldModelOutput(loss=(weight * error).mean(), sigma=sigma)


def cosmos_source_dir(cosmos_model: str) -> Path:
    """The local directory of a Cosmos repository (a directory as given, else its hub snapshot, without the
    transformer, which train_world writes itself)."""
    path = Path(cosmos_model)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(cosmos_model, ignore_patterns=["transformer/*"]))


def save_world_model(transformer, cosmos_model: str, output: Path,
                     statistics: WorldLatentStatistics | None = None) -> Path:
    """Write `output` as a complete Cosmos directory in the diffusers layout: every frozen part (VAE,
    scheduler, text encoder, tokenizer, model_index.json) copied from `cosmos_model`, the trained
    transformer saved in `transformer/` (LoRA adapters merged into its weights, so any diffusers or theworld
    loader reads it as a plain `CosmosTransformer3DModel`), with the latent `statistics` it denoises in
    beside its weights when it has them (`theworld.modeling.latent_statistics`)."""
    source = cosmos_source_dir(cosmos_model)
    tmp = output.with_name(output.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("transformer", ".*"))
    if hasattr(transformer, "merge_and_unload"):  # a peft model: merge a copy, keep training the adapters
        import copy

        transformer = copy.deepcopy(transformer).merge_and_unload()
    transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
    if statistics is not None and statistics.ready:
        statistics.save(tmp / "transformer")
    shutil.rmtree(output, ignore_errors=True)
    tmp.rename(output)
    return output
