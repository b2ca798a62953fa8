"""World rollout: Cosmos-Predict2 Video2World's denoising loop, written in theworld.

Why not call the diffusers pipeline: `Cosmos2VideoToWorldPipeline` imports `cosmos_guardrail`, whose
`retinaface` dependency switches autograd off for the whole process at import time (docs/DESIGN.md).
This module drives the same submodules the pipeline holds (`CosmosTransformer3DModel`,
`FlowMatchEulerDiscreteScheduler`, optionally T5 for a text prompt, the VAE for decoding)
with the pipeline's constants and arithmetic, so that on the same weights, noise and settings the
predicted latents equal the pipeline's `output_type="latent"` output (tests/test_rollout.py proves it
against the real pipeline, run in a subprocess).

Latents here are always *normalised* Cosmos latents as `CosmosWorldEncoder` makes them,
`(z - latents_mean) / latents_std * sigma_data`, shaped `[B, C, T, h, w]`, observed frames first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import CosmosTransformer3DModel, FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from theworld.modeling.latent_statistics import WorldLatentStatistics
from theworld.modeling.world_encoder import SIGMA_DATA, CosmosWorldEncoder

# The Video2World pipeline writes these into the scheduler config; without them the karras schedule
# spans the wrong noise range.
SIGMA_MAX = 80.0
SIGMA_MIN = 0.002
FINAL_SIGMAS_TYPE = "sigma_min"
# Noise level at which the clean conditioning frames are presented to the transformer.
SIGMA_CONDITIONING = 1e-4
DEFAULT_FPS = 16
# Copied from the pipeline (importing it would import the guardrail); used as the unconditional
# branch of classifier-free guidance when a T5 prompt is given.
DEFAULT_NEGATIVE_PROMPT = (
    "The video captures a series of frames showing ugly scenes, static with no motion, motion blur, "
    "over-saturation, shaky footage, low resolution, grainy texture, pixelated images, poorly lit areas, "
    "underexposed and overexposed scenes, poor color balance, washed out colors, choppy sequences, "
    "jerky movements, low frame rate, artifacting, color banding, unnatural transitions, outdated special effects, "
    "fake elements, unconvincing visuals, poorly edited content, jump cuts, visual noise, and flickering. "
    "Overall, the video is of poor quality."
)


@dataclass
class RolloutConfig:
    """Settings of one world rollout.

    Args:
        num_inference_steps: denoising steps (the pipeline's default is 35).
        guidance_scale: classifier-free guidance weight `w` in `x0 = x0_c + w (x0_c - x0_u)`; active when
            > 1 and a prompt is given (the pipeline's default is 7.0 with a prompt). Without a prompt there
            is nothing to guide towards, so it is ignored.
        fps: the frame rate the transformer's rotary embedding is told.
        seed: seeds the initial noise when no generator or noise tensor is passed.
    """

    num_inference_steps: int = 35
    guidance_scale: float = 7.0
    fps: int = DEFAULT_FPS
    seed: int | None = 0


def _video2world_scheduler(scheduler: FlowMatchEulerDiscreteScheduler) -> FlowMatchEulerDiscreteScheduler:
    """A fresh scheduler (its step index is per-rollout state) with the Video2World constants set."""
    fresh = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    fresh.register_to_config(
        sigma_max=SIGMA_MAX, sigma_min=SIGMA_MIN, sigma_data=SIGMA_DATA, final_sigmas_type=FINAL_SIGMAS_TYPE
    )
    return fresh


def decode_world_latents(world_encoder: CosmosWorldEncoder, latents: torch.Tensor) -> np.ndarray:
    """Normalised latents `[B, C, T, h, w]` -> uint8 frames `[B, F, H, W, 3]` (F = 1 + 4 (T - 1)).

    The frames are raw model output: show or write them only after the safety worker has checked and
    sanitised them (`SafetyClient.check_video`).
    """
    vae = world_encoder.vae
    with torch.no_grad():
        video = vae.decode(world_encoder.denormalize(latents).to(vae.dtype), return_dict=False)[0]
    video = (video.float() / 2 + 0.5).clamp(0, 1)  # [B, 3, F, H, W] in [-1, 1] -> [0, 1]
    return (video * 255).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy()


def encode_prompt(
    text_encoder, tokenizer, prompts: str | list[str], max_sequence_length: int = 512
) -> torch.Tensor:
    """T5 embeddings of `prompts` as the Video2World pipeline makes them: padded to
    `max_sequence_length`, positions after each prompt's length zeroed."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    device = text_encoder.device
    tokens = tokenizer(
        prompts, padding="max_length", max_length=max_sequence_length, truncation=True, return_tensors="pt"
    )
    mask = tokens.attention_mask.bool().to(device)
    with torch.no_grad():
        embeds = text_encoder(tokens.input_ids.to(device), attention_mask=mask).last_hidden_state
    for i, length in enumerate(mask.sum(dim=1).cpu()):
        embeds[i, length:] = 0
    return embeds


def rollout_world_latents(
    transformer: CosmosTransformer3DModel,
    scheduler: FlowMatchEulerDiscreteScheduler,
    conditioning_latents: torch.Tensor,
    num_world_steps: int,
    *,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    config: RolloutConfig | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    enable_grad: bool = False,
    statistics: WorldLatentStatistics | None = None,
) -> torch.Tensor:
    """Predict `num_world_steps` future latent frames after `conditioning_latents`.

    Args:
        conditioning_latents: normalised latents of the observed frames, `[B, C, Tc, h, w]` (for one
            image `Tc = 1`).
        num_world_steps: future latent frames to predict (each is 4 video frames of the Wan VAE).
        prompt_embeds: T5 embeddings `[B, L, D]` (see `encode_prompt`); None conditions on nothing
            (an all-zero context), and then guidance is off.
        negative_prompt_embeds: the unconditional branch of guidance; required when guidance is on.
        generator / noise: the initial noise is `noise` (standard normal, shape of the output) if
            given, else drawn from `generator`, else from `torch.Generator().manual_seed(config.seed)`.
        enable_grad: keep autograd on (only to train the transformer through the rollout).
        statistics: the latent statistics saved with a transformer post-trained by `theworld.train_world`
            (`WorldLatentStatistics.load(cosmos_dir)`): the loop then runs in the space the transformer was
            trained in (conditioning standardised, the result destandardised). None: the VAE's own latent
            space, as the pipeline.

    Returns:
        normalised latents `[B, C, Tc + num_world_steps, h, w]`, as the pipeline returns them: the
        first `Tc` frames went through the sampler too and are close to, not equal to, the
        conditioning latents (use the conditioning latents themselves for the observed frames).
    """
    config = config or RolloutConfig()
    if num_world_steps < 1:
        raise ValueError(f"num_world_steps must be >= 1 to roll out, got {num_world_steps}")
    batch, channels, num_cond, height, width = conditioning_latents.shape
    if channels != transformer.config.in_channels - 1:
        raise ValueError(
            f"conditioning latents have {channels} channels but the transformer expects "
            f"{transformer.config.in_channels - 1} (in_channels minus the condition-mask channel)"
        )
    guided = prompt_embeds is not None and config.guidance_scale > 1.0
    if guided and negative_prompt_embeds is None:
        raise ValueError(
            "guidance_scale > 1 needs negative_prompt_embeds (e.g. encode_prompt(..., DEFAULT_NEGATIVE_PROMPT)); "
            "or set guidance_scale=1 to turn guidance off"
        )
    device = conditioning_latents.device
    transformer_dtype = transformer.dtype
    if prompt_embeds is None:
        # All-zero context: every key is the same, so the cross-attention is uninformative, as intended.
        prompt_embeds = torch.zeros(batch, 1, transformer.config.text_embed_dim, device=device, dtype=transformer_dtype)
    if statistics is not None:
        conditioning_latents = statistics.standardize(conditioning_latents)

    with torch.set_grad_enabled(enable_grad):
        scheduler = _video2world_scheduler(scheduler)
        sigmas_dtype = torch.float32 if torch.backends.mps.is_available() else torch.float64
        scheduler.set_timesteps(sigmas=torch.linspace(0, 1, config.num_inference_steps, dtype=sigmas_dtype), device=device)
        # final_sigmas_type="sigma_min": the last step lands on sigma_min instead of zero.
        scheduler.sigmas[-1] = scheduler.sigmas[-2]

        num_frames = num_cond + num_world_steps
        shape = (batch, channels, num_frames, height, width)
        if noise is None:
            if generator is None and config.seed is not None:
                generator = torch.Generator(device=device).manual_seed(config.seed)
            noise = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {shape}")
        latents = noise.to(device=device, dtype=torch.float32) * SIGMA_MAX

        # Zero-padded to the full length so that the arithmetic below is the pipeline's, bit for bit.
        cond_latents = torch.zeros(shape, device=device, dtype=torch.float32)
        cond_latents[:, :, :num_cond] = conditioning_latents.to(torch.float32)
        cond_indicator = latents.new_zeros(1, 1, num_frames, 1, 1)
        cond_indicator[:, :, :num_cond] = 1.0
        cond_mask = (cond_indicator * latents.new_ones(batch, 1, num_frames, height, width)).to(transformer_dtype)
        # No padded region; the transformer resizes this mask to the latent grid anyway.
        padding_mask = latents.new_zeros(1, 1, height, width, dtype=transformer_dtype)
        sigma_cond = torch.tensor(SIGMA_CONDITIONING, dtype=torch.float32, device=device)
        t_cond = sigma_cond / (sigma_cond + 1)

        def denoised(context: torch.Tensor, c_in, c_skip, c_out, timestep) -> torch.Tensor:
            x = cond_indicator * cond_latents + (1 - cond_indicator) * (latents * c_in)
            t = cond_indicator * t_cond + (1 - cond_indicator) * timestep
            velocity = transformer(
                hidden_states=x.to(transformer_dtype),
                timestep=t.to(transformer_dtype),
                encoder_hidden_states=context,
                fps=config.fps,
                condition_mask=cond_mask,
                padding_mask=padding_mask,
                return_dict=False,
            )[0]
            x0 = (c_skip * latents + c_out * velocity.float()).to(transformer_dtype)
            return cond_indicator * cond_latents + (1 - cond_indicator) * x0

        for i, t in enumerate(scheduler.timesteps):
            sigma = scheduler.sigmas[i]
            # EDM preconditioning of a velocity model: t = s / (s + 1).
            current_t = sigma / (sigma + 1)
            c_in = c_skip = 1 - current_t
            c_out = -current_t
            timestep = current_t.view(1, 1, 1, 1, 1).expand(batch, -1, num_frames, -1, -1)
            x0 = denoised(prompt_embeds, c_in, c_skip, c_out, timestep)
            if guided:
                x0_uncond = denoised(negative_prompt_embeds, c_in, c_skip, c_out, timestep)
                x0 = x0 + config.guidance_scale * (x0 - x0_uncond)
            latents = scheduler.step((latents - x0) / sigma, t, latents, return_dict=False)[0]
    return latents if statistics is None else statistics.destandardize(latents)


def video2world_x0(
    transformer: CosmosTransformer3DModel,
    noisy_latents: torch.Tensor,
    sigma: torch.Tensor,
    conditioning_latents: torch.Tensor,
    *,
    context: torch.Tensor | None = None,
    fps: int = DEFAULT_FPS,
) -> torch.Tensor:
    """The transformer's x0 prediction of Video2World latents at noise level `sigma`, with the pipeline's
    preconditioning (what training and the few-step sampler share).

    `noisy_latents` `[B, C, T, h, w]` are `x0 + sigma * eps` on the frames to predict; the first `Tc`
    frames are replaced by `conditioning_latents` `[B, C, Tc, h, w]`, presented clean (timestep
    `SIGMA_CONDITIONING / (1 + SIGMA_CONDITIONING)`) and flagged in the condition-mask channel, as the
    pipeline does. `sigma`: a scalar or one value per row. Rectified flow in EDM form: `t = sigma / (1 + sigma)`,
    the transformer sees `(1 - t) x0 + t eps` and predicts the velocity `v = eps - x0`, so
    `x0 = (1 - t) x_sigma - t v`. The returned frames `:Tc` are the conditioning latents exactly.
    """
    batch, channels, num_frames, height, width = noisy_latents.shape
    num_cond = conditioning_latents.shape[2]
    dtype = transformer.dtype
    if context is None:  # all-zero text context, as in `rollout_world_latents` without a prompt
        context = noisy_latents.new_zeros(batch, 1, transformer.config.text_embed_dim, dtype=dtype)
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=noisy_latents.device).reshape(-1, 1, 1, 1, 1)
    t = sigma / (sigma + 1)
    indicator = noisy_latents.new_zeros(1, 1, num_frames, 1, 1)
    indicator[:, :, :num_cond] = 1.0
    clean = torch.zeros_like(noisy_latents)
    clean[:, :, :num_cond] = conditioning_latents.to(noisy_latents.dtype)
    t_cond = SIGMA_CONDITIONING / (1 + SIGMA_CONDITIONING)
    x = indicator * clean + (1 - indicator) * noisy_latents * (1 - t)
    timestep = (indicator * t_cond + (1 - indicator) * t).expand(batch, 1, num_frames, 1, 1)
    velocity = transformer(
        hidden_states=x.to(dtype),
        timestep=timestep.to(dtype),
        encoder_hidden_states=context,
        fps=fps,
        condition_mask=(indicator * noisy_latents.new_ones(batch, 1, num_frames, height, width)).to(dtype),
        padding_mask=noisy_latents.new_zeros(1, 1, height, width, dtype=dtype),
        return_dict=False,
    )[0]
    x0 = (1 - t) * noisy_latents - t * velocity.float()
    return indicator * clean + (1 - indicator) * x0


def few_step_sigmas(num_inference_steps: int, sigma_max: float = SIGMA_MAX, sigma_min: float = SIGMA_MIN,
                    rho: float = 7.0) -> torch.Tensor:
    """The noise levels a few-step rollout evaluates the transformer at: `num_inference_steps` values of the
    Karras schedule (rho 7, the pipeline's) from `sigma_max` down to `sigma_min`; one step is `[sigma_max]`."""
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    if num_inference_steps == 1:
        return torch.tensor([sigma_max], dtype=torch.float64)
    ramp = torch.linspace(0, 1, num_inference_steps, dtype=torch.float64)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


@torch.no_grad()
def sample_world_latents(
    transformer: CosmosTransformer3DModel,
    conditioning_latents: torch.Tensor,
    num_world_steps: int,
    num_inference_steps: int,
    *,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    fps: int = DEFAULT_FPS,
    statistics: WorldLatentStatistics | None = None,
) -> torch.Tensor:
    """A few-step rollout of a post-trained world model that is honest for every `num_inference_steps` >= 1.

    Why not `rollout_world_latents(..., RolloutConfig(num_inference_steps=N))`: the pipeline's loop (which
    that function reproduces bit for bit) sets the last sigma equal to the one before it
    (`final_sigmas_type="sigma_min"` then `sigmas[-1] = sigmas[-2]`), so its last step moves nothing: N steps
    make N - 1 Euler moves, and N = 1 returns the initial noise times 80 unchanged (tests/test_rollout.py
    shows it). Here every one of the N transformer passes counts: at each sigma of `few_step_sigmas(N)` the
    transformer predicts x0 (`video2world_x0`); between sigmas the sample moves deterministically to the next
    level along the predicted direction (`x <- x0 + s_next / s * (x - x0)`, the Euler step of the
    probability-flow ODE); the result is the x0 prediction at the last sigma. No prompt, no guidance.
    `statistics`: as in `rollout_world_latents` (the transformer's own latent space, when it has one).

    Returns normalised latents `[B, C, Tc + num_world_steps, h, w]`, the first `Tc` the conditioning latents.
    """
    if num_world_steps < 1:
        raise ValueError(f"num_world_steps must be >= 1 to roll out, got {num_world_steps}")
    batch, channels, num_cond, height, width = conditioning_latents.shape
    shape = (batch, channels, num_cond + num_world_steps, height, width)
    device = conditioning_latents.device
    if noise is None:
        noise = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
    elif tuple(noise.shape) != shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {shape}")
    sigmas = few_step_sigmas(num_inference_steps).tolist()
    latents = noise.to(device=device, dtype=torch.float32) * sigmas[0]
    conditioning = conditioning_latents if statistics is None else statistics.standardize(conditioning_latents)
    for i, sigma in enumerate(sigmas):
        x0 = video2world_x0(transformer, latents, sigma, conditioning, fps=fps)
        if i + 1 == len(sigmas):
            break
        latents = x0 + (sigmas[i + 1] / sigma) * (latents - x0)
    if statistics is None:
        return x0
    # Destandardised, the observed frames would come back with rounding error: keep them exact.
    return torch.cat([conditioning_latents.to(x0.dtype), statistics.destandardize(x0)[:, :, num_cond:]], dim=2)
