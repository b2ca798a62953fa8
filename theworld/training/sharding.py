"""Sharded training (FSDP2): which layers are sharded, and the full tensors that checkpoints and evaluations need.

The trainer shards with `shard_model` (PyTorch's FSDP2 `fully_shard` on every Gemma decoder layer and SigLIP
encoder layer, then on the rest of the model but the frozen Cosmos parts) when given ``--fsdp`` or launched
with an accelerate config whose ``distributed_type`` is FSDP (``configs/accelerate_fsdp_4b.yaml``). It does
so itself rather than through accelerate's `prepare` so that one wrapping runs everywhere: accelerate (1.15)
turns a CPU launch into DDP even with an FSDP plugin, so ``--fsdp`` is how sharding is tested here (gloo), and
its wrapping would shard the Cosmos VAE, which the evaluation calls outside the model's forward.

The parameters become `DTensor` shards; `is_sharded` tells, `full_tensor` gathers one (a collective: every
rank must call it, in the same order).
"""
from __future__ import annotations

import torch

from theworld.modeling.modeling_theworld import full_tensor  # noqa: F401  (re-exported: the trainer's name for it)

# The repeated blocks: each is all-gathered for its forward and backward and freed after, which is what
# bounds a rank's parameter memory. The rest but the frozen Cosmos parts (embeddings, the world projector)
# forms the root group. Keep in step with fsdp_transformer_layer_cls_to_wrap in the accelerate config.
SHARDED_LAYER_CLASSES = ("Gemma3DecoderLayer", "SiglipEncoderLayer")


def shard_model(model) -> None:
    """Shard ``model`` in place over the default process group (``torch.distributed`` must be initialised)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("--fsdp shards the model across processes: launch with torchrun or accelerate launch "
                           "(e.g. `torchrun --nproc-per-node 2 -m theworld.train --fsdp`)")
    layers = [m for m in model.modules() if type(m).__name__ in SHARDED_LAYER_CLASSES]
    if not layers:
        raise ValueError(f"--fsdp found none of {SHARDED_LAYER_CLASSES} in the model to shard")
    for layer in layers:
        fully_shard(layer)
    # The frozen Cosmos parts stay whole on every rank: they are called outside the model's forward too (the
    # evaluation encodes clips once for its ablations), where a sharded parameter is never gathered.
    frozen_cosmos = {p for part in (model.world_encoder, model.world_transformer) if part is not None
                     for p in part.parameters()}
    # The root too frees its gathered parameters after each forward (torch keeps the root's by default): an
    # evaluation's forward has no backward to free them, and the optimizer and checkpoints must see shards.
    fully_shard(model, reshard_after_forward=True, ignored_params=frozen_cosmos)


def is_sharded(model) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())
