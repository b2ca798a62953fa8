"""WorldProjector: normalised Cosmos latents -> world-token embeddings in Gemma's hidden size."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class WorldProjector(nn.Module):
    """Projects latents `[B, C, T, h, w]` to `[B, T * tokens_per_frame, hidden_size]`.

    - `"spatial"`: one token per latent position (optionally average-pooled to `tokens_per_side`
      squared positions); each token projects the `C` channels at its position.
    - `"channel"`: one token per latent channel; each token projects that channel's spatial map.

    A learned temporal embedding (one vector per latent frame, zero at initialisation) tells the
    frames of a world rollout apart. Weights stay float32 whatever the language model's dtype: mixed
    precision comes from autocast, not from low-precision master weights.
    """

    def __init__(
        self,
        latent_channels: int,
        latent_size: tuple[int, int],
        hidden_size: int,
        num_frames: int = 1,
        projection: str = "spatial",
        projector_type: str = "mlp",
        tokens_per_side: int | None = None,
    ):
        super().__init__()
        latent_h, latent_w = latent_size
        if tokens_per_side is not None and (tokens_per_side > latent_h or tokens_per_side > latent_w):
            raise ValueError(
                f"world_tokens_per_side={tokens_per_side} exceeds the latent grid {latent_h}x{latent_w}; "
                f"use at most {min(latent_h, latent_w)} or a larger world_image_size"
            )
        self.projection = projection
        self.tokens_per_side = tokens_per_side
        self.num_frames = num_frames
        grid = (tokens_per_side, tokens_per_side) if tokens_per_side else (latent_h, latent_w)
        self.grid = grid
        positions = grid[0] * grid[1]
        if projection == "spatial":
            in_features, self.tokens_per_frame = latent_channels, positions
        elif projection == "channel":
            in_features, self.tokens_per_frame = positions, latent_channels
        else:
            raise ValueError(f"projection must be 'spatial' or 'channel', got {projection!r}")
        if projector_type == "mlp":
            self.proj = nn.Sequential(
                nn.Linear(in_features, hidden_size), nn.GELU(approximate="tanh"), nn.Linear(hidden_size, hidden_size)
            )
        elif projector_type == "linear":
            self.proj = nn.Sequential(nn.Linear(in_features, hidden_size))
        else:
            raise ValueError(f"projector_type must be 'mlp' or 'linear', got {projector_type!r}")
        self.temporal_embedding = nn.Parameter(torch.zeros(num_frames, hidden_size))

    @property
    def num_tokens(self) -> int:
        """World tokens per sample (all frames)."""
        return self.num_frames * self.tokens_per_frame

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        batch, channels, frames, height, width = latents.shape
        if frames != self.num_frames:
            raise ValueError(
                f"the projector was built for {self.num_frames} latent frame(s) (1 + num_world_steps), got {frames}"
            )
        x = latents.to(self.temporal_embedding.dtype)
        if (height, width) != self.grid:
            if self.tokens_per_side is None:
                raise ValueError(
                    f"latent grid {height}x{width} does not match the projector's {self.grid[0]}x{self.grid[1]}: "
                    f"the world image size changed since the model was built"
                )
            x = F.adaptive_avg_pool3d(x, (frames, *self.grid))
        if self.projection == "spatial":
            tokens = x.permute(0, 2, 3, 4, 1).reshape(batch, frames, -1, channels)  # [B, T, positions, C]
        else:
            tokens = x.flatten(3).transpose(1, 2)  # [B, T, C, positions]
        embeds = self.proj(tokens) + self.temporal_embedding[:, None, :]
        return embeds.reshape(batch, frames * self.tokens_per_frame, -1)
