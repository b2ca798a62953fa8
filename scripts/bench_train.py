"""Benchmark the training data path and the trainer process, side by side in one run.

1. Live safety filtering vs pre-filtered data. The same training run (tiny models, synthetic task)
   twice against one spawned tiny worker, for a trainer faster than the worker and for one slower: once with every sample checked live by ``SafetyFilter``
   (the real path), once on the *same* sanitized samples checked before the run started. Prints
   steps/s of both, their ratio, the fraction of training wall time the live run spent waiting on
   the worker, how much of the slowdown that waiting explains (on a CPU-only machine the rest is the
   worker's compute sharing the trainer's cores), and each side's rate alone.
   Target: <= 5 % waiting when the worker keeps up.
2. Trainer process vs a process that imports diffusers' ``Cosmos2VideoToWorldPipeline``. Two fresh
   subprocesses load the same tiny weights: the trainer side (``import theworld``; ``TheWorld``
   with Gemma 3 + the Cosmos VAE) and the pipeline side (``from diffusers import
   Cosmos2VideoToWorldPipeline``, which imports cosmos_guardrail; the pipeline with the real
   ``CosmosSafetyChecker`` on the tiny guardrail, plus the same Gemma 3). Prints import seconds,
   peak RSS and whether autograd survived.

Usage: ``python scripts/bench_train.py [--steps 60] [--batch-size 4]`` (a few minutes on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


# The tiny trainer outruns one CPU worker; the second scenario makes each training step heavier
# (a 128x128 world image: 256 world tokens per sample instead of 16) so that the worker keeps up.
SCENARIOS = {
    "tiny trainer (32x32 world image, 16 world tokens)": [],
    "heavier trainer step (128x128 world image, 256 world tokens)": ["--world-image-size", "128,128"],
}


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


def precheck(client, stream, output_dir, count: int, window: int):
    """Run the live filter ahead of time for the samples a run will take; keep its outputs."""
    from theworld.data.safety_filter import SafetyFilter

    live = SafetyFilter(client, stream, window=window, output_dir=output_dir, ledger_suffix=".precheck")
    start = time.perf_counter()
    taken = [next(live) for _ in range(count)]
    elapsed = time.perf_counter() - start
    counts = live.counts
    live.close()
    return taken, counts, elapsed


def run_pair(args, workdir: Path, endpoint: str, extra: list[str]) -> dict:
    from theworld.train import parse_args, train

    def flags(name):
        return [*extra, "--output-dir", str(workdir / name), "--safety-endpoint", endpoint, "--max-steps", str(args.steps),
                "--batch-size", str(args.batch_size), "--eval-every", str(10 * args.steps),
                "--save-every", str(10 * args.steps), "--report-to", "none", "--eval-size", "8",
                "--synthetic-eval-size", "8", "--safety-window", str(args.window), "--num-threads", str(HALF_THE_CORES)]

    needed = args.steps * args.batch_size
    prechecked = {}

    def make_prefiltered(client, stream, output_dir, state):
        taken, counts, seconds = precheck(client, stream, output_dir, needed, args.window)
        prechecked.update(seconds=seconds, seen=counts.seen)
        counts.wait_seconds = 0.0
        return PrecheckedSamples(taken, counts)

    pre = train(*parse_args(flags("prefiltered")), make_sample_filter=make_prefiltered)
    live = train(*parse_args(flags("live")))
    return {"live": live, "prefiltered": pre, "precheck_seconds": prechecked["seconds"], "precheck_seen": prechecked["seen"]}


def run_side(code: str, *argv) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True, env=env,
                          cwd=REPO_ROOT, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per training run")
    parser.add_argument("--batch-size", type=int, default=4, help="samples per step")
    parser.add_argument("--window", type=int, default=32, help="safety checks in flight ahead of the trainer")
    args = parser.parse_args()

    from safety_worker import spawn_worker
    from safety_worker.tiny import build_tiny_guardrail
    from theworld.tiny import build_tiny_models, default_tiny_dir

    gemma, cosmos = build_tiny_models(default_tiny_dir())
    # As `python -m theworld.train` does beside a spawned CPU worker: half of the cores each.
    worker_env = dict(os.environ, OMP_NUM_THREADS=str(HALF_THE_CORES))
    with tempfile.TemporaryDirectory() as tmp, spawn_worker(preset="tiny", env=worker_env) as worker:
        pairs = {name: run_pair(args, Path(tmp) / str(i), worker.endpoint, extra)
                 for i, (name, extra) in enumerate(SCENARIOS.items())}
    trainer = run_side(TRAINER_SIDE, gemma, cosmos)
    pipeline = run_side(PIPELINE_SIDE, gemma, cosmos, build_tiny_guardrail())

    print(f"\n== live safety filtering vs pre-filtered data ({args.steps} steps x {args.batch_size} samples, "
          f"window {args.window}, tiny models, CPU, one tiny worker)")
    for name, pair in pairs.items():
        live, pre = pair["live"], pair["prefiltered"]
        worker_rate = pair["precheck_seen"] / pair["precheck_seconds"]
        trainer_rate = pre["steps_per_second"] * args.batch_size
        print(f"-- {name}")
        print(f"steps/s live {live['steps_per_second']:.2f} | pre-filtered {pre['steps_per_second']:.2f} | "
              f"ratio live/pre-filtered {live['steps_per_second'] / pre['steps_per_second']:.2f}")
        lost = 1 / live["steps_per_second"] - 1 / pre["steps_per_second"]  # seconds per step the live run lost
        waited = live["safety_wait_fraction"] / live["steps_per_second"]  # seconds per step spent waiting
        print(f"trainer waited on the worker {live['safety_wait_fraction']:.1%} of training wall time "
              f"(target <= 5% when the worker keeps up)")
        print(f"of the {lost * 1000:.0f} ms/step the live run lost, waiting explains {waited * 1000:.0f} ms; the rest is "
              f"the worker computing on the same CPU cores as the trainer")
        print(f"alone, the worker checks {worker_rate:.1f} samples/s and the trainer consumes {trainer_rate:.1f} samples/s")
        print(f"accounting live: seen {live['seen']} = trained {live['trained']} + blocked {live['blocked']} + "
              f"errors {live['errors']}")
    print("\n== trainer process vs a process that imports Cosmos2VideoToWorldPipeline (same tiny weights)")
    for name, side in (("trainer (theworld)", trainer), ("pipeline (diffusers)", pipeline)):
        print(f"{name:22s} import {side['import_s']:.2f} s, import+load {side['total_s']:.2f} s, peak RSS "
              f"{side['peak_rss_mb']:.0f} MB, autograd {'ON' if side['grad_enabled'] else 'OFF'}, "
              f"cosmos_guardrail loaded: {side['guardrail_loaded']}")
    print(f"ratios pipeline/trainer: import {pipeline['import_s'] / trainer['import_s']:.2f}x, peak RSS "
          f"{pipeline['peak_rss_mb'] / trainer['peak_rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
