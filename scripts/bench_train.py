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
   peak RSS and whether autograd survived. ``--training-only`` skips it.

Usage: ``python scripts/bench_train.py [--training-only] [--steps 100] [--clip-steps 8] [--large-steps 2]``
(about 7 minutes on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
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
    parser.add_argument("--training-only", action="store_true", help="skip part 2 (the two processes)")
    args = parser.parse_args()

    from safety_worker import spawn_worker
    from safety_worker.tiny import build_tiny_guardrail
    from theworld.tiny import build_tiny_models, default_tiny_dir

    gemma, cosmos = build_tiny_models(default_tiny_dir())
    # As `python -m theworld.train` does beside a spawned CPU worker: half of the cores each.
    worker_env = dict(os.environ, OMP_NUM_THREADS=str(HALF_THE_CORES))
    with tempfile.TemporaryDirectory() as tmp, \
            spawn_worker(preset="tiny", env=worker_env) as on, \
            spawn_worker(preset="tiny", env=worker_env, extra_args=["--max-batch", "1"]) as off:
        workers = {"on": on, "off": off}
        results = [(sc, run_scenario(args, Path(tmp) / str(i), workers, sc, i)) for i, sc in enumerate(scenarios(args))]
        batching = {arm: w.hello["batching"] for arm, w in workers.items()}
    if not args.training_only:
        trainer = run_side(TRAINER_SIDE, gemma, cosmos)
        pipeline = run_side(PIPELINE_SIDE, gemma, cosmos, build_tiny_guardrail())

    print(f"\n== live safety filtering vs pre-filtered data, worker batching on (defaults) vs off (--max-batch 1); "
          f"window {args.window}, tiny models, CPU, {HALF_THE_CORES} thread(s) each for trainer and worker; "
          f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
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
    if args.training_only:
        return
    print("\n== trainer process vs a process that imports Cosmos2VideoToWorldPipeline (same tiny weights)")
    for name, side in (("trainer (theworld)", trainer), ("pipeline (diffusers)", pipeline)):
        print(f"{name:22s} import {side['import_s']:.2f} s, import+load {side['total_s']:.2f} s, peak RSS "
              f"{side['peak_rss_mb']:.0f} MB, autograd {'ON' if side['grad_enabled'] else 'OFF'}, "
              f"cosmos_guardrail loaded: {side['guardrail_loaded']}")
    print(f"ratios pipeline/trainer: import {pipeline['import_s'] / trainer['import_s']:.2f}x, peak RSS "
          f"{pipeline['peak_rss_mb'] / trainer['peak_rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
