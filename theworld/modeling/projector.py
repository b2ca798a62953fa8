"""WorldProjector: normalised Cosmos latents of a clip -> world-token embeddings in Gemma's hidden size."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _summed_over_ranks(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """`tensors` summed over the ranks of a distributed run (one all-reduce); as they are in one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return list(tensors)
    flat = torch.cat([t.flatten() for t in tensors])
    dist.all_reduce(flat)
    return [chunk.view_as(t) for chunk, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


class LatentStandardizer(nn.Module):
    """Standardises every latent feature (channel, latent frame, position) with running statistics.

    Why: the VAE's per-channel normalisation (`latents_mean/std`) leaves a large per-position pattern
    that is the same for every input (on the tiny VAE about 91 % of the latents' second moment is shared
    by all clips), so the part that differs between clips, the only part that carries information, is
    a small ripple on a constant. Measured on the motion task: with per-channel statistics neither the
    direction nor the colour was learnt in 1,000 steps; with every feature standardised the direction
    starts to be learnt within a few hundred.

    The statistics are cumulative over every batch seen in training mode (the Cosmos VAE is frozen, so
    its latents are stationary and the running mean converges to the data's); evaluation uses them as
    they are, so train and eval apply the same function once a few batches have been seen. They are
    buffers: saved with the trainable weights and restored on resume.
    """

    def __init__(self, channels: int, frames: int, grid: tuple[int, int], eps: float = 1e-5):
        super().__init__()
        shape = (channels, frames, *grid)
        self.eps = eps
        self.register_buffer("count", torch.zeros(frames, dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("sumsq", torch.zeros(shape))  # sum of squared deviations (Chan et al.)

    @torch.no_grad()
    def update(self, latents: torch.Tensor, frame_mask: torch.Tensor) -> None:
        """Add the real frames (`frame_mask` `[B, T]`) of a batch `[B, C, T, h, w]` to the statistics.

        In a distributed run (every rank runs the training forward) the batch is every rank's batch: the
        ranks' moments are summed, so all ranks keep the same statistics whether or not anything syncs
        buffers (DDP broadcasts rank 0's; FSDP syncs none)."""
        x = latents.detach().double()
        weight = frame_mask.to(x.dtype)  # [B, T]
        rows = weight[:, None, :, None, None]
        counts, sums, squares = _summed_over_ranks(weight.sum(0), (x * rows).sum(0), (x * x * rows).sum(0))
        for t in range(x.shape[2]):
            n_b = float(counts[t])
            if n_b == 0:
                continue
            mean_b = sums[:, t] / n_b
            self._merge(t, n_b, mean_b.float(), (squares[:, t] / n_b - mean_b.pow(2)).clamp(min=0).float())

    def _merge(self, t: int, n_b: float, mean_b: torch.Tensor, var_b: torch.Tensor) -> None:
        """Fold a batch's moments of latent frame `t` into the running ones (Chan et al.)."""
        n_a = float(self.count[t])
        delta = mean_b - self.mean[:, t]
        total = n_a + n_b
        self.mean[:, t] += delta * (n_b / total)
        self.sumsq[:, t] += var_b * n_b + delta.pow(2) * (n_a * n_b / total)
        self.count[t] = total

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        frames = latents.shape[2]
        count = self.count[:frames].to(latents.dtype).view(1, 1, frames, 1, 1)
        mean = self.mean[:, :frames].unsqueeze(0)
        std = torch.sqrt(self.sumsq[:, :frames].unsqueeze(0) / count.clamp(min=1) + self.eps)
        seen = count > 1  # a frame index never seen in training passes through unchanged
        return torch.where(seen, (latents - mean) / std, latents)


class LatentWhitener(nn.Module):
    """Whitens each latent frame as one vector (`C * h * w` values) with running mean and covariance.

    Why (the `"frame"` projection): that projection reads a whole latent frame with one linear map, and
    the tiny VAE mixes every pixel into every latent cell, so the latent features are strongly correlated;
    gradient descent on a linear readout of correlated inputs learns slowly along the weak directions,
    which is where motion is. Measured on the motion task (ad-hoc probes, not project scripts): a readout
    like the projector's trained on cached tiny-VAE latents (400 steps of 16 direction samples, 512
    held-out clips, background ``[0, 8)``) reads the direction 32 % of the time with every feature
    standardised and 98 % whitened; in the in-process trainer loop (800 steps of batch 16, 16 frame
    tokens, seed 0) 74 % with ``eps=0.1`` and 95 % with ``eps=0.01``.

    Statistics are cumulative over the real frames seen in training mode, per latent frame index, like
    `LatentStandardizer`'s; the whitening matrix `(cov + (eps * mean eigenvalue + 1e-5) * I)^(-1/2)` is recomputed
    from them in a forward after they changed, so once per training step: an eigendecomposition of a `D x D`
    matrix, `D = C * h * w`, per latent frame index. On one thread (as `_eigh` runs it) that took 6 ms at
    `D = 256` (the tiny default), 0.16 s at 1024 and 8.7 s at 4096 (measured by hand on the 2-core
    development machine), hence the limit `MAX_FEATURES`. Buffers, saved with the weights and restored on resume.
    """

    MAX_FEATURES = 1024  # a larger D makes the eigendecomposition the training step (8.7 s at 4096)

    def __init__(self, channels: int, frames: int, grid: tuple[int, int], eps: float = 0.01):
        super().__init__()
        features = channels * grid[0] * grid[1]
        if features > self.MAX_FEATURES:
            raise ValueError(
                f"the 'frame' projection whitens each latent frame as one vector of channels x positions = "
                f"{features} values (at most {self.MAX_FEATURES}: every training step eigendecomposes a matrix of that "
                f"side, 8.7 s at 4096 on one CPU thread): pool the latent grid with world_tokens_per_side, or use "
                f"another world_projection"
            )
        self.eps = eps
        self.register_buffer("count", torch.zeros(frames, dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(frames, features, dtype=torch.float64))
        self.register_buffer("comoment", torch.zeros(frames, features, features, dtype=torch.float64))
        self._whitening: tuple[tuple, list] | None = None  # (statistics' fingerprint, matrix per frame)

    @staticmethod
    def _eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`torch.linalg.eigh` on one thread: LAPACK's result changes in the last bits with the thread count,
        which would make a resumed run differ from an uninterrupted one (the trainer sets the thread count)."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return torch.linalg.eigh(matrix)
        finally:
            torch.set_num_threads(threads)

    @torch.no_grad()
    def update(self, latents: torch.Tensor, frame_mask: torch.Tensor) -> None:
        """Add the real frames (`frame_mask` `[B, T]`) of a batch `[B, C, T, h, w]` to the statistics
        (in a distributed run, every rank's batch: see `LatentStandardizer.update`)."""
        x = latents.detach().double().transpose(1, 2).flatten(2)  # [B, T, D]
        weight = frame_mask.to(x.dtype)  # [B, T]
        weighted = x * weight[..., None]
        counts, sums, products = _summed_over_ranks(
            weight.sum(0), weighted.sum(0), torch.einsum("btd,bte->tde", weighted, x)
        )
        for t in range(x.shape[1]):
            n_b = float(counts[t])
            if n_b == 0:
                continue
            mean_b = sums[t] / n_b
            n_a = float(self.count[t])
            total = n_a + n_b
            delta = mean_b - self.mean[t]
            self.mean[t] += delta * (n_b / total)
            comoment_b = products[t] - torch.outer(mean_b, mean_b) * n_b
            self.comoment[t] += comoment_b + torch.outer(delta, delta) * (n_a * n_b / total)
            self.count[t] = total

    def _matrices(self) -> list[torch.Tensor | None]:
        """The whitening matrix of each latent frame index (None: never seen in training), float64.

        Recomputed only when the statistics changed: every training step changes them, but evaluation and
        generation reuse the matrices (three eigendecompositions of 256 x 256 cost ~10 ms a forward on the
        tiny models). The fingerprint (counts and sums of the buffers) also notices statistics that were
        loaded or copied in place."""
        fingerprint = (tuple(self.count.tolist()), float(self.mean.sum()), float(self.comoment.sum()), self.comoment.device)
        if self._whitening is None or self._whitening[0] != fingerprint:
            matrices = []
            for t, count in enumerate(fingerprint[0]):
                if count <= 1:  # a frame index never seen in training passes through unchanged
                    matrices.append(None)
                    continue
                cov = self.comoment[t].double() / count  # float64 whatever dtype the module was cast to
                eigenvalues, vectors = self._eigh(cov)
                eigenvalues = eigenvalues.clamp(min=0)
                # + an absolute floor (LatentStandardizer's): frames seen without any variance stay finite
                eigenvalues = eigenvalues + self.eps * eigenvalues.mean() + 1e-5
                matrices.append((vectors * eigenvalues.rsqrt()) @ vectors.T)
            self._whitening = (fingerprint, matrices)
        return self._whitening[1]

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        batch, channels, frames, height, width = latents.shape
        x = latents.transpose(1, 2).flatten(2)  # [B, T, D]
        matrices = self._matrices()
        out = []
        for t in range(frames):
            if matrices[t] is None:
                out.append(x[:, t])
            else:
                out.append((x[:, t] - self.mean[t].to(x.dtype)) @ matrices[t].to(x.dtype))
        return torch.stack(out, 1).view(batch, frames, channels, height, width).transpose(1, 2)


class WorldProjector(nn.Module):
    """Projects the latents of a clip `[B, C, T, h, w]` to world tokens `[B, T * tokens_per_frame, hidden]`.

    - `"spatial"`: one token per latent position of each latent frame (optionally average-pooled to
      `tokens_per_side` squared positions); each token projects the `C` channels at its position.
    - `"channel"`: one token per latent channel of each latent frame; each projects that channel's map.
    - `"frame"`: `frame_tokens` tokens per latent frame, each a function of the whole latent frame and
      of its change since the previous latent frame (zero for a clip's first). Motion is a change of
      *where* something is, which no single position holds: here one layer sees every position of two
      consecutive frames, so the language model reads motion from one token instead of having to compare
      positions across frames itself (measured on the motion task: see `docs/model.md`). Its input grows
      with the latent grid (`2 * C * h * w`), so pool large grids with `tokens_per_side`.

    Every latent feature is standardised first (`LatentStandardizer`); the `"frame"` projection whitens
    each latent frame instead (`LatentWhitener`), since it reads all of a frame's features at once. A learned temporal embedding
    (one vector per latent frame index, up to `max_frames`, zero at initialisation) tells the frames
    apart: index 0 is a clip's first latent frame, and a world rollout continues the indices after the
    clip's last one. The output is RMS-normalised and scaled by a learned gain that starts at
    `output_scale` (TheWorld sets it to the rms of Gemma's text embeddings), so world tokens enter the
    language model at the scale of the text around them. Weights stay float32 whatever the language
    model's dtype: mixed precision comes from autocast, not from low-precision master weights.
    """

    def __init__(
        self,
        latent_channels: int,
        latent_size: tuple[int, int],
        hidden_size: int,
        max_frames: int = 1,
        projection: str = "spatial",
        projector_type: str = "mlp",
        tokens_per_side: int | None = None,
        output_scale: float = 1.0,
        frame_tokens: int = 16,
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
        self.max_frames = max_frames
        grid = (tokens_per_side, tokens_per_side) if tokens_per_side else (latent_h, latent_w)
        self.grid = grid
        positions = grid[0] * grid[1]
        if projection == "spatial":
            in_features, self.tokens_per_frame = latent_channels, positions
        elif projection == "channel":
            in_features, self.tokens_per_frame = positions, latent_channels
        elif projection == "frame":
            if frame_tokens < 1:
                raise ValueError(f"frame_tokens must be >= 1, got {frame_tokens}")
            in_features, self.tokens_per_frame = 2 * latent_channels * positions, frame_tokens
        else:
            raise ValueError(f"projection must be 'spatial', 'channel' or 'frame', got {projection!r}")
        # "frame" emits all of a frame's tokens from one vector; the others one token per input row.
        out_features = hidden_size * (self.tokens_per_frame if projection == "frame" else 1)
        if projection == "frame":
            self.standardizer = LatentWhitener(latent_channels, max_frames, grid)
        else:
            self.standardizer = LatentStandardizer(latent_channels, max_frames, grid)
        if projector_type == "mlp":
            # The MLP is never narrower than its input: a hidden layer narrower than a "frame" input (the tiny
            # model's 64 for 2 x 256 whitened values) is a bottleneck that training fills with what is learnt
            # first (the colour) and the motion is squeezed out (docs/training.md, "Every seed").
            width = max(hidden_size, in_features)
            self.proj = nn.Sequential(
                nn.Linear(in_features, width), nn.GELU(approximate="tanh"), nn.Linear(width, out_features)
            )
        elif projector_type == "linear":
            self.proj = nn.Sequential(nn.Linear(in_features, out_features))
        else:
            raise ValueError(f"projector_type must be 'mlp' or 'linear', got {projector_type!r}")
        self.temporal_embedding = nn.Parameter(torch.zeros(max_frames, hidden_size))
        self.output_gain = nn.Parameter(torch.full((hidden_size,), float(output_scale)))

    def num_tokens(self, latent_frames: int) -> int:
        """World tokens of a world with this many latent frames (rollout frames included)."""
        return latent_frames * self.tokens_per_frame

    def forward(self, latents: torch.Tensor, num_latent_frames: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns `(embeds, mask)`: `embeds` `[B, T * tokens_per_frame, hidden]` and `mask` (True on the
        tokens of each row's real frames). A row with fewer latent frames than `T` has its real frames
        first and padding after (`CosmosWorldEncoder.encode_clips`); latent frame `t` gets temporal
        embedding `t`."""
        batch, channels, frames, height, width = latents.shape
        if frames > self.max_frames:
            raise ValueError(
                f"the projector has temporal embeddings for {self.max_frames} latent frame(s) (world_max_frames), "
                f"got {frames}: use shorter clips or fewer rollout steps, or build the model with a larger "
                f"world_max_frames"
            )
        if num_latent_frames is None:
            num_latent_frames = torch.full((batch,), frames, dtype=torch.long)
        frame_mask = torch.arange(frames, device=latents.device)[None, :] < num_latent_frames.to(latents.device)[:, None]
        x = latents.to(self.temporal_embedding.dtype)
        if (height, width) != self.grid:
            if self.tokens_per_side is None:
                raise ValueError(
                    f"latent grid {height}x{width} does not match the projector's {self.grid[0]}x{self.grid[1]}: "
                    f"the world image size changed since the model was built"
                )
            x = F.adaptive_avg_pool3d(x, (frames, *self.grid))
        if self.training:
            self.standardizer.update(x, frame_mask)
        x = self.standardizer(x)
        if self.projection == "spatial":
            tokens = x.permute(0, 2, 3, 4, 1).reshape(batch, frames, -1, channels)  # [B, T, positions, C]
        elif self.projection == "channel":
            tokens = x.flatten(3).transpose(1, 2)  # [B, T, C, positions]
        else:
            # Padding frames are zeroed so that no real frame's change is taken from padding.
            x = x * frame_mask[:, None, :, None, None].to(x.dtype)
            change = x - torch.cat([x[:, :, :1], x[:, :, :-1]], dim=2)  # a clip's first frame: no change
            tokens = torch.cat([x, change], dim=1).transpose(1, 2).flatten(2)  # [B, T, 2 * C * positions]
        embeds = self.proj(tokens)
        if self.projection == "frame":
            embeds = embeds.view(batch, frames, self.tokens_per_frame, -1)
        embeds = embeds + self.temporal_embedding[:frames, None, :]
        embeds = embeds * torch.rsqrt(embeds.pow(2).mean(-1, keepdim=True) + 1e-6) * self.output_gain
        mask = frame_mask[:, :, None].expand(batch, frames, self.tokens_per_frame)
        return embeds.reshape(batch, frames * self.tokens_per_frame, -1), mask.reshape(batch, -1)
