"""The model a run trains: TheWorld with its frozen parts and optional LoRA adapters."""
from __future__ import annotations

import torch

from theworld.modeling.modeling_theworld import DEFAULT_LORA_TARGET_MODULES
from theworld.training.arguments import ModelArguments, parse_world_image_size


def build_model(model_args: ModelArguments, seed: int):
    """TheWorld with the requested parts frozen (the world projector always trains, Cosmos never does)."""
    from transformers import set_seed

    from theworld.inference.loading import is_saved_theworld, load_model
    from theworld.tiny import build_tiny_models, default_tiny_dir, is_tiny_gemma

    gemma, cosmos = model_args.gemma_model, model_args.cosmos_model
    if gemma is None or cosmos is None:
        tiny_gemma, tiny_cosmos = build_tiny_models(default_tiny_dir())
        gemma, cosmos = gemma or str(tiny_gemma), cosmos or str(tiny_cosmos)
    set_seed(seed)  # the projector's initial weights are part of the run
    # The tiny language model learns motion in minutes only from 'frame' tokens (docs/model.md); a real
    # Gemma gets one token per latent patch, as LLaVA-style models do.
    projection = model_args.world_projection or ("frame" if is_tiny_gemma(gemma) else "spatial")
    options = dict(enable_world=model_args.enable_world, world_projection=projection,
                   world_frame_tokens=model_args.world_frame_tokens,
                   world_projector_type=model_args.world_projector_type, num_world_steps=model_args.num_world_steps,
                   freeze_gemma_language=model_args.freeze_gemma_language,
                   freeze_gemma_vision=model_args.freeze_gemma_vision)
    if model_args.world_tokens_per_side is not None:
        options["world_tokens_per_side"] = model_args.world_tokens_per_side
    if model_args.world_image_size:
        options["world_image_size"] = parse_world_image_size(model_args.world_image_size)
    if is_saved_theworld(gemma):
        # A TheWorld saved by an earlier run (its model/ folder) fixes its world settings; only freezing may change.
        model = load_model(gemma, freeze_gemma_language=model_args.freeze_gemma_language,
                           freeze_gemma_vision=model_args.freeze_gemma_vision)
    else:
        model = load_model(gemma, cosmos, **options)
    if model_args.lora_r > 0:
        if model.language_adapter_config is not None:
            if model.language_adapter_config.r != model_args.lora_r:
                raise ValueError(f"{gemma} already has LoRA adapters of rank {model.language_adapter_config.r}; they "
                                 f"keep training: drop --lora-r or pass --lora-r {model.language_adapter_config.r}")
        else:
            model.add_language_adapter(lora_config(model_args))
    return model


def configure_rollout(model, rollout_steps: int | None, cache_mb: float) -> None:
    """The world rollout's sampling steps (``--world-rollout-steps``) and its cache (``--rollout-cache-mb``)."""
    from theworld.modeling.world_encoder import LatentCache

    if model.config.num_world_steps < 1:
        if rollout_steps is not None:
            raise ValueError("--world-rollout-steps sets the sampling steps of the world rollout, and this model rolls "
                             "nothing out: add --num-world-steps K (K >= 1), or drop --world-rollout-steps")
        return
    if rollout_steps is not None:
        if rollout_steps < 2:
            raise ValueError(f"--world-rollout-steps must be at least 2, got {rollout_steps}: the rollout is the "
                             "Video2World pipeline's loop, whose last step moves nothing (1 step returns the noise)")
        model.rollout_config.num_inference_steps = rollout_steps
        model.config.world_rollout_steps = rollout_steps  # saved: inference rolls out as training did
    if cache_mb > 0:
        model.rollout_cache = LatentCache(max_bytes=int(cache_mb * 2**20))


def lora_config(model_args: ModelArguments):
    """The peft `LoraConfig` of the --lora-* flags."""
    from peft import LoraConfig

    targets = [name.strip() for name in model_args.lora_target_modules.split(",") if name.strip()]
    if not targets:
        raise ValueError("--lora-target-modules is empty: name the language model's modules to adapt, e.g. "
                         f"{','.join(DEFAULT_LORA_TARGET_MODULES)}")
    return LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
                      target_modules="all-linear" if targets == ["all-linear"] else targets, bias="none")


def world_projector_parameters(model) -> dict[str, torch.Tensor]:
    return dict(model.world_projector.named_parameters()) if model.world_projector is not None else {}
