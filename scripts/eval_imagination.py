"""Does imagination pay? Observed against imagined world tokens at matched label budgets (issue 23).

    python scripts/eval_imagination.py --json imagination.json --plot imagination.png --output-dir runs/imagination

For every label budget (`--budgets`: the number of distinct labelled training samples, the synthetic motion
task asking direction, colour and the forecast "future") and every arm, one `python -m theworld.train` run at
the same steps, batch size and seed, then a held-out evaluation of its `model/` on the same clips:

- `observed`: world tokens of the observed clip only (`--num-world-steps 0`);
- `imagined`: observed + one latent frame rolled out by the post-trained world model (`--num-world-steps 1`,
  `--world-rollout-steps`);
- `random_world_model`: the same with an untrained Cosmos transformer of the same shape (same VAE): a gain
  must come from the learnt dynamics, not from the extra tokens;
- `oracle`: observed + the true future's latents: the clip with its next 4 frames appended
  (`--synthetic-oracle-frames 4`, one Cosmos latent frame, as many world tokens as `imagined`; Gemma still
  sees the last observed frame): what a perfect one-step rollout would give, the upper bound;
- ablations of `imagined`, on "future": the rolled-out latent frame shuffled across held-out samples
  (`imagined_shuffled`; the observed latents stay each sample's own), and the rollout of the time-reversed
  clip in place of the clip's (`imagined_reversed`).

Accuracy is the exact answer under teacher forcing with its Wilson 95 % interval, against the held-out
majority answer (`theworld.evaluation`). The world model's clips carry no questions and do not count against
a budget: with `--world-model DIR` (a Cosmos directory written by `python -m theworld.train_world`) it is
used as it is; without, one is trained first into OUTPUT_DIR/world_model with `theworld.train_world`'s
defaults (3000 steps of 16 clips from 2048 distinct clips; about 25 minutes on 2 shared CPU cores, measured
for /tmp/wm_runs/trained). The JSON layout is fixed (docs/imagination.md):
`{"headline_budget", "arms": {arm: {budget: {question: {"accuracy", "ci_low", "ci_high",
"majority", "n"}}}}, "ablations": {"imagined_shuffled"|"imagined_reversed": {budget: {"future": {...}}}}}`;
the headline budget is the smallest at which `imagined` reaches 80 % on "future" (else the largest).
Beside it, OUTPUT_DIR/imagination_run.json records the settings, the world model and the clips it was
trained on, and the seconds of every run.

Runs already complete in OUTPUT_DIR (a `model/` there) are reused, so an interrupted experiment continues.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as `python scripts/eval_imagination.py` from a checkout
    sys.path.insert(0, str(REPO_ROOT))

ARMS = ("observed", "imagined", "random_world_model", "oracle")
ABLATIONS = ("imagined_shuffled", "imagined_reversed")
QUESTIONS = ("direction", "colour", "future")
HEADLINE_ACCURACY = 0.8
# One Cosmos latent frame (the Wan VAE's temporal factor): what a one-step rollout predicts, and the
# forecast question's horizon.
ORACLE_FRAMES = 4
ROLLOUT_LATENT_FRAMES = 1
# The arms' clips: the motion task's 9 frames, 3 Cosmos latent frames. The world model is post-trained on
# that geometry: 13-frame clips whose first 3 latent frames are given and whose 4th is predicted, which is
# exactly the rollout `num_world_steps = 1` asks of it (a model trained 2 -> 3 rolls 3 -> 4 at chance:
# docs/imagination.md, "First measurement").
OBSERVED_FRAMES = 9
CONDITION_LATENT_FRAMES = 1 + (OBSERVED_FRAMES - 1) // 4
# Held-out clips whose rollouts are compared with their true future (`rollout_check`).
ROLLOUT_CHECK_CLIPS = 64


def parse_budgets(value: str) -> list[int]:
    budgets = sorted({int(v) for v in value.split(",") if v.strip()})
    if not budgets or budgets[0] < 1:
        raise argparse.ArgumentTypeError(f"--budgets takes positive sample counts, comma-separated, got {value!r}")
    return budgets


def random_world_model(world_model: Path, output: Path, seed: int) -> Path:
    """A copy of the Cosmos directory `world_model` whose transformer is freshly initialised (same config,
    `seed`): the control arm's world model, with the same VAE, scheduler, text encoder and latent statistics."""
    import torch
    from diffusers import CosmosTransformer3DModel

    from theworld.modeling.latent_statistics import LATENT_STATISTICS_FILE

    if (output / "transformer" / "config.json").is_file():
        return output
    output.mkdir(parents=True, exist_ok=True)
    for part in world_model.iterdir():
        if part.is_dir() and part.name != "transformer":
            shutil.copytree(part, output / part.name, dirs_exist_ok=True)
        elif part.is_file():
            shutil.copy2(part, output / part.name)
    torch.manual_seed(seed)
    config = CosmosTransformer3DModel.load_config(world_model / "transformer")
    CosmosTransformer3DModel.from_config(config).save_pretrained(output / "transformer")
    # The latent statistics define the space the transformer denoises in (theworld.modeling.latent_statistics):
    # the control rolls out in the same space as the trained model, so only the weights differ.
    statistics = world_model / "transformer" / LATENT_STATISTICS_FILE
    if statistics.is_file():
        shutil.copy2(statistics, output / "transformer" / LATENT_STATISTICS_FILE)
    return output


def train_world_model(output: Path, seed: int) -> Path:
    """Post-train a world model with `python -m theworld.train_world` (its clips are the motion task's, without
    questions) on the arms' geometry (`CONDITION_LATENT_FRAMES` given, the next predicted); the Cosmos
    directory it writes."""
    model = output / "model"
    if not (model / "transformer").is_dir():
        command = [sys.executable, "-m", "theworld.train_world", "--output-dir", str(output), "--seed", str(seed),
                   "--report-to", "none", "--synthetic-frames", str(OBSERVED_FRAMES + ORACLE_FRAMES),
                   "--condition-frames", str(CONDITION_LATENT_FRAMES)]
        print("training the world model:", " ".join(command), flush=True)
        subprocess.run(command, check=True)
    return model


def world_model_clips(world_model: Path) -> dict | None:
    """What the world model was trained on, read from its run's `summary.json` (the directory above), if there."""
    summary = world_model.parent / "summary.json"
    if not summary.is_file():
        return None
    s = json.loads(summary.read_text())
    return {"steps": s.get("steps"), "clips_trained": s.get("trained"),
            "distinct_clips_checked": s.get("worker_stats", {}).get("checks"), "train_seconds": s.get("train_seconds"),
            "condition_frames": s.get("objective", {}).get("condition_frames")}


def arm_flags(arm: str, world_model: Path, random_model: Path, rollout_steps: int) -> list[str]:
    if arm == "observed":
        return ["--cosmos-model", str(world_model), "--num-world-steps", "0"]
    if arm == "oracle":
        return ["--cosmos-model", str(world_model), "--num-world-steps", "0",
                "--synthetic-oracle-frames", str(ORACLE_FRAMES)]
    cosmos = world_model if arm == "imagined" else random_model
    return ["--cosmos-model", str(cosmos), "--num-world-steps", str(ROLLOUT_LATENT_FRAMES),
            "--world-rollout-steps", str(rollout_steps)]


def train_arm(arm: str, budget: int, run_dir: Path, flags: list[str], args) -> Path:
    """One `python -m theworld.train` run (reused when its `model/` exists); its model directory."""
    model = run_dir / "model"
    if (model / "config.json").is_file():
        return model
    if run_dir.exists():  # an interrupted run: start it again rather than resume a different schedule
        shutil.rmtree(run_dir)
    command = [sys.executable, "-m", "theworld.train", "--output-dir", str(run_dir), "--report-to", "none",
               "--synthetic-size", str(budget), "--blocked-fraction", "0", "--max-steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--seed", str(args.seed),
               "--question-types", ",".join(QUESTIONS), "--heldout-examples", "0",
               # The run's own held-out evaluation is not the experiment's (that is below, on more samples):
               # keep it small, at the end only.
               "--synthetic-eval-size", "24", "--eval-size", "24", "--eval-every", str(args.steps),
               "--save-every", str(args.steps), *flags]
    print(f"[{time.strftime('%H:%M:%S')}] training {arm} at budget {budget}: {' '.join(command)}", flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL if args.quiet else None)
    print(f"[{time.strftime('%H:%M:%S')}] {arm} at budget {budget}: {time.perf_counter() - started:.0f} s", flush=True)
    return model


def heldout(seed: int, size: int, oracle_frames: int = 0) -> list[dict]:
    from theworld.training import synthetic_task

    record = {"data": "synthetic", "seed": seed, "image_size": 32, "num_frames": OBSERVED_FRAMES, "questions": list(QUESTIONS),
              "oracle_frames": oracle_frames}
    dataset = synthetic_task(record, "heldout", size)
    return [dataset[i] for i in range(len(dataset))]


def encode(model, samples: list[dict], batch_size: int) -> list:
    """Each sample's world latents `[C, T, h, w]` as the model computes them (rollout frames included)."""
    import torch

    from theworld.data.collator import TheWorldCollator

    collate = TheWorldCollator(model, world=True)
    latents = []
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            batch = collate(samples[start : start + batch_size])
            encoded = model.encode_world(batch["world_pixel_values"].to(model.device),
                                         batch["world_num_frames"].to(model.device))
            latents += [encoded[i] for i in range(encoded.shape[0])]
    return latents


def evaluate_arm(arm: str, model_dir: Path, samples: list[dict], args) -> tuple[dict, dict]:
    """`(by_question, ablations)` of one trained model; ablations only for the imagined arm."""
    import torch

    from theworld import TheWorld
    from theworld.evaluation import _derangement, evaluate_with_world_latents, time_reversed

    model = TheWorld.from_pretrained(model_dir).eval()
    model.rollout_config.num_inference_steps = args.rollout_steps
    latents = encode(model, samples, args.batch_size)
    result = evaluate_with_world_latents(model, samples, latents, batch_size=args.batch_size)
    ablations = {}
    if arm in ("imagined", "random_world_model"):
        check = [i for i, s in enumerate(samples) if s["question_type"] == "future"][:ROLLOUT_CHECK_CLIPS]
        ablations["rollout_check"] = rollout_check(model, [samples[i] for i in check], [latents[i] for i in check],
                                                   args.batch_size, args.seed)
    if arm == "imagined":
        future = [i for i, s in enumerate(samples) if s["question_type"] == "future"]
        subset = [samples[i] for i in future]
        observed = [latents[i][:, :-ROLLOUT_LATENT_FRAMES] for i in future]
        rolled = [latents[i][:, -ROLLOUT_LATENT_FRAMES:] for i in future]
        source = _derangement({0: list(range(len(future)))}, args.seed)
        shuffled = [torch.cat([observed[k], rolled[source[k]]], dim=1) for k in range(len(future))]
        ablations["imagined_shuffled"] = evaluate_with_world_latents(model, subset, shuffled,
                                                                     batch_size=args.batch_size)
        reversed_rollouts = encode(model, [time_reversed(s) for s in subset], args.batch_size)
        swapped = [torch.cat([observed[k], reversed_rollouts[k][:, -ROLLOUT_LATENT_FRAMES:]], dim=1)
                   for k in range(len(future))]
        ablations["imagined_reversed"] = evaluate_with_world_latents(model, subset, swapped,
                                                                     batch_size=args.batch_size)
    return result, ablations


def rollout_check(model, samples: list[dict], latents: list, batch_size: int, seed: int) -> dict:
    """How well the arm's rollouts predict the true future latent frame, on the held-out clips: the mean
    squared error against it next to copying the last observed latent frame and another clip's rollout, and
    how often a clip's rollout is nearer its own true future than any other clip's (chance 1/n). An
    imagined arm whose rollouts fail this cannot show that imagination pays, whatever it scores."""
    import torch

    from theworld.data.collator import TheWorldCollator

    index = [int(s["id"].rsplit("-", 1)[1]) for s in samples]  # the held-out task's sample ids end in their index
    with_future = heldout(seed, max(index) + 1, ORACLE_FRAMES)
    told = [with_future[i] for i in index]
    collate = TheWorldCollator(model, world=True)
    truth = []
    with torch.no_grad():
        for start in range(0, len(told), batch_size):
            batch = collate(told[start : start + batch_size])
            encoded, _ = model.world_encoder.encode_clips(batch["world_pixel_values"].to(model.device),
                                                          batch["world_num_frames"].to(model.device))
            truth += [encoded[i, :, -ROLLOUT_LATENT_FRAMES:] for i in range(encoded.shape[0])]
    truth, rolled = torch.stack(truth).float(), torch.stack([r[:, -ROLLOUT_LATENT_FRAMES:] for r in latents]).float()
    last = torch.stack([r[:, -ROLLOUT_LATENT_FRAMES - 1 : -ROLLOUT_LATENT_FRAMES] for r in latents]).float()
    distances = ((rolled[:, None] - truth[None]) ** 2).flatten(2).mean(-1)
    return {"n": len(samples), "rollout_mse": float(distances.diagonal().mean()),
            "copy_last_mse": float(((last - truth) ** 2).mean()),
            "other_clip_mse": float(((rolled - truth.roll(1, 0)) ** 2).mean()),
            "nearest_true_future": float((distances.argmin(1) == torch.arange(len(samples))).float().mean())}


def headline_budget(arms: dict, budgets: list[int]) -> int:
    for budget in budgets:
        entry = arms.get("imagined", {}).get(str(budget), {}).get("future")
        if entry and entry["accuracy"] >= HEADLINE_ACCURACY:
            return budget
    return budgets[-1]


def format_rows(report: dict) -> str:
    from theworld.evaluation import format_table

    rows = [(f"{arm} @ {budget}", by_question) for arm, per_budget in report["arms"].items()
            for budget, by_question in per_budget.items()]
    rows += [(f"{name} @ {budget}", by_question) for name, per_budget in report["ablations"].items()
             for budget, by_question in per_budget.items()]
    return format_table(rows)


def plot(report: dict, path: str | Path) -> None:
    """Accuracy on "future" against the label budget, one line per arm and ablation, Wilson 95 % bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    series = [(arm, report["arms"][arm], "-") for arm in ARMS if arm in report["arms"]]
    series += [(name, report["ablations"][name], ":") for name in ABLATIONS if name in report["ablations"]]
    majority = []
    for name, per_budget, style in series:
        points = sorted((int(b), e["future"]) for b, e in per_budget.items() if "future" in e)
        if not points:
            continue
        xs = [b for b, _ in points]
        ax.plot(xs, [e["accuracy"] for _, e in points], style, marker="o", label=name)
        ax.fill_between(xs, [e["ci_low"] for _, e in points], [e["ci_high"] for _, e in points], alpha=0.15)
        majority += [e["majority"] for _, e in points]
    if majority:
        ax.axhline(max(majority), color="grey", linestyle="--", label="majority answer")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1)
    ax.set_xlabel("labelled training samples (budget)")
    ax.set_ylabel('held-out accuracy on "future"')
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="OUT", default="imagination.json",
                        help="where to write the results (default: imagination.json)")
    parser.add_argument("--plot", metavar="PNG", default="imagination.png",
                        help="where to draw accuracy on 'future' against the budget per arm (default: imagination.png)")
    parser.add_argument("--output-dir", metavar="DIR", default="runs/imagination",
                        help="training runs, the random world model and (without --world-model) the trained world "
                             "model go here (default: runs/imagination)")
    parser.add_argument("--budgets", type=parse_budgets, default=parse_budgets("256,1024,4096"),
                        help="label budgets, comma-separated: distinct labelled training samples (default: 256,1024,4096)")
    parser.add_argument("--arms", default=",".join(ARMS),
                        help=f"arms to run, comma-separated (default: all: {','.join(ARMS)})")
    parser.add_argument("--steps", type=int, default=1200,
                        help="optimizer steps of every run, whatever its budget (default: 1200, the trainer's)")
    parser.add_argument("--batch-size", type=int, default=16, help="samples per step and per evaluation pass (default: 16)")
    parser.add_argument("--eval-size", type=int, default=1536,
                        help="held-out samples, the three question types equally likely (default: 1536, about 512 each)")
    parser.add_argument("--world-model", metavar="DIR", default=None,
                        help="the post-trained world model, a Cosmos directory (e.g. the model/ of a theworld.train_world "
                             "run). Default: train one into OUTPUT_DIR/world_model first (about 25 min on 2 CPU cores)")
    parser.add_argument("--rollout-steps", type=int, default=4,
                        help="sampling steps of every rollout, in training and evaluation (default: 4; the tiny world "
                             "model's forced choice is 95.7 %% at 4 steps, 96.5 %% at 35)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the task, the runs and the random world model")
    parser.add_argument("--quiet", action="store_true", help="hide the training runs' own output")
    args = parser.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        parser.error(f"--arms: unknown {unknown}; choose from {', '.join(ARMS)}")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    world_model = Path(args.world_model) if args.world_model else train_world_model(output / "world_model", args.seed)
    random_model = random_world_model(world_model, output / "random_world_model", args.seed)

    import torch

    torch.manual_seed(args.seed)
    samples = {False: heldout(args.seed, args.eval_size)}
    report = {"headline_budget": None, "arms": {}, "ablations": {}}
    # The JSON layout is fixed (checks read it); what the run was, and the world model's clips, go beside it.
    run_record = {"world_model": str(world_model), "world_model_clips": world_model_clips(world_model),
                  "steps": args.steps, "batch_size": args.batch_size, "eval_size": args.eval_size,
                  "rollout_steps": args.rollout_steps, "seed": args.seed, "budgets": args.budgets, "arms": arms,
                  "run_seconds": {}}
    print("world model:", json.dumps(run_record["world_model_clips"]), flush=True)
    trained_on = (run_record["world_model_clips"] or {}).get("condition_frames")
    if trained_on is not None and trained_on != CONDITION_LATENT_FRAMES:
        print(f"warning: the world model was post-trained to predict from {trained_on} latent frame(s); the arms "
              f"roll out from {CONDITION_LATENT_FRAMES} (a {OBSERVED_FRAMES}-frame clip), a setting it never saw: "
              f"expect rollouts near chance (see rollout_check)", flush=True)
    for budget in args.budgets:
        for arm in arms:
            flags = arm_flags(arm, world_model, random_model, args.rollout_steps)
            run_started = time.perf_counter()
            model_dir = train_arm(arm, budget, output / f"steps-{args.steps}" / f"budget-{budget}" / arm, flags, args)
            oracle = arm == "oracle"
            if oracle not in samples:
                samples[oracle] = heldout(args.seed, args.eval_size, ORACLE_FRAMES)
            by_question, ablations = evaluate_arm(arm, model_dir, samples[oracle], args)
            report["arms"].setdefault(arm, {})[str(budget)] = by_question
            check = ablations.pop("rollout_check", None)
            if check is not None:
                run_record.setdefault("rollout_check", {})[f"{arm}@{budget}"] = check
                print(f"rollouts of {arm} against the true future: {json.dumps(check)}", flush=True)
            for name, result in ablations.items():
                report["ablations"].setdefault(name, {})[str(budget)] = result
            # Written after every run: an interrupted experiment still leaves what it measured.
            report["headline_budget"] = headline_budget(report["arms"], args.budgets)
            run_record["run_seconds"][f"{arm}@{budget}"] = round(time.perf_counter() - run_started, 1)
            run_record["seconds"] = round(time.perf_counter() - started, 1)
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
            (output / "imagination_run.json").write_text(json.dumps(run_record, indent=2) + "\n")
    print(format_rows(report))
    print(f"headline budget: {report['headline_budget']}; {run_record['seconds']:.0f} s in all "
          f"(training and evaluation per run: {output / 'imagination_run.json'})")
    if args.plot:
        plot(report, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
