"""What a run writes and prints besides checkpoints: loss curve, summary, peak memory."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from theworld.training.heldout import to_device


class MetricsLog:
    """``metrics.jsonl``, appended as the run goes (per-step loss and LR, evaluations), so that a run that
    crashes keeps its metrics. It starts from ``records`` (a resumed run's history up to its checkpoint:
    what a crash wrote after the checkpoint is cut away, as the ledgers are). Only the main process writes."""

    def __init__(self, path: Path, records: list[dict], enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled:
            # A train record comes before the evaluation of the same step, as the run writes them.
            ordered = sorted(records, key=lambda r: (r["step"], "loss" not in r))
            self.path.write_text("".join(json.dumps(record) + "\n" for record in ordered))

    def append(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


@torch.no_grad()
def log_heldout_examples(accelerator, model, samples: list[dict], step: int, max_new_tokens: int = 16) -> None:
    """Show ``samples`` in TensorBoard: their frames (the worker's sanitized ones, oldest first) and, as text,
    the question, the model's greedy answer and the reference answer. The main process writes; a sharded
    model's forward is a collective, so then every rank generates."""
    import numpy as np

    from theworld.data.collator import TheWorldCollator
    from theworld.evaluation import reference_answer
    from theworld.training.sharding import is_sharded

    model = accelerator.unwrap_model(model)
    if not samples or not (accelerator.is_main_process or is_sharded(model)):
        return
    was_training = model.training
    model.eval()
    prompt = to_device(TheWorldCollator(model, for_generation=True)(samples), accelerator.device)
    with accelerator.autocast():
        out = model.generate(**prompt, max_new_tokens=max_new_tokens, do_sample=False)
    model.train(was_training)
    if not accelerator.is_main_process:
        return
    writer = accelerator.get_tracker("tensorboard", unwrap=True)
    answers = model.processor.batch_decode(out[:, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    for i, (sample, answer) in enumerate(zip(samples, answers)):
        question = " ".join(item["text"] for message in sample["messages"] if message["role"] == "user"
                            for item in message["content"] if item["type"] == "text")
        writer.add_images(f"heldout/{i}/frames", np.stack([np.asarray(f) for f in sample["images"]]), step,
                          dataformats="NHWC")
        writer.add_text(f"heldout/{i}", f"**{sample.get('id', i)}**: {question}  \n"
                                        f"model: `{answer.strip()}`  \ntruth: `{reference_answer(sample)}`", step)


def write_loss_curve(history: list[dict], evals: list[dict], path: Path, ylabel: str = "answer-token cross-entropy"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train loss", alpha=0.6)
    for key, label in (("eval_loss", "held-out loss (world)"), ("eval_loss_no_world", "held-out loss (world tokens off)")):
        points = [(e["step"], e[key]) for e in evals if key in e]
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def peak_memory_mb(device) -> dict:
    """This process's peak resident set so far (``peak_rss_mb``) and, on a GPU, the peak of tensor memory
    the CUDA caching allocator handed out on ``device`` (``peak_cuda_mb``, else None)."""
    import resource

    peak_rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    cuda = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"peak_rss_mb": peak_rss_kb / 1024, "peak_cuda_mb": cuda}


def reduce_sample_counts(accelerator, counts) -> dict:
    """The safety filter's counters summed over the ranks: `seen`, `trained`, `blocked`, `errors`, `bad_samples`."""
    totals = accelerator.reduce(torch.tensor([counts.seen, counts.passed, counts.blocked, counts.errors,
                                              counts.data_errors], dtype=torch.float64, device=accelerator.device),
                                "sum").tolist()
    return dict(zip(("seen", "trained", "blocked", "errors", "bad_samples"), (int(x) for x in totals)))


def sample_accounting(samples: dict) -> dict:
    """The summary's sample keys (`samples` from `reduce_sample_counts`): `seen`, `trained`, `blocked`, `errors`,
    `bad_samples`, and `accounting_holds` (whether `seen == trained + blocked + errors`)."""
    return {**{key: samples[key] for key in ("seen", "trained", "blocked", "errors", "bad_samples")},
            "accounting_holds": samples["seen"] == samples["trained"] + samples["blocked"] + samples["errors"]}


def worker_and_run_fields(worker, worker_stats: dict, accelerator, num_processes: int, lora_r: int) -> dict:
    """The summary keys both trainers write about the safety worker they used (`worker`: a
    `theworld.training.worker_session.WorkerSession`; `worker_stats`: its last `stats`) and how they ran."""
    return {
        "safety_endpoint": worker.endpoint,
        "safety_worker_spawned": worker.spawned is not None,
        "worker": worker.hello,
        "worker_stats": worker_stats,
        "mixed_precision": accelerator.mixed_precision,
        "num_processes": num_processes,
        "lora_r": lora_r,
    }


def build_summary(*, steps: int, max_steps: int, steps_run: int, samples: dict, evals: list[dict], eval_samples: int,
                  eval_by_question: dict, enable_world: bool, loop_seconds: float, safety_wait_seconds: float,
                  data_wait_seconds: float, projector_max_abs_change: float | None, trainable_parameters: int,
                  run: dict, curated: dict | None = None, step_seconds: list[float] | None = None) -> dict:
    """`summary.json`: the sample accounting (`samples` from `reduce_sample_counts`; `accounting_holds` says
    whether `seen == trained + blocked + errors`), `curated`: a curate output's own counts (None on other
    data), the first and last evaluation, rates and wait fractions
    of the loop time (`steps_run`: the steps this process ran, not counting a resumed run's earlier ones;
    None when no loop time was measured), `step_seconds`: the wall seconds of each of those steps, in order
    (to 0.1 ms; what per-epoch rates are computed from, e.g. a cold cache in the first epoch against a warm
    one after: `scripts/bench_train.py --imagination-only`), and `run`: the keys that describe the run (worker,
    precision, processes, memory...), appended as given."""
    def per_loop_second(value):
        return value / loop_seconds if loop_seconds > 0 else None

    first, last = evals[0], evals[-1]
    return {
        "steps": steps,
        "max_steps": max_steps,
        **sample_accounting(samples),
        # A curate output's own counts (its blocked and errors never reach this run): read = kept + blocked + errors.
        "curated": curated,
        "initial_eval_loss": first["eval_loss"],
        "final_eval_loss": last["eval_loss"],
        "initial_eval_accuracy": first["eval_accuracy"],
        "final_eval_accuracy": last["eval_accuracy"],
        "final_eval_loss_no_world": last.get("eval_loss_no_world"),
        "final_eval_accuracy_no_world": last.get("eval_accuracy_no_world"),
        "enable_world": enable_world,
        "eval_samples": eval_samples,
        "eval_by_question": eval_by_question,
        "train_seconds": loop_seconds,
        "steps_per_second": per_loop_second(steps_run),
        "step_seconds": None if step_seconds is None else [round(seconds, 4) for seconds in step_seconds],
        "safety_wait_seconds": safety_wait_seconds,
        "safety_wait_fraction": per_loop_second(safety_wait_seconds),
        "data_wait_seconds": data_wait_seconds,
        "data_wait_fraction": per_loop_second(data_wait_seconds),
        "trainer_grad_enabled": torch.is_grad_enabled(),
        "projector_max_abs_change": projector_max_abs_change,
        "trainable_parameters": trainable_parameters,
        **run,
    }


def write_json_atomic(path: Path, value):
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def print_summary(summary: dict, output_dir: str):
    import textwrap

    from theworld.evaluation import format_table

    print(
        f"\nTheWorld training: {summary['steps']}/{summary['max_steps']} steps, "
        f"{summary['steps_per_second'] or 0:.2f} steps/s\n"
        f"  samples: seen {summary['seen']} = trained {summary['trained']} + blocked {summary['blocked']} "
        f"+ errors {summary['errors']}\n"
        f"  held-out loss {summary['initial_eval_loss']:.4f} -> {summary['final_eval_loss']:.4f}, "
        f"answer accuracy {summary['initial_eval_accuracy']:.2%} -> {summary['final_eval_accuracy']:.2%}"
        + (f" (world tokens off: loss {summary['final_eval_loss_no_world']:.4f}, "
           f"accuracy {summary['final_eval_accuracy_no_world']:.2%})" if summary["final_eval_loss_no_world"] is not None else "")
        + "\n" + textwrap.indent(format_table([("held-out", summary["eval_by_question"])]), "  ")
        + f"\n  waited on the safety worker {summary['safety_wait_fraction'] or 0:.1%} and on data loading "
        f"{summary['data_wait_fraction'] or 0:.1%} of the training time"
        + (f"; {summary['bad_samples']} bad samples skipped (errors.jsonl, kind 'data')" if summary["bad_samples"] else "")
        + "\n"
        f"  outputs in {output_dir}: summary.json, metrics.jsonl, loss_curve.png, blocked.jsonl, tensorboard/, checkpoints/"
    )
