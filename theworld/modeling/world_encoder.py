"""Cosmos world latents of an image, computed the way Cosmos-Predict2 Video2World computes them.

Only the VAE submodule is used (`AutoencoderKLWan` from the repository's `vae` subfolder); the
diffusers pipeline is never imported here (it imports the guardrail, which switches autograd off).
Latents are normalised exactly as the pipeline's `prepare_latents` does:
`(z - latents_mean) / latents_std * sigma_data`. The pixels come from
`theworld.video_processing_theworld` (the pipeline's own preprocessing). tests/test_model_parity.py
checks both against the pipeline on the same weights.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
from diffusers import AutoencoderKLWan
from torch import nn

from theworld.configuration_theworld import check_clip_length

# The Video2World pipeline's scheduler `sigma_data`: latents are scaled by it after normalisation.
SIGMA_DATA = 1.0


class LatentCache:
    """Latents of clips already encoded by a frozen VAE, keyed by a digest of their pixels (LRU, bounded
    in bytes). A frozen VAE's posterior mean is a function of the pixels, so a clip seen again in a
    later epoch (or a held-out clip at every evaluation) is not encoded again.

    A function of the pixels and of the size of the batch that encoded them: the VAE's convolutions
    round differently with the batch size, not with the other clips in it (on the tiny VAE on a CPU,
    sizes 2, 4 and 8 agree bit for bit, 1, 3 and 16 each differ, up to 7e-6; a permuted batch of 4
    agrees; measured by hand). Clips of one length in full batches, as the synthetic tasks' runs, are
    therefore encoded the same whether cached or not, and a resumed run, whose cache starts empty,
    repeats the uninterrupted one. With clips of mixed lengths (encoded in per-length groups of varying
    size) a re-encoded clip can differ in the last bits from its cached latents. Encoding every miss
    alone would remove that at 2.2x the encoding time of a batch of 16 on the tiny VAE.
    """

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = 0
        self._entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()

    @staticmethod
    def key(pixels: torch.Tensor, context: bytes = b"") -> bytes:
        """Digest of a tensor's values and shape; ``context`` (e.g. the model and settings that turn it into
        what is cached) is hashed with it, so that one cache class serves latents and rollouts alike."""
        data = pixels.detach().to("cpu", torch.float32).contiguous().numpy()
        return hashlib.blake2b(data.tobytes() + context, digest_size=16,
                               person=str(tuple(data.shape)).encode()[:16]).digest()

    def get(self, key: bytes) -> torch.Tensor | None:
        latents = self._entries.get(key)
        if latents is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return latents

    def put(self, key: bytes, latents: torch.Tensor) -> None:
        latents = latents.detach()
        size = latents.numel() * latents.element_size()
        if size > self.max_bytes or key in self._entries:
            return
        self._entries[key] = latents
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()

    def __len__(self) -> int:
        return len(self._entries)


def module_digest(*modules: nn.Module | None) -> bytes:
    """Digest of the names, dtypes, shapes and values of the modules' parameters and buffers (None counts as
    a module of its own): the identity of a frozen model in cache keys."""
    digest = hashlib.blake2b(digest_size=16)
    for module in modules:
        digest.update(b"<module>" if module is not None else b"<none>")
        for name, tensor in (module.state_dict() if module is not None else {}).items():
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.digest()


class CosmosWorldEncoder(nn.Module):
    """The Cosmos VAE as TheWorld's world encoder: pixels `[B, 3, F, H, W]` -> normalised latents.

    Returns latents `[B, 16, T, H/8, W/8]` with `T = (F - 1) // 4 + 1`, normalised with the VAE config's
    `latents_mean` / `latents_std` (the space the Cosmos transformer denoises in). This is the hook the
    world rollout builds on: its conditioning latents are this encoder's output.
    """

    def __init__(self, vae: AutoencoderKLWan):
        super().__init__()
        self.vae = vae
        # Set to a `LatentCache` to reuse the latents of clips seen before (only while the VAE is frozen).
        self.cache: LatentCache | None = None
        z_dim = vae.config.z_dim
        self.register_buffer("latents_mean", torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1),
                             persistent=False)
        self.register_buffer("latents_std", torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1),
                             persistent=False)

    @classmethod
    def from_pretrained(cls, cosmos_model_name_or_path: str, **kwargs) -> "CosmosWorldEncoder":
        """Load the VAE from a Cosmos-Predict2 repository's `vae` subfolder (nothing else is read)."""
        return cls(AutoencoderKLWan.from_pretrained(cosmos_model_name_or_path, subfolder="vae", **kwargs))

    @property
    def latent_channels(self) -> int:
        return self.vae.config.z_dim

    @property
    def spatial_factor(self) -> int:
        return 2 ** len(self.vae.config.temperal_downsample)

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        mean = self.latents_mean.to(latents.device, latents.dtype)
        std = self.latents_std.to(latents.device, latents.dtype)
        return (latents - mean) / std * SIGMA_DATA

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        mean = self.latents_mean.to(latents.device, latents.dtype)
        std = self.latents_std.to(latents.device, latents.dtype)
        return latents / SIGMA_DATA * std + mean

    def encode_clips(self, world_pixel_values: torch.Tensor, num_frames: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded clips of mixed lengths (`theworld.video_processing_theworld.preprocess_world_clips`) -> padded latents.

        Rows are grouped by length and each group is encoded on its own real frames only (padding frames
        never reach the VAE). Returns `(latents, num_latent_frames)`: latents `[B, 16, T_max, h, w]` with
        each row's `num_latent_frames` real latent frames first and zeros after them.
        """
        batch, _, frames = world_pixel_values.shape[:3]
        if num_frames is None:
            num_frames = torch.full((batch,), frames, dtype=torch.long)
        counts = [int(n) for n in num_frames]
        if self.cache is not None and not any(p.requires_grad for p in self.vae.parameters()):
            return self._encode_clips_cached(world_pixel_values, counts)
        return self._encode_clips_uncached(world_pixel_values, counts)

    def _encode_clips_uncached(self, world_pixel_values: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        batch, _, frames = world_pixel_values.shape[:3]
        if len(set(counts)) == 1 and counts[0] == frames:
            latents = self(world_pixel_values)
            return latents, torch.full((batch,), latents.shape[2], dtype=torch.long)
        groups: dict[int, list[int]] = {}
        for row, count in enumerate(counts):
            groups.setdefault(count, []).append(row)
        encoded = {count: self(world_pixel_values[rows, :, :count]) for count, rows in groups.items()}
        longest = max(latents.shape[2] for latents in encoded.values())
        sample = next(iter(encoded.values()))
        out = sample.new_zeros(batch, sample.shape[1], longest, *sample.shape[3:])
        lengths = torch.zeros(batch, dtype=torch.long)
        for count, rows in groups.items():
            out[rows, :, : encoded[count].shape[2]] = encoded[count]
            lengths[rows] = encoded[count].shape[2]
        return out, lengths

    def _encode_clips_cached(self, world_pixel_values: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        keys = [LatentCache.key(world_pixel_values[row, :, :count]) for row, count in enumerate(counts)]
        rows = [self.cache.get(key) for key in keys]
        missing = [row for row, latents in enumerate(rows) if latents is None]
        if missing:
            encoded, lengths = self._encode_clips_uncached(world_pixel_values[missing], [counts[r] for r in missing])
            for k, row in enumerate(missing):
                rows[row] = encoded[k, :, : int(lengths[k])]
                self.cache.put(keys[row], rows[row])
        longest = max(latents.shape[1] for latents in rows)
        out = rows[0].new_zeros(len(rows), rows[0].shape[0], longest, *rows[0].shape[2:])
        for row, latents in enumerate(rows):
            out[row, :, : latents.shape[1]] = latents
        return out, torch.tensor([latents.shape[1] for latents in rows])

    def forward(self, world_pixel_values: torch.Tensor, generator: torch.Generator | None = None,
                sample: bool = False) -> torch.Tensor:
        """Encode `[B, 3, F, H, W]` pixels in `[-1, 1]` to normalised latents `[B, 16, T, h, w]`.

        Args:
            generator: random source when `sample` is set.
            sample: draw from the VAE posterior as the pipeline does (`latent_dist.sample(generator)`);
                the default uses its mean, so that a training step sees the same world tokens every time.
        """
        if world_pixel_values.ndim != 5 or world_pixel_values.shape[1] != 3:
            raise ValueError(
                f"world_pixel_values must be [B, 3, frames, H, W] in [-1, 1] (see theworld.video_processing_theworld), got "
                f"shape {tuple(world_pixel_values.shape)}"
            )
        check_clip_length(world_pixel_values.shape[2])
        posterior = self.vae.encode(world_pixel_values.to(self.vae.dtype)).latent_dist
        latents = posterior.sample(generator) if sample else posterior.mode()
        return self.normalize(latents)
