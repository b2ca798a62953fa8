"""Held-out evaluation during training: the set collated once, loss and accuracy with and without world tokens."""
from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class HeldOutSet:
    """The held-out samples that passed the safety check (all ranks'), and this rank's share of them collated
    once: with world tokens (`batches`), without (`no_world_batches`, world models only), and for a sharded
    model the `lockstep` batch a rank with fewer batches runs uncounted (see `evaluate`)."""

    samples: list[dict]
    batches: list[dict]
    no_world_batches: list[dict] | None
    lockstep: dict | None

    def evaluate(self, model, accelerator, step: int) -> dict:
        """One evaluation record: `{"step": step, "eval_loss": ..., "eval_accuracy": ..., ...}`."""
        return {"step": step, **evaluate_world_and_no_world(model, self.batches, self.no_world_batches, accelerator,
                                                            self.lockstep)}


def check_heldout_samples(heldout_data, worker, data_args, train_args, ledger_suffix: str) -> list[dict]:
    """The first `--eval-size` held-out samples that pass the safety check, checked once through the run's
    worker session (`theworld.training.worker_session.WorkerSession`); what is blocked or fails goes to the
    `.eval` ledgers in `--output-dir`, written afresh."""
    from theworld.data.prefetch import Prefetcher
    from theworld.data.safety_filter import SafetyFilter
    from theworld.training.data import heldout_loads

    reader = Prefetcher(heldout_loads(heldout_data, data_args.eval_size), data_args.data_workers,
                        data_args.data_prefetch)
    checked = SafetyFilter(worker.client, reader, window=worker.window, output_dir=train_args.output_dir,
                           ledger_suffix=f".eval{ledger_suffix}", max_errors=train_args.safety_max_errors,
                           result_timeout=train_args.safety_timeout, fresh_ledgers=True,
                           curated=hasattr(heldout_data, "curated"))  # a curate output: checked already
    samples = [sample for _, sample in checked]
    checked.close()
    reader.close()
    return samples


def prepare_heldout(model, samples: list[dict], rank: int, world_size: int, sharded: bool) -> HeldOutSet:
    """Collate rank `rank`'s share of the checked held-out `samples` for every evaluation of the run
    (`model`: the unwrapped TheWorld). Each rank scores its share; `evaluate` sums the scores over the ranks."""
    if not samples:
        raise ValueError("no held-out sample passed the safety check; see eval blocked/errors ledgers in --output-dir")
    share = samples[rank::world_size]
    batches = collate_eval_batches(model, share, EVAL_BATCH_SIZE, world=None)
    no_world = collate_eval_batches(model, share, EVAL_BATCH_SIZE, world=False) if model.config.enable_world else None
    # A sharded model's forward is a collective: a rank with fewer held-out batches runs this one, uncounted.
    lockstep = collate_eval_batches(model, samples[:1], 1, world=None)[0] if sharded else None
    return HeldOutSet(samples, batches, no_world, lockstep)
