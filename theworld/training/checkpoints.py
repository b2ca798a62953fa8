"""Checkpoints and exact resume: trainable weights, optimizer, scheduler, RNG and reading position per rank.

Weights and optimizer state are written whole (gathered when the model is sharded with FSDP), the optimizer's
keyed by parameter name (`torch.distributed.checkpoint.state_dict`), so the same files load into a sharded
or an unsharded run."""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

CHECKPOINT_DIR = "checkpoints"


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    root = output_dir / CHECKPOINT_DIR
    return sorted(root.glob("step-*")) if root.exists() else []


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(accelerator, model, optimizer, scheduler, step: int, rank_state: dict, output_dir: Path, keep: int):
    """Write ``checkpoints/step-N`` atomically: everything goes into a temp dir that is renamed at the end,
    so a crash leaves either the old set of checkpoints or the new one, never half a checkpoint."""
    from safetensors.torch import save_file

    root = output_dir / CHECKPOINT_DIR
    final, tmp = root / f"step-{step:06d}", root / f".tmp-step-{step:06d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    rank = accelerator.process_index
    # Every rank saves its own RNG streams and data position (ranks read different samples).
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    (tmp / f"state_rank{rank}.json").write_text(json.dumps(rank_state))
    # Whole tensors even when the model is sharded (FSDP): gathering is collective, so every rank takes part
    # and rank 0 writes. A checkpoint therefore resumes at any number of ranks.
    weights = accelerator.unwrap_model(model).trainable_state_dict()
    optimizer_state = get_optimizer_state_dict(model, optimizer.optimizer,
                                               options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if accelerator.is_main_process:
        save_file(weights, tmp / "trainable.safetensors")
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoint_dirs(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, model, optimizer, scheduler, checkpoint: Path) -> dict:
    from safetensors.torch import load_file

    unwrapped = accelerator.unwrap_model(model)
    weights = load_file(checkpoint / "trainable.safetensors")
    missing = [n for n, p in unwrapped.named_parameters() if p.requires_grad and n not in weights]
    if missing:
        raise ValueError(f"{checkpoint} lacks trainable weights {missing[:5]}; was it written with other --freeze-* flags?")
    # Every rank reads the whole tensors and keeps its shard of them (all of them when not sharded).
    full = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(unwrapped, weights, options=full)
    set_optimizer_state_dict(model, optimizer.optimizer, torch.load(checkpoint / "optimizer.pt", weights_only=False),
                             options=full)
    scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=False))
    rank = accelerator.process_index
    set_rng_state(torch.load(checkpoint / f"rng_rank{rank}.pt", weights_only=False))
    return json.loads((checkpoint / f"state_rank{rank}.json").read_text())
