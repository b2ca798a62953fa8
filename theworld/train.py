"""Train TheWorld on safety-checked data: ``python -m theworld.train [--config FILE] [--key value ...]``.

With no arguments this is the complete offline default: the project's tiny Gemma 3 and Cosmos
(built on first use under ``theworld.tiny.default_tiny_dir()``), the synthetic world task, and a
spawned safety worker running the tiny guardrail; 1200 steps (a few minutes on 2 CPU cores), then a summary.
Real models train with the same command: ``--gemma-model google/gemma-3-4b-it --cosmos-model
nvidia/Cosmos-Predict2-2B-Video2World --data my.jsonl``. Multi-GPU: ``accelerate launch -m
theworld.train ...`` (one safety worker per node: the local main process spawns it, the other local
ranks attach to it).

Every training sample goes through the safety worker (``theworld.data.safety_filter``) before the
model sees it; the worker is the only process that imports ``cosmos_guardrail``, so autograd stays
on here. The loop (``theworld.training.loop.train``) is meant to be read top to bottom: build, check,
step, evaluate, checkpoint; ``theworld/training/`` holds one file per concern, this module is the entry
point.

Outputs in ``--output-dir``: ``summary.json``, ``metrics.jsonl``, ``loss_curve.png``,
``blocked.jsonl``, ``errors.jsonl``, ``tensorboard/``, ``checkpoints/step-NNNNNN/``, ``model/`` (the
trained model for ``TheWorld.from_pretrained``).
"""
from __future__ import annotations

import os
import sys

from theworld.training import (  # noqa: F401  (the public names, importable from here as before)
    ARGUMENT_CLASSES, CHECKPOINT_DIR, ENDPOINT_FILE, EVAL_BATCH_SIZE, SYNTHETIC_TASKS, TASK_FILE, DataArguments,
    ModelArguments, TrainArguments, build_model, checkpoint_dirs, collate_eval_batches, evaluate,
    evaluate_world_and_no_world, heldout_loads, is_saved_theworld, load_checkpoint, load_config_file, lora_config,
    open_datasets, parse_args, parse_report_to, peak_memory_mb, print_summary, resolve_mixed_precision, rng_state,
    safety_worker, save_checkpoint, set_rng_state, task_record, to_device, train, training_stream,
    world_projector_parameters, write_json_atomic, write_loss_curve,
)


def main(argv: list[str] | None = None) -> int:
    """Console entry point (``theworld-train``)."""
    from theworld.data.safety_filter import TooManyBadSamples
    from theworld.data.sources import DataError

    model_args, data_args, train_args = parse_args(argv)
    if train_args.fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        print("theworld-train: error: --fsdp shards the model across processes: launch several, e.g. "
              "`torchrun --nproc-per-node 2 -m theworld.train --fsdp` (on CPU: ACCELERATE_USE_CPU=true)", file=sys.stderr)
        return 2
    if train_args.safety_verdict_store and train_args.safety_endpoint:
        print("theworld-train: error: --safety-verdict-store is given to the worker this run spawns; the attached "
              "worker (--safety-endpoint) keeps its own: serve it with `python -m safety_worker serve --verdict-store "
              "PATH`", file=sys.stderr)
        return 2
    try:
        summary = train(model_args, data_args, train_args)
    except DataError as e:  # the data cannot be opened at all: a start-up error, one line, usage exit code
        print(f"theworld-train: error: {e}", file=sys.stderr)
        return 2
    except TooManyBadSamples as e:
        print(f"theworld-train: stopped: {e}", file=sys.stderr)
        return 1
    from accelerate import PartialState

    if PartialState().is_main_process:
        print_summary(summary, train_args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
