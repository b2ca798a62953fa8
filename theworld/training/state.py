"""What a run trains and what a checkpoint restores: model, optimizer, schedule, step, records, RNG and
reading position. Resume exactness is a property of this state: `save` then `restore` gives it back whole."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from theworld.training.arguments import TrainArguments
from theworld.training.checkpoints import load_checkpoint, save_checkpoint


@dataclass
class TrainState:
    """The model, optimizer and scheduler (as `accelerator.prepare` returned them), the trainable `params`,
    the optimizer steps taken (`step`), the per-step records (`history`) and evaluations (`evals`), and the
    safety filter's and the data stream's positions (`filter_state`, `data_state`) as of the last restore.
    `resumed_from` is the step a restored run started at (0 for a fresh run)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    params: list[torch.nn.Parameter]
    step: int = 0
    history: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    filter_state: dict | None = None
    data_state: dict | None = None
    resumed_from: int = 0

    def save(self, accelerator, output_dir: Path, keep: int, filter_state: dict, data_state: dict) -> Path:
        """Write `checkpoints/step-N` (see `save_checkpoint`) with this rank's records and positions."""
        rank_state = {"step": self.step, "history": self.history, "evals": self.evals, "filter": filter_state,
                      "data": data_state}
        return save_checkpoint(accelerator, self.model, self.optimizer, self.scheduler, self.step, rank_state,
                               output_dir, keep)

    def restore(self, accelerator, checkpoint: Path) -> None:
        """Load `checkpoint` into the model, optimizer, scheduler and RNG, and take its records and positions."""
        saved = load_checkpoint(accelerator, self.model, self.optimizer, self.scheduler, checkpoint)
        self.step, self.history, self.evals = saved["step"], saved["history"], saved["evals"]
        self.filter_state, self.data_state = saved["filter"], saved.get("data")
        self.resumed_from = self.step


def build_train_state(model, train_args: TrainArguments, accelerator, fsdp: bool) -> TrainState:
    """AdamW over the trainable parameters and the `--lr-scheduler-type` schedule, prepared by `accelerator`.

    With `fsdp` the model is sharded here, before the optimizer is built (sharding replaces the parameters),
    and only the optimizer and scheduler are prepared (the shards already distribute it)."""
    from transformers import get_scheduler

    from theworld.training.sharding import shard_model

    world_size = accelerator.num_processes
    if fsdp:
        shard_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train_args.learning_rate, weight_decay=train_args.weight_decay)
    # accelerate steps a prepared scheduler once per process per optimizer step.
    scheduler = get_scheduler(train_args.lr_scheduler_type, optimizer, num_warmup_steps=train_args.warmup_steps * world_size,
                              num_training_steps=train_args.max_steps * world_size)
    if fsdp:  # distributed by its shards already: no DDP wrapper, no second wrapping by accelerate
        optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
    else:
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    return TrainState(model=model, optimizer=optimizer, scheduler=scheduler, params=params)
