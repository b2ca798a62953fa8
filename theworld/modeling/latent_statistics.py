"""Per-element standardisation of world-model latents: the space a post-trained tiny Cosmos transformer denoises in.

Why: the Cosmos VAE's per-channel normalisation (`latents_mean` / `latents_std`) leaves a large pattern per
channel, latent frame and cell that is the same for every clip: on the tiny VAEs the future latent frame's
second moment is 1.43 (random VAE) while it varies between clips by 0.086, and consecutive latent frames
differ by a per-frame offset (the causal VAE's first frame encodes one video frame, the others four). A
transformer asked to predict those latents spends itself on the constant and has no bias in its patch
embedding or output projection to hold it; standardised, every element has mean 0 and variance 1 and only
the part that differs between clips is left to predict (docs/world_model.md, "train_world", has the
measurements). Each element `(channel, latent frame, cell)` is standardised with the mean and standard
deviation of the training latents; latent frames past the last one measured reuse its statistics (every
latent frame after the first compresses four video frames alike).

Where the statistics live: `transformer/theworld_latent_statistics.safetensors` in the Cosmos directory
that `python -m theworld.train_world` writes (`LATENT_STATISTICS_FILE`), beside the transformer's weights,
because they belong to the transformer: they define the space its weights denoise in, and whatever copies
or loads the transformer folder must carry them. diffusers' loaders read only the files they know, so the
directory stays a plain diffusers layout; every theworld consumer of `--cosmos-model` (the rollout of
`TheWorld` and so `generate` and `serve`, the evaluation, `scripts/eval_world_model.py`) loads them with
`WorldLatentStatistics.load`. A Cosmos directory without the file (the real Cosmos-Predict2, the tiny build)
denoises the VAE's own latent space, as the diffusers pipeline does.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

LATENT_STATISTICS_FILE = "theworld_latent_statistics.safetensors"
_FORMAT = "theworld-world-latent-statistics"
_FORMAT_VERSION = "1"


class WorldLatentStatistics(nn.Module):
    """Mean and standard deviation of every latent element `(channel, latent frame, cell)`, `[C, T, h, w]`.

    In training they are accumulated from the first `max_clips` clips' latents (`update`, summed over the
    ranks of a distributed run) and then stay fixed, so the transformer trains on one input space from then
    on. They are buffers: a checkpoint saves them and `--resume` restores them. `standardize` and
    `destandardize` are the identity until two clips have been seen.
    """

    def __init__(self, channels: int, frames: int, grid: tuple[int, int], max_clips: int | None = None,
                 eps: float = 1e-6):
        super().__init__()
        shape = (channels, frames, *grid)
        self.max_clips, self.eps = max_clips, eps
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("var", torch.ones(shape, dtype=torch.float64))

    @property
    def ready(self) -> bool:
        return float(self.count) > 1

    @property
    def frozen(self) -> bool:
        return self.max_clips is not None and float(self.count) >= self.max_clips

    @torch.no_grad()
    def update(self, latents: torch.Tensor) -> None:
        """Fold the clips of a batch `[B, C, T, h, w]` (T covering every measured frame) into the statistics
        (Chan et al.'s parallel merge), unless `max_clips` have been seen already."""
        from theworld.modeling.projector import _summed_over_ranks

        if self.frozen:
            return
        frames = self.mean.shape[1]
        self._check_grid(latents)
        if latents.shape[2] < frames:
            raise ValueError(f"the latent statistics measure {frames} latent frames; got clips of {latents.shape[2]}")
        x = latents[:, :, :frames].detach().double()
        n_b, sums, squares = _summed_over_ranks(torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device),
                                                x.sum(0), x.pow(2).sum(0))
        mean_b = sums / n_b
        var_b = (squares / n_b - mean_b.pow(2)).clamp(min=0)
        n_a = self.count
        total = n_a + n_b
        delta = mean_b - self.mean
        self.var.copy_((self.var * n_a + var_b * n_b + delta.pow(2) * n_a * n_b / total) / total)
        self.mean.add_(delta * n_b / total)
        self.count.copy_(total)

    def _check_grid(self, latents: torch.Tensor) -> None:
        if tuple(latents.shape[1:2]) + tuple(latents.shape[3:]) != (self.mean.shape[0], *self.mean.shape[2:]):
            raise ValueError(
                f"this world model's latent statistics are for {self.mean.shape[0]} channels on a "
                f"{self.mean.shape[2]}x{self.mean.shape[3]} latent grid (the frame size it was trained on); got latents "
                f"{tuple(latents.shape)}: give frames of the training size")

    def _moments(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std `[1, C, T, h, w]` for `latents`' T frames (past the measured ones: the last one's)."""
        self._check_grid(latents)
        index = torch.arange(latents.shape[2], device=self.mean.device).clamp(max=self.mean.shape[1] - 1)
        mean = self.mean[:, index].unsqueeze(0)
        std = (self.var[:, index] + self.eps).sqrt().unsqueeze(0)
        return mean.to(latents.device, latents.dtype), std.to(latents.device, latents.dtype)

    def standardize(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised VAE latents `[B, C, T, h, w]` (frame 0 a clip's first) -> the transformer's space."""
        if not self.ready:
            return latents
        mean, std = self._moments(latents)
        return (latents - mean) / std

    def destandardize(self, latents: torch.Tensor) -> torch.Tensor:
        """The transformer's space -> normalised VAE latents (the inverse of `standardize`)."""
        if not self.ready:
            return latents
        mean, std = self._moments(latents)
        return latents * std + mean

    def save(self, transformer_dir: str | os.PathLike) -> Path:
        """Write the statistics into a saved transformer's folder (`LATENT_STATISTICS_FILE`)."""
        from safetensors.torch import save_file

        if not self.ready:
            raise ValueError("no latent statistics measured yet (fewer than two clips seen): nothing to save")
        path = Path(transformer_dir) / LATENT_STATISTICS_FILE
        save_file({"mean": self.mean.contiguous(), "var": self.var.contiguous(), "count": self.count.reshape(1)},
                  path, metadata={"format": _FORMAT, "version": _FORMAT_VERSION, "eps": repr(self.eps)})
        return path

    @classmethod
    def load(cls, cosmos_model: str | os.PathLike | None) -> "WorldLatentStatistics | None":
        """The statistics saved with a Cosmos directory's transformer, or None when it has none (the real
        Cosmos-Predict2 and the tiny build denoise the VAE's own latent space). Only local directories carry
        them (`python -m theworld.train_world` writes one); a hub id has none."""
        from safetensors import safe_open

        if cosmos_model is None:
            return None
        path = Path(cosmos_model) / "transformer" / LATENT_STATISTICS_FILE
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != _FORMAT or metadata.get("version") != _FORMAT_VERSION:
                raise ValueError(f"{path} is not a version-{_FORMAT_VERSION} theworld latent statistics file "
                                 f"(metadata {metadata}); re-run python -m theworld.train_world with this version")
            tensors = {name: f.get_tensor(name) for name in ("mean", "var", "count")}
        channels, frames, height, width = tensors["mean"].shape
        statistics = cls(channels, frames, (height, width), max_clips=0, eps=float(metadata.get("eps", 1e-6)))
        statistics.mean.copy_(tensors["mean"])
        statistics.var.copy_(tensors["var"])
        statistics.count.copy_(tensors["count"].reshape(()))
        return statistics
