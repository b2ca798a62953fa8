"""Benchmark the training data path and the trainer process, side by side in one run.

1. Live safety filtering vs pre-filtered data, with the worker batching (its defaults) and without
   (``--max-batch 1``). Two tiny workers are spawned side by side. For each scenario the samples a run
   takes are checked once ahead of time (through the batching worker) and served as the "pre-filtered
   dataset"; then the same training run (tiny models, CPU) runs live, every sample checked by
   ``SafetyFilter`` with the trainer's arguments, once against each worker. Prints steps/s, the ratio
   live / pre-filtered, the share of training wall time the trainer waited on the worker, the mean
   checker batch, and each side's rate alone. Scenarios:
   - the one-frame task (``--data synthetic-arrow``, 32x32). Target: wait <= 5 %, live >= 0.75x; and the
     same with a heavier trainer step (a 128x128 world image, 256 world tokens), which the worker keeps up with;
   - the motion task (``--data synthetic``, the default: 9-frame 32x32 clips);
   - 240x320 clips (the motion task's clips scaled to 240x320, nearest neighbour, before the check);
   - the motion task with a small dataset read several times, where ``SafetyFilter`` reuses the
     verdicts of clips it already checked (``--safety-cache-mb``, on by default): only the first
     epoch waits on the worker.
   All but the last measure the *first pass* over the data: the synthetic set is larger than the
   samples a run reads, so every check reaches the worker (the reuse hits are printed, and are 0).
2. Trainer process vs a process that imports diffusers' ``Cosmos2VideoToWorldPipeline``. Two fresh
   subprocesses load the same tiny weights: the trainer side (``import theworld``; ``TheWorld``
   with Gemma 3 + the Cosmos VAE) and the pipeline side (``from diffusers import
   Cosmos2VideoToWorldPipeline``, which imports cosmos_guardrail; the pipeline with the real
   ``CosmosSafetyChecker`` on the tiny guardrail, plus the same Gemma 3). Prints import seconds,
   peak RSS and whether autograd survived. ``--training-only`` runs part 1 alone.
3. The cost of imagination (issue 23): a training step with one rolled-out latent frame
   (``--num-world-steps 1``, the trainer's default ``--world-rollout-steps``, its rollout cache on) against
   one without (``--num-world-steps 0``), on the default motion task, then the per-clip rollout cost at
   real shapes. ``--imagination-only`` runs this part alone; the full bench runs it last. A part of this
   script rather than a script of its own because it is the same measurement as part 1 (``train()`` of
   ``theworld.train`` in process, beside a spawned tiny worker, one thread each).
   a. Training step time: the same trainer run with k = 0 and k = 1 on a small synthetic set
      (``--imagination-size`` clips, ``--blocked-fraction 0`` so that every epoch is exactly size / batch
      steps) read for ``--imagination-epochs`` epochs, so that the caches (VAE latents, rollouts, verdicts)
      are cold in epoch 1 and warm after; the runs alternate k0 k1 k1 k0 ... (``--imagination-repeats``
      pairs) so that the shared machine's drift hits both. Per-epoch rates come from the trainer's own
      per-step times (``summary.json``'s ``step_seconds``). Prints first-epoch and warm-epoch steps/s of both,
      the ratios k1/k0 of the time per step, and the issue's target (warm ratio <= 1.5x), for each arm's
      best run, figure by figure (the verdict's: other jobs on the machine only ever add time, and one run slowed 3.6x by
      them, as happened here, swamps a pooled mean) and for all runs pooled, and says when an arm's runs
      disagree by more than 1.5x. The world model is
      ``--cosmos-model`` (default: the tiny Cosmos build, whose transformer is random: the cost of a rollout
      depends on the transformer's shape and the sampling steps, not on its weights). ``theworld.train_world``
      builds a larger transformer (8 heads of 16 against 2, spatial patch 1 against 2: 4 times the width and
      the tokens), so pass its ``model/`` as ``--cosmos-model`` for the cost of the world model an experiment
      uses.
   b. Rollout cost per clip at real shapes: the Cosmos-Predict2-2B transformer's published width (2048, 16
      heads; ``theworld.real_configs``) cut to ``--rollout-blocks`` blocks (random weights), rolling one
      latent frame out after the 3 latent frames of a 9-frame clip, batch 1, fp32 on the CPU, with
      ``sample_world_latents`` (every sampling step is one transformer pass; TheWorld's rollout has no
      prompt, so no guidance pass): ``--rollout-steps`` (1, 4, 35) at ``--rollout-size`` (240x320: 35 steps
      at 480x640 take about 7 minutes of one block here), and one step at ``--rollout-full-size`` (480x640,
      the real-shape build's clips). Also printed, as arithmetic and labelled so: the time per pass and per block,
      and the published 28 blocks. ``--rollout-cosmos-model`` times the transformer of a
      ``python -m theworld.tiny OUT --real-shapes`` build (``OUT/cosmos``) instead.

Usage: ``python scripts/bench_train.py [--training-only] [--imagination-only] [--steps 100] [--clip-steps 8]
[--large-steps 2] [--cosmos-model DIR]`` (parts 1 and 2 about 7 minutes on 2 CPU cores, part 3 about 4).
The imagination figures of docs/imagination.md ("Cost") are ``python scripts/bench_train.py --imagination-only``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO_ROOT = Path(__file__).resolve().parent.parent
HALF_THE_CORES = max(1, (os.cpu_count() or 2) // 2)
sys.path.insert(0, str(REPO_ROOT))

TRAINER_SIDE = """
import json, resource, sys, time
t0 = time.perf_counter()
import torch, theworld
from theworld import TheWorld
import_s = time.perf_counter() - t0
model = TheWorld.from_pretrained(sys.argv[1], cosmos_model=sys.argv[2])
print(json.dumps({"import_s": import_s, "total_s": time.perf_counter() - t0, "grad_enabled": torch.is_grad_enabled(),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "guardrail_loaded": "cosmos_guardrail" in sys.modules}))
"""

PIPELINE_SIDE = """
import json, os, resource, sys, time
os.environ["HF_HOME"] = sys.argv[3]  # the tiny guardrail's hub cache
t0 = time.perf_counter()
import torch
from diffusers import Cosmos2VideoToWorldPipeline
from transformers import Gemma3ForConditionalGeneration
import_s = time.perf_counter() - t0
from cosmos_guardrail import CosmosSafetyChecker
pipe = Cosmos2VideoToWorldPipeline.from_pretrained(sys.argv[2], safety_checker=CosmosSafetyChecker())
gemma = Gemma3ForConditionalGeneration.from_pretrained(sys.argv[1])
print(json.dumps({"import_s": import_s, "total_s": time.perf_counter() - t0, "grad_enabled": torch.is_grad_enabled(),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "guardrail_loaded": "cosmos_guardrail" in sys.modules}))
"""


@dataclass
class Scenario:
    name: str
    flags: list[str]  # trainer flags
    steps: int
    batch_size: int
    frame_size: tuple[int, int] | None = None  # scale every frame to (H, W) before the check
    first_pass: bool = True  # every sample distinct: no verdict reused


def scenarios(args) -> list[Scenario]:
    clip_reads = args.clip_steps * args.batch_size
    return [
        Scenario("one-frame task (synthetic-arrow, 1x32x32)", ["--data", "synthetic-arrow"], args.steps, args.batch_size),
        # A heavier step (256 world tokens per sample instead of 16): a trainer the worker can keep up with.
        Scenario("one-frame task, heavier trainer step (128x128 world image)",
                 ["--data", "synthetic-arrow", "--world-image-size", "128,128", "--world-projection", "spatial"], args.steps, args.batch_size),
        Scenario("motion task (synthetic, 9x32x32 clips)", ["--data", "synthetic"], args.clip_steps, args.batch_size),
        Scenario("240x320 clips (motion task scaled, 9x240x320)", ["--data", "synthetic"], args.large_steps,
                 args.large_batch_size, frame_size=(240, 320)),
        # A dataset a quarter of the samples read: 4 epochs, only the first one checked by the worker.
        Scenario(f"motion task, {clip_reads // 4} clips read 4 times (verdict reuse on, the default)",
                 ["--data", "synthetic", "--synthetic-size", str(max(1, clip_reads // 4))], args.clip_steps,
                 args.batch_size, first_pass=False),
    ]


def scale_frames(stream, size: tuple[int, int]):
    """Yield ``stream``'s ``(position, sample)`` with every frame scaled to ``size`` (nearest neighbour)."""
    for position, sample in stream:
        if isinstance(sample, dict) and "images" in sample:
            images = []
            for image in sample["images"]:
                image = np.asarray(image)
                h, w = image.shape[-3:-1]
                rows = np.arange(size[0]) * h // size[0]
                cols = np.arange(size[1]) * w // size[1]
                images.append(np.ascontiguousarray(image[..., rows, :, :][..., cols, :]))
            sample = {**sample, "images": images}
        yield position, sample


class PrecheckedSamples:
    """Serves samples that already went through the worker (the "pre-filtered dataset" of the comparison)."""

    def __init__(self, taken: list[tuple[int, dict]], counts):
        self.items, self.counts = iter(taken), counts

    def __next__(self):
        return next(self.items)

    def state_dict(self):
        return {}

    def close(self):
        pass


def run_scenario(args, workdir: Path, workers: dict, scenario: Scenario, order: int) -> dict:
    """Pre-filtered run (checked ahead through the batching worker), then live against each worker."""
    from theworld.data.safety_filter import SafetyFilter
    from theworld.train import parse_args, train

    def flags(name, endpoint):
        return [*scenario.flags, "--output-dir", str(workdir / name), "--safety-endpoint", endpoint,
                "--max-steps", str(scenario.steps), "--batch-size", str(scenario.batch_size),
                "--eval-every", str(10 * scenario.steps), "--save-every", str(10 * scenario.steps),
                "--report-to", "none", "--eval-size", "8", "--synthetic-eval-size", "8",
                "--safety-window", str(args.window), "--num-threads", str(HALF_THE_CORES)]

    needed = scenario.steps * scenario.batch_size
    out = {}

    def make_prefiltered(client, stream, output_dir, state):
        if scenario.frame_size:
            stream = scale_frames(stream, scenario.frame_size)
        # The same filter as the live run (reuse included), run to the end before training starts.
        live = SafetyFilter(client, stream, window=args.window, output_dir=output_dir, ledger_suffix=".precheck",
                            reuse_mb=train_args.safety_cache_mb)
        start = time.perf_counter()
        taken = [next(live) for _ in range(needed)]
        out.update(precheck_seconds=time.perf_counter() - start, precheck_seen=live.counts.seen)
        counts = live.counts
        live.close()
        counts.wait_seconds = 0.0
        return PrecheckedSamples(taken, counts)

    def make_live(arm):
        def make(client, stream, output_dir, state):
            # What train() builds by default, with the frames scaled first where the scenario says so.
            if scenario.frame_size:
                stream = scale_frames(stream, scenario.frame_size)
            live = SafetyFilter(client, stream, window=train_args.safety_window, output_dir=output_dir,
                                max_errors=train_args.safety_max_errors, result_timeout=train_args.safety_timeout,
                                reuse_mb=train_args.safety_cache_mb)
            out[arm] = {"filter": live, "stats_before": client.stats()}
            return live
        return make

    _, _, train_args = parse_args(flags("probe", workers["on"].endpoint))
    out["prefiltered"] = train(*parse_args(flags("prefiltered", workers["on"].endpoint)),
                               make_sample_filter=make_prefiltered)
    for arm in (("on", "off") if order % 2 == 0 else ("off", "on")):  # alternate so load drift hits both alike
        worker = workers[arm]
        summary = train(*parse_args(flags(f"live-{arm}", worker.endpoint)), make_sample_filter=make_live(arm))
        before, after = out[arm]["stats_before"]["batching"], summary["worker_stats"]["batching"]
        batches, units = after["batches"] - before["batches"], after["units"] - before["units"]
        reused = out[arm]["filter"].reused
        out[arm] = {**summary, "mean_batch": units / batches if batches else 0.0, "checks_sent": units,
                    "reuse_hits": reused.hits if reused is not None else 0}
    return out


def run_side(code: str, *argv) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True, env=env,
                          cwd=REPO_ROOT, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------- part 3: the cost of imagination

IMAGINATION_ARMS = (0, 1)  # the --num-world-steps of the two runs compared
ROLLOUT_CLIP_FRAMES = 9  # the motion task's clips: 3 latent frames observed, the rollout predicts the 4th
PUBLISHED_BLOCKS = 28  # Cosmos-Predict2-2B's transformer blocks (theworld.real_configs)


def imagination_order(repeats: int) -> list[int]:
    """The k of each run: pairs k0 k1, k1 k0, k0 k1, ..., so that a drift of the shared machine's load
    (it rises or falls over minutes) hits both arms alike."""
    return [k for r in range(repeats) for k in (IMAGINATION_ARMS if r % 2 == 0 else IMAGINATION_ARMS[::-1])]


def epoch_seconds(summary: dict, steps_per_epoch: int) -> list[float]:
    """Each epoch's seconds in a run, from its summary's per-step times (``step_seconds``). Epoch e is steps
    ``e * steps_per_epoch + 1 ...`` only when no sample was blocked, failed or unreadable (each one shifts
    every later sample by one position), so such a run is refused rather than misread."""
    seconds = summary["step_seconds"]
    if summary["blocked"] or summary["errors"] or summary["bad_samples"] or len(seconds) % steps_per_epoch:
        raise RuntimeError(f"the imagination run's epochs do not fall on step boundaries: {len(seconds)} steps "
                           f"of {steps_per_epoch} an epoch, blocked {summary['blocked']}, errors {summary['errors']}, "
                           f"bad samples {summary['bad_samples']}: it must read --blocked-fraction 0 data")
    return [sum(seconds[i:i + steps_per_epoch]) for i in range(0, len(seconds), steps_per_epoch)]


def run_imagination(args, workdir: Path, worker, world_model: str) -> list[dict]:
    """Part 3a: the trainer's runs with k = 0 and k = 1 in the order of `imagination_order`, each read back
    per epoch."""
    from theworld.train import parse_args, train

    steps_per_epoch = args.imagination_size // args.batch_size
    steps = steps_per_epoch * args.imagination_epochs
    runs = []
    for i, k in enumerate(imagination_order(args.imagination_repeats)):
        flags = ["--data", "synthetic", "--synthetic-size", str(args.imagination_size), "--blocked-fraction", "0",
                 "--cosmos-model", world_model, "--num-world-steps", str(k),
                 "--output-dir", str(workdir / f"run{i}-k{k}"), "--safety-endpoint", worker.endpoint,
                 "--max-steps", str(steps), "--batch-size", str(args.batch_size),
                 # Evaluations and checkpoints are outside the timed steps; only the final ones run.
                 "--eval-every", str(10 * steps), "--save-every", str(10 * steps), "--report-to", "none",
                 "--eval-size", "8", "--synthetic-eval-size", "8", "--num-threads", str(HALF_THE_CORES)]
        if k and args.world_rollout_steps is not None:
            flags += ["--world-rollout-steps", str(args.world_rollout_steps)]
        summary = train(*parse_args(flags))
        runs.append({"k": k, "epoch_seconds": epoch_seconds(summary, steps_per_epoch),
                     "safety_wait_fraction": summary["safety_wait_fraction"]})
    return runs


# Runs of one arm whose warm step times differ by more than this had the machine's load change under them.
NOISY_SPREAD = 1.5


def imagination_rates(runs: list[dict], steps_per_epoch: int) -> dict[int, dict]:
    """Per k, seconds per step in the first epoch (`first`) and in the later, warm ones (`warm`): the best of the
    arm's runs, each figure the lowest any run took (`best`: what the machine's interference, which only ever
    adds time, inflated least; the estimate the verdict uses), and the mean of its runs (`pooled`); and
    `warm_spread`, its slowest run's warm time over its fastest's."""
    rates = {}
    for k in IMAGINATION_ARMS:
        per_run = [{"first": run["epoch_seconds"][0] / steps_per_epoch,
                    "warm": sum(run["epoch_seconds"][1:]) / (steps_per_epoch * (len(run["epoch_seconds"]) - 1))}
                   for run in runs if run["k"] == k]
        warm = [run["warm"] for run in per_run]
        rates[k] = {"best": {key: min(run[key] for run in per_run) for key in ("first", "warm")},
                    "pooled": {key: sum(run[key] for run in per_run) / len(per_run) for key in ("first", "warm")},
                    "warm_spread": max(warm) / min(warm)}
    return rates


def measure_rollout_cost(args) -> dict:
    """Part 3b: seconds of one rollout of one latent frame for one clip at real width, per sampling steps."""
    import torch
    from diffusers import CosmosTransformer3DModel

    from theworld.configuration_theworld import latent_frames
    from theworld.modeling.rollout import sample_world_latents
    from theworld.real_configs import COSMOS_TRANSFORMER_CONFIG, COSMOS_VAE_CONFIG

    # Part 1 and 3a ran the trainer in this process with one thread; nothing else of ours runs now.
    torch.set_num_threads(os.cpu_count() or 1)
    if args.rollout_cosmos_model:
        transformer = CosmosTransformer3DModel.from_pretrained(args.rollout_cosmos_model, subfolder="transformer")
        source = f"the transformer of {args.rollout_cosmos_model}"
    else:
        torch.manual_seed(0)
        transformer = CosmosTransformer3DModel(**{**COSMOS_TRANSFORMER_CONFIG, "num_layers": args.rollout_blocks})
        source = "Cosmos-Predict2-2B's transformer config (theworld.real_configs), random weights"
    transformer.eval()
    spatial = 2 ** len(COSMOS_VAE_CONFIG["temperal_downsample"])  # the Wan VAE's 8x8 pixels per latent cell
    channels, observed = transformer.config.in_channels - 1, latent_frames(ROLLOUT_CLIP_FRAMES)
    patch = transformer.config.patch_size
    # The first pass pays one-off costs (allocations, first dispatch of each kernel): spend it untimed on a tiny clip.
    sample_world_latents(transformer, torch.zeros(1, channels, observed, 2 * patch[1], 2 * patch[2]), 1, 1,
                         generator=torch.Generator().manual_seed(1))
    timings = []
    for size, steps_list in ((args.rollout_size, args.rollout_steps), (args.rollout_full_size, [1])):
        if not size:
            continue
        h, w = size[0] // spatial, size[1] // spatial
        observed_latents = torch.randn(1, channels, observed, h, w, generator=torch.Generator().manual_seed(0))
        for steps in steps_list:
            start = time.perf_counter()
            sample_world_latents(transformer, observed_latents, 1, steps, generator=torch.Generator().manual_seed(1))
            timings.append({"size": size, "latent_shape": [channels, observed + 1, h, w], "steps": steps,
                            "tokens": (observed + 1) // patch[0] * (h // patch[1]) * (w // patch[2]),
                            "seconds": time.perf_counter() - start})
    config = transformer.config
    return {"source": source, "blocks": config.num_layers, "width": config.num_attention_heads * config.attention_head_dim,
            "heads": config.num_attention_heads, "threads": torch.get_num_threads(), "timings": timings}


def print_imagination(args, runs: list[dict], world_model: str, loads: tuple[float, float]) -> None:
    steps_per_epoch = args.imagination_size // args.batch_size
    rollout_steps = args.world_rollout_steps or "the trainer's default 35"
    order = " ".join(f"k{run['k']}" for run in runs)
    print(f"\n== the cost of imagination: a training step with k = 1 (--num-world-steps 1, {rollout_steps} sampling "
          f"steps a rollout, rollout cache on) against k = 0; motion task (9x32x32 clips, --blocked-fraction 0), "
          f"{args.imagination_size} clips x {args.imagination_epochs} epochs, batch {args.batch_size} "
          f"({steps_per_epoch} steps an epoch); runs in the order {order}; world model {world_model}; tiny models, "
          f"CPU, trainer and worker {HALF_THE_CORES} thread(s) each; load average {loads[0]:.1f} at the start of "
          f"this part, {loads[1]:.1f} at its end, on {os.cpu_count()} cores")
    for i, run in enumerate(runs):
        first, *warm = run["epoch_seconds"]
        print(f"run {i + 1}, k = {run['k']}: epoch 1 {steps_per_epoch / first:.2f} steps/s, epochs 2-"
              f"{len(run['epoch_seconds'])} {steps_per_epoch * len(warm) / sum(warm):.2f} steps/s "
              f"(waited on the safety worker {run['safety_wait_fraction']:.1%} of the run)")
    rates = imagination_rates(runs, steps_per_epoch)
    warm_label = f"epochs 2-{args.imagination_epochs} (caches warm)"
    for estimate, label in (("best", "each arm's best run, figure by figure (the verdict's)"),
                            ("pooled", "all runs pooled")):
        print(f"-- {label}:")
        print(f"{'':9s} {'epoch 1 (caches cold)':>30s} {warm_label:>30s}")
        for k, rate in rates.items():
            cells = [f"{1 / rate[estimate][key]:.2f} steps/s ({rate[estimate][key] * 1000:.0f} ms/step)"
                     for key in ("first", "warm")]
            print(f"k = {k:<5d} {cells[0]:>30s} {cells[1]:>30s}")
        first_ratio, warm_ratio = (rates[1][estimate][key] / rates[0][estimate][key] for key in ("first", "warm"))
        verdict = ("   target: warm <= 1.5x: " + ("met" if warm_ratio <= 1.5 else "MISSED")) if estimate == "best" else ""
        print(f"{'k1 / k0':9s} {f'{first_ratio:.2f}x time per step':>30s} {f'{warm_ratio:.2f}x time per step':>30s}"
              f"{verdict}")
    for k, rate in rates.items():
        if rate["warm_spread"] > NOISY_SPREAD:
            print(f"noisy: the k = {k} runs' warm steps differ by {rate['warm_spread']:.2f}x (the machine's load changed "
                  f"under them); the pooled figures mix loads: rerun on a quieter machine or with more "
                  f"--imagination-repeats")


def print_rollout_cost(cost: dict) -> None:
    print(f"\n== rollout cost per clip at real width: {cost['source']}, {cost['blocks']} block(s) of width "
          f"{cost['width']} ({cost['heads']} heads), fp32, CPU, {cost['threads']} thread(s); one clip (batch 1) of "
          f"{ROLLOUT_CLIP_FRAMES} frames (3 latent frames observed), 1 latent frame rolled out; sample_world_latents: "
          f"one transformer pass per sampling step, no guidance (TheWorld's rollout has no prompt; the pipeline with "
          f"a prompt makes 2 passes a step)")
    for timing in cost["timings"]:
        seconds, steps = timing["seconds"], timing["steps"]
        per_pass = seconds / steps
        print(f"{timing['size'][0]}x{timing['size'][1]} clip (latents {timing['latent_shape']}, {timing['tokens']} "
              f"tokens), {steps:2d} step(s): {seconds:7.2f} s measured = {per_pass:.2f} s a pass, "
              f"{per_pass / cost['blocks']:.2f} s a pass and block; at {PUBLISHED_BLOCKS} blocks "
              f"~{seconds * PUBLISHED_BLOCKS / cost['blocks']:.0f} s (arithmetic, not measured)")


def size_flag(value: str) -> list[int] | None:
    """'H,W' (both positive multiples of 16), or '' / '0' for none."""
    from theworld.configuration_theworld import check_world_image_size

    if value in ("", "0"):
        return None
    try:
        return check_world_image_size(value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'H,W', both positive multiples of 16 (e.g. 240,320), or '' for "
                                         f"none; got {value!r}") from None


def steps_flag(value: str) -> list[int]:
    """'1,4,35': sampling step counts, each >= 1; '' for none."""
    try:
        steps = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        steps = [0]
    if any(step < 1 for step in steps):
        raise argparse.ArgumentTypeError(f"expected sampling step counts >= 1 such as 1,4,35, got {value!r}")
    return steps


def check_imagination_args(parser: argparse.ArgumentParser, args) -> None:
    """Refuse part 3's settings that cannot give whole epochs, a warm epoch or a valid rollout, before anything runs."""
    if args.imagination_size % args.batch_size or args.imagination_size < args.batch_size:
        parser.error(f"--imagination-size ({args.imagination_size}) must be a multiple of --batch-size "
                     f"({args.batch_size}): each epoch is then a whole number of steps")
    if args.imagination_epochs < 2 or args.imagination_repeats < 1 or args.rollout_blocks < 1:
        parser.error("--imagination-epochs must be at least 2 (a cold epoch and a warm one), --imagination-repeats "
                     "and --rollout-blocks at least 1")
    if args.world_rollout_steps is not None and args.world_rollout_steps < 2:
        parser.error("--world-rollout-steps must be at least 2 (the trainer's rule: its rollout's last step moves "
                     "nothing)")


def main():
    from theworld.training import TrainArguments

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100,
                        help="optimizer steps per run on the one-frame task (enough that filling the window at the "
                             "start, which every live run waits for once, does not dominate)")
    parser.add_argument("--clip-steps", type=int, default=8, help="optimizer steps per run on the motion task")
    parser.add_argument("--large-steps", type=int, default=2, help="optimizer steps per run on 240x320 clips")
    parser.add_argument("--batch-size", type=int, default=16, help="samples per step (the trainer's default)")
    parser.add_argument("--large-batch-size", type=int, default=2, help="samples per step on 240x320 clips")
    parser.add_argument("--window", type=int, default=TrainArguments.safety_window,
                        help="safety checks in flight ahead of the trainer (default: the trainer's)")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--training-only", action="store_true",
                      help="run part 1 alone (skip part 2, the two processes, and part 3)")
    only.add_argument("--imagination-only", action="store_true", help="run part 3 alone")
    imagination = parser.add_argument_group("part 3, the cost of imagination (issue 23)")
    imagination.add_argument("--cosmos-model", default=None,
                             help="the world model of part 3a, a Cosmos directory (default: the tiny Cosmos build, "
                                  "whose random transformer costs what a trained one does; e.g. a theworld.train_world "
                                  "output's model/)")
    imagination.add_argument("--imagination-size", type=int, default=256,
                             help="clips of the synthetic set read every epoch (a multiple of --batch-size)")
    imagination.add_argument("--imagination-epochs", type=int, default=4,
                             help="epochs per run: the first with cold caches, the others warm (at least 2)")
    imagination.add_argument("--imagination-repeats", type=int, default=2,
                             help="pairs of runs, k0 k1 then k1 k0 ... (more: less noise, longer)")
    imagination.add_argument("--world-rollout-steps", type=int, default=None,
                             help="sampling steps of the k = 1 runs' rollouts (default: the trainer's, 35)")
    imagination.add_argument("--rollout-size", type=size_flag, default="240,320",
                             help="'H,W' of the clip whose rollout part 3b times at --rollout-steps ('' skips)")
    imagination.add_argument("--rollout-steps", type=steps_flag, default="1,4,35",
                             help="sampling step counts timed at --rollout-size ('' skips)")
    imagination.add_argument("--rollout-full-size", type=size_flag, default="480,640",
                             help="'H,W' of the clip timed at 1 sampling step (one transformer pass; '' skips)")
    imagination.add_argument("--rollout-blocks", type=int, default=1,
                             help="transformer blocks of the real-width transformer part 3b builds (the published "
                                  "model has 28; the time grows linearly with them)")
    imagination.add_argument("--rollout-cosmos-model", default=None,
                             help="time the transformer of this Cosmos directory instead (e.g. OUT/cosmos of "
                                  "`python -m theworld.tiny OUT --real-shapes`; --rollout-blocks is then ignored)")
    args = parser.parse_args()
    if not args.training_only:  # where part 3 does not run, `--batch-size 10` (say) works as before
        check_imagination_args(parser, args)

    from safety_worker import spawn_worker
    from safety_worker.tiny import build_tiny_guardrail
    from theworld.tiny import build_tiny_models, default_tiny_dir

    gemma, cosmos = build_tiny_models(default_tiny_dir())
    world_model = args.cosmos_model or str(cosmos)
    run_part1, run_part2 = not args.imagination_only, not (args.training_only or args.imagination_only)
    run_part3 = not args.training_only
    time_rollouts = run_part3 and bool(args.rollout_size and args.rollout_steps or args.rollout_full_size)
    # As `python -m theworld.train` does beside a spawned CPU worker: half of the cores each.
    worker_env = dict(os.environ, OMP_NUM_THREADS=str(HALF_THE_CORES))
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as workers_stack:
        if run_part1:
            workers = {"on": workers_stack.enter_context(spawn_worker(preset="tiny", env=worker_env)),
                       "off": workers_stack.enter_context(spawn_worker(preset="tiny", env=worker_env,
                                                                       extra_args=["--max-batch", "1"]))}
            results = [(sc, run_scenario(args, Path(tmp) / str(i), workers, sc, i))
                       for i, sc in enumerate(scenarios(args))]
            batching = {arm: w.hello["batching"] for arm, w in workers.items()}
            load_after_part1 = os.getloadavg()[0]
        if run_part3:
            # The batching worker of part 1 when it ran (the trainer's defaults), else one of its own.
            worker = workers["on"] if run_part1 else workers_stack.enter_context(spawn_worker(preset="tiny", env=worker_env))
            load_before = os.getloadavg()[0]
            imagination_runs = run_imagination(args, Path(tmp) / "imagination", worker, world_model)
            loads = (load_before, os.getloadavg()[0])
    if time_rollouts:
        rollout_cost = measure_rollout_cost(args)
    if run_part2:
        trainer = run_side(TRAINER_SIDE, gemma, cosmos)
        pipeline = run_side(PIPELINE_SIDE, gemma, cosmos, build_tiny_guardrail())
    if run_part1:
        print_safety_filtering(args, results, batching, load_after_part1)
    if run_part2:
        print_processes(trainer, pipeline)
    if run_part3:
        print_imagination(args, imagination_runs, world_model, loads)
    if time_rollouts:
        print_rollout_cost(rollout_cost)


def print_safety_filtering(args, results, batching, load_at_end: float) -> None:
    print(f"\n== live safety filtering vs pre-filtered data, worker batching on (defaults) vs off (--max-batch 1); "
          f"window {args.window}, tiny models, CPU, {HALF_THE_CORES} thread(s) each for trainer and worker; "
          f"load average at the end {load_at_end:.1f} on {os.cpu_count()} cores")
    print(f"worker batching settings: on {batching['on']}, off {batching['off']}")
    for sc, r in results:
        pre = r["prefiltered"]
        reads = sc.steps * sc.batch_size
        print(f"-- {sc.name}: {sc.steps} steps x {sc.batch_size} samples; "
              + ("first pass over the data (every sample distinct)" if sc.first_pass else
                 "verdicts of clips already checked reused (the default)"))
        print(f"pre-filtered {pre['steps_per_second']:.2f} steps/s ({pre['steps_per_second'] * sc.batch_size:.1f} samples/s)"
              + (f"; alone, the batching worker checked {r['precheck_seen'] / r['precheck_seconds']:.1f} samples/s"
                 if sc.first_pass else ""))
        for arm in ("on", "off"):
            live = r[arm]
            ratio = live["steps_per_second"] / pre["steps_per_second"]
            target = ""
            if sc.flags[:2] == ["--data", "synthetic-arrow"]:
                met = live["safety_wait_fraction"] <= 0.05 and ratio >= 0.75
                target = f" (target wait <= 5%, live >= 0.75x: {'met' if met else 'MISSED'})"
            print(f"batching {arm:3s}: live {live['steps_per_second']:.2f} steps/s = {ratio:.2f}x pre-filtered, "
                  f"waited on the worker {live['safety_wait_fraction']:.1%} of training time, "
                  f"worker ran {live['checks_sent']} checks in mean batches of {live['mean_batch']:.1f} for the "
                  f"{live['seen']} samples taken, {live['reuse_hits']} verdicts reused{target}")
            lost = 1 / live["steps_per_second"] - 1 / pre["steps_per_second"]  # seconds per step lost live
            waited = live["safety_wait_fraction"] / live["steps_per_second"]  # seconds per step spent waiting
            print(f"           of the {lost * 1000:.0f} ms/step the live run lost, waiting explains {waited * 1000:.0f} ms; "
                  f"the rest is the worker computing on the trainer's CPU cores")
            if not live["accounting_holds"] or live["trained"] < reads:
                print(f"  accounting: seen {live['seen']} trained {live['trained']} blocked {live['blocked']} "
                      f"errors {live['errors']}")
        on_, off_ = r["on"], r["off"]
        print(f"batching on / off: live speed {on_['steps_per_second'] / off_['steps_per_second']:.2f}x")


def print_processes(trainer, pipeline) -> None:
    print("\n== trainer process vs a process that imports Cosmos2VideoToWorldPipeline (same tiny weights)")
    for name, side in (("trainer (theworld)", trainer), ("pipeline (diffusers)", pipeline)):
        print(f"{name:22s} import {side['import_s']:.2f} s, import+load {side['total_s']:.2f} s, peak RSS "
              f"{side['peak_rss_mb']:.0f} MB, autograd {'ON' if side['grad_enabled'] else 'OFF'}, "
              f"cosmos_guardrail loaded: {side['guardrail_loaded']}")
    print(f"ratios pipeline/trainer: import {pipeline['import_s'] / trainer['import_s']:.2f}x, peak RSS "
          f"{pipeline['peak_rss_mb'] / trainer['peak_rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
