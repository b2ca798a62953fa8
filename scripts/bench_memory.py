"""Memory per training rank with the real models, counted and measured (no weights needed).

1. **Parameters, exactly**: every real model is built on the meta device from its published
   configuration (`theworld.real_configs`): Gemma 3 4B-it (language model, SigLIP), TheWorld's world
   projector at the given world size, LoRA adapters of rank --lora-r, the Cosmos-Predict2-2B Wan VAE and
   transformer, the pipeline's T5-11B encoder, and the guardrail's Qwen3Guard-Gen-0.6B and
   RetinaFace-ResNet50 (counted in a subprocess: importing retinaface switches autograd off, and theworld
   refuses to import it).
2. **Bytes per rank** from the counts: frozen weights in bf16 (2 bytes), every trainable parameter
   16 bytes (an fp32 master weight, its fp32 gradient and AdamW's two fp32 moments: accelerate's bf16
   mixed precision over fp32 trainable weights), for a TheWorld trainer rank (full fine-tuning, LoRA,
   frozen language model; with and without the rollout transformer) and for a rank that imports the
   diffusers pipeline (which also loads T5 and the guard models, per rank).
3. **Activations, measured**: the real-shape model with --layers layers (`python -m theworld.tiny DIR
   --real-shapes`) runs one bf16 training step (batch 1, a 9-frame clip at --world-image-size, LoRA) and
   every tensor autograd saves for the backward pass is attributed to the layer that saved it (Gemma
   sliding / global layers, SigLIP layers, the rest). Per-layer bytes are then scaled to the real depth
   (34 text layers, 27 SigLIP layers). With gradient checkpointing a layer keeps only its input hidden
   state, plus one layer's activations while it is recomputed.

Usage: ``python scripts/bench_memory.py [--real-shape-dir DIR] [--skip-activations]``
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from theworld.real_configs import (
    COSMOS_TRANSFORMER_CONFIG, COSMOS_VAE_CONFIG, GEMMA_TEXT_CONFIG, GEMMA_VISION_CONFIG, gemma_config,
    gemma_layer_types, qwen3guard_config, t5_encoder_config,
)

BF16_BYTES = 2
# fp32 master weight + fp32 gradient + AdamW exp_avg + exp_avg_sq.
TRAINABLE_BYTES = 4 + 4 + 4 + 4
GB = 1e9

RETINAFACE_COUNT = """
import torch, retinaface.data as d
from retinaface.models.retinaface import RetinaFace
cfg = dict(d.cfg_re50, pretrain=False)  # the guardrail loads its own checkpoint; never download ImageNet weights
with torch.device("meta"):
    print(sum(p.numel() for p in RetinaFace(cfg=cfg, phase="test").parameters()))
"""


def numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def world_config(world_image_size, tokens_per_side):
    from theworld import TheWorldConfig

    fields = {k: v for k, v in gemma_config().to_dict().items() if k not in ("model_type", "transformers_version")}
    return TheWorldConfig(**fields, world_image_size=list(world_image_size), world_tokens_per_side=tokens_per_side,
                          gemma_model_name_or_path="google/gemma-3-4b-it",
                          cosmos_model_name_or_path="nvidia/Cosmos-Predict2-2B-Video2World")


def parameter_counts(world_image_size, tokens_per_side, lora_r) -> dict[str, int]:
    """Exact parameter counts of every component at full depth, on the meta device."""
    from diffusers import AutoencoderKLWan, CosmosTransformer3DModel
    from transformers import Qwen3ForCausalLM, T5EncoderModel

    from theworld import TheWorld
    from theworld.train import ModelArguments, lora_config

    with torch.device("meta"):
        world = TheWorld(world_config(world_image_size, tokens_per_side))
        counts = {
            "gemma_language": numel(world.model.language_model),  # the LM head is tied to the embeddings
            "gemma_vision": numel(world.model.vision_tower) + numel(world.model.multi_modal_projector),
            "world_projector": numel(world.world_projector),
        }
        world.add_language_adapter(lora_config(ModelArguments(lora_r=lora_r)))
        counts["lora"] = sum(p.numel() for n, p in world.named_parameters() if "lora_" in n)
        del world
        vae = AutoencoderKLWan(**COSMOS_VAE_CONFIG)
        counts["cosmos_vae"] = numel(vae)
        counts["cosmos_vae_encoder"] = numel(vae.encoder) + numel(vae.quant_conv)
        del vae
        counts["cosmos_transformer"] = numel(CosmosTransformer3DModel(**COSMOS_TRANSFORMER_CONFIG))
        counts["t5_encoder"] = numel(T5EncoderModel(t5_encoder_config()))
        counts["qwen3guard"] = numel(Qwen3ForCausalLM(qwen3guard_config()))
    counts["retinaface"] = int(subprocess.run([sys.executable, "-c", RETINAFACE_COUNT], check=True,
                                              capture_output=True, text=True).stdout.split()[-1])
    return counts


def rank_bytes(counts: dict[str, int], mode: str, rollout: bool, pipeline: bool) -> dict[str, float]:
    """Weights and optimizer-state bytes of one rank (see the module docstring for the byte sizes)."""
    trainable = {"full": counts["gemma_language"] + counts["gemma_vision"] + counts["world_projector"],
                 "lora": counts["lora"] + counts["world_projector"],
                 "frozen": counts["world_projector"]}[mode]
    frozen = counts["cosmos_vae"]
    if mode != "full":
        frozen += counts["gemma_language"] + counts["gemma_vision"]
    if rollout or pipeline:
        frozen += counts["cosmos_transformer"]
    if pipeline:
        frozen += counts["t5_encoder"] + counts["qwen3guard"] + counts["retinaface"]
    return {"frozen_weights": frozen * BF16_BYTES, "trainable_state": trainable * TRAINABLE_BYTES}


class SavedTensorMeter:
    """Bytes of the distinct storages autograd saves for backward, by the layer that saved them.

    Parameters (frozen weights saved by matmuls) are not activations and are left out."""

    def __init__(self, model, tags: dict):
        self.bytes: dict[str, int] = defaultdict(int)
        self._seen: set[int] = set()
        self._stack: list[str] = []
        self._params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self._handles = []
        for module, tag in tags.items():
            self._handles.append(module.register_forward_pre_hook(self._enter(tag)))
            self._handles.append(module.register_forward_hook(self._leave))
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _enter(self, tag: str):
        def hook(module, args) -> None:
            self._stack.append(tag)
        return hook

    def _leave(self, module, args, output) -> None:  # a hook that returned a value would replace the output
        self._stack.pop()

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._seen and ptr not in self._params:
            self._seen.add(ptr)
            self.bytes[self._stack[-1] if self._stack else "other"] += storage.nbytes()
        return tensor

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()


def measure_activations(real_dir: Path, layers: int, world_image_size, tokens_per_side, lora_r) -> dict:
    """One bf16 LoRA training step of the reduced-depth real-shape model: saved bytes per layer kind."""
    from theworld import TheWorld
    from theworld.data.collator import TheWorldCollator
    from theworld.data.synthetic import SyntheticMotionTask
    from theworld.configuration_theworld import latent_frames
    from theworld.tiny import build_real_shape_models
    from theworld.train import ModelArguments, lora_config

    gemma_dir, cosmos_dir = build_real_shape_models(real_dir, layers=layers)
    model = TheWorld.from_pretrained(gemma_dir, cosmos_model=cosmos_dir, dtype=torch.bfloat16,
                                     world_image_size=list(world_image_size), world_tokens_per_side=tokens_per_side,
                                     freeze_gemma_vision=True)
    model.add_language_adapter(lora_config(ModelArguments(lora_r=lora_r, lora_dropout=0.0)))
    model.train()
    task = SyntheticMotionTask(size=1, seed=0)
    batch = TheWorldCollator(model)([task[0]])
    # The frozen VAE runs without grad and saves nothing: latents of the clip's shape stand in for its
    # output (encoding a 9-frame 480x640 clip takes minutes on a CPU and changes no byte measured here).
    pixels = batch.pop("world_pixel_values")  # [1, 3, F, H, W]
    batch["world_latents"] = torch.randn(1, model.config.world_latent_channels, latent_frames(pixels.shape[2]),
                                         pixels.shape[-2] // 8, pixels.shape[-1] // 8)
    text_layers = model.model.language_model.layers
    tags = {layer: f"text_{kind}" for layer, kind in zip(text_layers, model.config.text_config.layer_types)}
    tags.update({layer: "vision" for layer in model.model.vision_tower.modules()
                 if type(layer).__name__ == "SiglipEncoderLayer"})
    kinds = defaultdict(int)
    for kind in tags.values():
        kinds[kind] += 1

    def one_step() -> dict:
        with SavedTensorMeter(model, tags) as meter:
            loss = model(**batch).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return {"other": meter.bytes["other"], "per_layer": {k: meter.bytes[k] / n for k, n in kinds.items()}}

    started = time.perf_counter()
    vision_frozen = one_step()  # LoRA or a frozen language model: SigLIP frozen, as for real checkpoints
    seconds = time.perf_counter() - started
    model.model.vision_tower.requires_grad_(True)
    model.model.multi_modal_projector.requires_grad_(True)
    vision_trained = one_step()  # full fine-tuning trains SigLIP too: its layers keep activations
    sequence = int(batch["input_ids"].shape[1])
    patches = (GEMMA_VISION_CONFIG["image_size"] // GEMMA_VISION_CONFIG["patch_size"]) ** 2
    return {"sequence_length": sequence, "vision_frozen": vision_frozen, "vision_trained": vision_trained,
            "hidden_state_bytes": sequence * GEMMA_TEXT_CONFIG["hidden_size"] * BF16_BYTES,
            "vision_hidden_state_bytes": patches * GEMMA_VISION_CONFIG["hidden_size"] * BF16_BYTES,
            "step_seconds": seconds, "measured_layers": layers}


def scale_to_full_depth(measured: dict, checkpointing: bool, vision_trains: bool) -> float:
    """Activation bytes of the full-depth model for one sample, from the per-layer measurement."""
    step = measured["vision_trained" if vision_trains else "vision_frozen"]
    text_kinds = gemma_layer_types(GEMMA_TEXT_CONFIG["num_hidden_layers"])
    depth = {"text_sliding_attention": text_kinds.count("sliding_attention"),
             "text_full_attention": text_kinds.count("full_attention"),
             "vision": GEMMA_VISION_CONFIG["num_hidden_layers"]}
    per_layer = step["per_layer"]
    if not checkpointing:
        return step["other"] + sum(per_layer[kind] * n for kind, n in depth.items())
    # Checkpointed: each layer keeps its input; one layer's activations live again while it is recomputed.
    boundaries = (depth["text_sliding_attention"] + depth["text_full_attention"]) * measured["hidden_state_bytes"]
    if vision_trains:
        boundaries += depth["vision"] * measured["vision_hidden_state_bytes"]
    return step["other"] + boundaries + max(per_layer.values())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real-shape-dir", default="runs/real-shapes",
                        help="where the reduced-depth real-shape models are built (reused when complete)")
    parser.add_argument("--layers", type=int, default=2, help="depth of the model the activations are measured on")
    parser.add_argument("--world-image-size", default="480,640")
    parser.add_argument("--world-tokens-per-side", type=int, default=16)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--skip-activations", action="store_true", help="only the exact parameter and state bytes")
    parser.add_argument("--json", default=None, help="also write every figure to this file")
    args = parser.parse_args(argv)
    size = tuple(int(v) for v in args.world_image_size.split(","))

    counts = parameter_counts(size, args.world_tokens_per_side, args.lora_r)
    print("Parameters (exact, full depth, meta device):")
    for name, count in counts.items():
        print(f"  {name:20s} {count:>15,d}")

    measured = None
    if not args.skip_activations:
        measured = measure_activations(Path(args.real_shape_dir), args.layers, size, args.world_tokens_per_side,
                                       args.lora_r)
        print(f"\nActivations saved for backward, one sample (bf16, LoRA r={args.lora_r}, sequence "
              f"{measured['sequence_length']} tokens, measured on {args.layers} layers, {measured['step_seconds']:.1f} s "
              "a step), MiB:")
        print(f"  {'':40s} {'SigLIP frozen':>14s} {'SigLIP trained':>14s}")
        frozen, trained = measured["vision_frozen"], measured["vision_trained"]
        for kind in frozen["per_layer"]:
            print(f"  {'per ' + kind + ' layer':40s} {frozen['per_layer'][kind] / 2**20:14.1f} "
                  f"{trained['per_layer'][kind] / 2**20:14.1f}")
        print(f"  {'outside the layers (logits, loss, ...)':40s} {frozen['other'] / 2**20:14.1f} "
              f"{trained['other'] / 2**20:14.1f}")

    print("\nPer rank, GB (1e9 bytes): frozen weights bf16 + trainable state 16 B/param"
          + (" + activations of one sample scaled to full depth" if measured else ""))
    header = f"  {'rank':44s} {'weights':>8s} {'train state':>11s}"
    if measured:
        header += f" {'activ.':>8s} {'activ. ckpt':>11s} {'total ckpt':>10s}"
    print(header)
    rows = {}
    for label, mode, rollout, pipeline in (
        ("TheWorld trainer, LoRA", "lora", False, False),
        ("TheWorld trainer, LoRA, rollout", "lora", True, False),
        ("TheWorld trainer, frozen language model", "frozen", False, False),
        ("TheWorld trainer, full fine-tuning", "full", False, False),
        ("rank importing the pipeline, LoRA", "lora", True, True),
        ("rank importing the pipeline, full fine-tuning", "full", True, True),
    ):
        b = rank_bytes(counts, mode, rollout, pipeline)
        line = f"  {label:44s} {b['frozen_weights'] / GB:8.2f} {b['trainable_state'] / GB:11.2f}"
        row = dict(b)
        if measured:
            activations = {ckpt: scale_to_full_depth(measured, ckpt, vision_trains=mode == "full") for ckpt in (False, True)}
            row.update(activations=activations[False], activations_checkpointed=activations[True])
            line += (f" {activations[False] / GB:8.2f} {activations[True] / GB:11.2f} "
                     f"{(b['frozen_weights'] + b['trainable_state'] + activations[True]) / GB:10.2f}")
        rows[label] = row
        print(line)
    lora, pipe = rank_bytes(counts, "lora", False, False), rank_bytes(counts, "lora", True, True)
    ratio = sum(pipe.values()) / sum(lora.values())
    print(f"\nweights + state: a rank importing the pipeline holds {ratio:.2f}x a TheWorld LoRA trainer rank")
    if measured:
        ckpt = scale_to_full_depth(measured, True, vision_trains=False)
        ratio = (sum(pipe.values()) + ckpt) / (sum(lora.values()) + ckpt)
        print(f"with checkpointed activations of one sample: {ratio:.2f}x")
    print(f"peak RSS of this benchmark: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps({"counts": counts, "activations": measured, "ranks": rows}, indent=2))


if __name__ == "__main__":
    main()
