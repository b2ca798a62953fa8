"""Held-out evaluation during training: the set collated once, loss and accuracy with and without world tokens."""
from __future__ import annotations

import torch


# Held-out batches are inference only: larger than training micro-batches, fewer passes.
EVAL_BATCH_SIZE = 32


def collate_eval_batches(model, samples: list[dict], batch_size: int, world: bool | None) -> list[dict]:
    """The held-out set, collated once for every evaluation of the run."""
    from theworld.data.collator import TheWorldCollator

    collate = TheWorldCollator(model, world=world)
    return [collate(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, batches: list[dict], accelerator, lockstep: dict | None = None) -> dict:
    """Mean answer-token loss and answer accuracy (every answer token predicted right, teacher-forced) over
    every rank's ``batches`` (each rank holds its share of the held-out set; the sums are reduced).

    ``lockstep``, for a sharded model, whose every forward is a collective: a batch that a rank holding fewer
    batches than the others runs (and does not count) until they are done."""
    from theworld.evaluation import answer_scores

    # The plain module: a DDP wrapper would sync buffers in forward, and ranks may hold different numbers
    # of batches (none at all when there are fewer held-out samples than ranks).
    model = accelerator.unwrap_model(model)
    was_training = model.training
    model.eval()
    if lockstep is not None:
        most = int(accelerator.gather(torch.tensor([len(batches)], device=accelerator.device)).max())
        batches = [*batches, *[None] * (most - len(batches))]
    totals = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # loss, tokens, correct, samples
    for batch in batches:
        if batch is None:
            answer_scores(model, to_device(lockstep, accelerator.device), accelerator.autocast)
            continue
        right, loss_sum, tokens = answer_scores(model, to_device(batch, accelerator.device), accelerator.autocast)
        totals += torch.stack([loss_sum.sum().double(), tokens.sum().double(), right.sum().double(),
                               torch.tensor(float(right.numel()), dtype=torch.float64, device=totals.device)])
    model.train(was_training)
    total_loss, total_tokens, correct, count = accelerator.reduce(totals, "sum").tolist()
    return {"loss": total_loss / max(total_tokens, 1), "accuracy": correct / max(count, 1)}


def evaluate_world_and_no_world(model, batches, no_world_batches, accelerator, lockstep: dict | None = None) -> dict:
    """Held-out metrics with world tokens and, for a world model, the same model with them left out."""
    result = {f"eval_{k}": v for k, v in evaluate(model, batches, accelerator, lockstep).items()}
    if no_world_batches is not None:
        result.update({f"eval_{k}_no_world": v
                       for k, v in evaluate(model, no_world_batches, accelerator, lockstep).items()})
    return result
