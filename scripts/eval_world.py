"""Held-out accuracy of trained TheWorld models, side by side in one run, per question type, against
the majority-answer baseline, with the content ablations of the world path.

    python scripts/eval_world.py runs/world/model runs/no-world/model --json eval.json

Each MODEL is a directory written by `TheWorld.save_pretrained` (a training run's `model/`, which also
records the task, seed and frame count it was trained on in `theworld_task.json`; the held-out split of
that task is rebuilt here; `--size` overrides its size). For every model, on the same samples
(`theworld.evaluation.evaluate_by_question`):

- `world` (world models): accuracy with its Wilson 95 % interval, the majority baseline, the accuracy
  with world latents shuffled across samples, and for direction questions the fraction of answers that
  flip to the opposite direction when the clip is time-reversed;
- `world tokens off` (world models): the same weights answering from Gemma's inputs only (secondary:
  the model never trained that way);
- `no-world model`: a `--no-enable-world` run, the baseline the world model must beat;
- `world, rollout N` (with `--rollout N`): world tokens of the clip plus N latent frames predicted by
  the Cosmos transformer; a model trained without rollout meets those temporal embeddings untrained.

The synthetic clips are generated here, not user input, so no safety worker is involved.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as `python scripts/eval_world.py` from a checkout
    sys.path.insert(0, str(REPO_ROOT))

DEFAULT_TASK = {"data": "synthetic", "seed": 0, "image_size": 32, "num_frames": 9, "eval_size": 512}


def task_of(model_dir: str | Path) -> dict:
    """The task a saved model was trained on (`theworld_task.json`), else the default motion task."""
    from theworld.train import TASK_FILE

    path = Path(model_dir) / TASK_FILE
    return {**DEFAULT_TASK, **(json.loads(path.read_text()) if path.is_file() else {})}


def heldout_samples(task: dict, size: int | None = None) -> list[dict]:
    from theworld.training import synthetic_task

    if task["data"] not in ("synthetic", "synthetic-arrow"):
        raise ValueError(f"the model was trained on {task['data']!r}; this script rebuilds the synthetic tasks only")
    dataset = synthetic_task(task, "heldout", size or task["eval_size"])
    return [dataset[i] for i in range(len(dataset))]


def evaluate_model(model_dir: str | Path, samples: list[dict], rollout: int = 0, batch_size: int = 32,
                   rollout_steps: int = 35, device: str = "cpu") -> list[dict]:
    """Every variant of one saved model: `[{"model", "variant", "eval_by_question"}, ...]`."""
    from theworld import TheWorld
    from theworld.evaluation import evaluate_by_question
    from theworld.modeling.rollout import RolloutConfig

    model = TheWorld.from_pretrained(model_dir).to(device).eval()

    def row(variant: str, model, **options) -> dict:
        return {"model": str(model_dir), "variant": variant,
                "eval_by_question": evaluate_by_question(model, samples, batch_size=batch_size, **options)}

    if not model.config.enable_world:
        return [row("no-world model", model)]
    rows = [row("world", model), row("world tokens off", model, world=False, ablations=False)]
    if rollout:
        rolled = TheWorld.from_pretrained(model_dir, num_world_steps=rollout).to(device).eval()
        rolled.rollout_config = RolloutConfig(num_inference_steps=rollout_steps)
        rows.append(row(f"world, rollout {rollout}", rolled, ablations=False))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", metavar="MODEL", help="directories written by TheWorld.save_pretrained")
    parser.add_argument("--size", type=int, default=None,
                        help="held-out samples (default: the training run's synthetic_eval_size, 512)")
    parser.add_argument("--rollout", type=int, default=0, metavar="N",
                        help="also evaluate each world model with N rolled-out latent frames (default: 0, off)")
    parser.add_argument("--rollout-steps", type=int, default=35, help="denoising steps per rollout (default: 35)")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per forward pass (default: 32)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--plot", metavar="PNG", help="also draw accuracy per model and question type (95 %% intervals, "
                        "majority baseline, shuffled-world accuracy) to this PNG")
    args = parser.parse_args(argv)

    import torch

    from theworld.evaluation import format_table

    torch.manual_seed(0)
    tasks = {str(m): task_of(m) for m in args.models}
    if len({json.dumps(t, sort_keys=True) for t in tasks.values()}) > 1:
        print("warning: the models were trained on different tasks; each is evaluated on its own", file=sys.stderr)
    rows = []
    for model_dir in args.models:
        samples = heldout_samples(tasks[str(model_dir)], args.size)
        rows += evaluate_model(model_dir, samples, args.rollout, args.batch_size, args.rollout_steps, args.device)
    print(format_table([(f"{Path(r['model']).parent.name or r['model']}: {r['variant']}", r["eval_by_question"])
                        for r in rows]))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    if args.plot:
        plot_rows(rows, args.plot)
    return 0


def plot_rows(rows: list[dict], path: str | Path) -> None:
    """Grouped bars: one group per question type, one bar per model variant, Wilson 95 % error bars; the
    majority baseline as a dashed line and the shuffled-world accuracy as a marker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({kind for r in rows for kind in r["eval_by_question"]})
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(1.6 + 2.2 * len(kinds), 3.6))
    for k, r in enumerate(rows):
        label = f"{Path(r['model']).parent.name or r['model']}: {r['variant']}"
        xs, ys, errors = [], [], [[], []]
        for i, kind in enumerate(kinds):
            e = r["eval_by_question"].get(kind)
            if e is None:
                continue
            x = i - 0.4 + width * (k + 0.5)
            xs.append(x), ys.append(e["accuracy"])
            errors[0].append(e["accuracy"] - e["ci_low"]), errors[1].append(e["ci_high"] - e["accuracy"])
            if "shuffled_world" in e:
                ax.plot(x, e["shuffled_world"], "kx", label="shuffled world latents" if k == i == 0 else None)
        ax.bar(xs, ys, width * 0.95, yerr=errors, capsize=3, label=label)
    for i, kind in enumerate(kinds):
        majority = max(r["eval_by_question"][kind]["majority"] for r in rows if kind in r["eval_by_question"])
        ax.hlines(majority, i - 0.45, i + 0.45, colors="grey", linestyles="dashed",
                  label="majority answer" if i == 0 else None)
    ax.set_xticks(range(len(kinds)), kinds)
    ax.set_ylim(0, 1)
    ax.set_ylabel("held-out accuracy (exact answer)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
