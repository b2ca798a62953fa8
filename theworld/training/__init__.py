"""The training package behind ``python -m theworld.train``: one file per concern.

- ``arguments``: the flags (``ModelArguments``, ``DataArguments``, ``TrainArguments``), ``--config`` files,
  ``--report-to`` trackers.
- ``model``: the model a run trains (frozen parts, LoRA adapters).
- ``data``: training and held-out sources, each rank's reading order, the task record saved with the model.
- ``worker_session``: the safety worker a run spawns or attaches to.
- ``loop``: ``train()``, read top to bottom; the run context (``open_run``), the restore (``resume_state``), the
  checked training samples (``open_training_samples``), the loop of steps (``run_steps``) and one optimizer step
  (``train_step``), which ``theworld.train_world`` runs too.
- ``state``: what a run trains and a checkpoint restores (``TrainState``: model, optimizer, schedule, step,
  records, positions).
- ``heldout``: the held-out set (checked, collated once) and evaluation during training. ``checkpoints``:
  checkpoint files and RNG.
  ``reporting``: loss curve, summary (``build_summary``), peak memory. ``sharding``: FSDP (``--fsdp``) and gathering shards.
"""
from theworld.inference.loading import is_saved_theworld
from theworld.training.arguments import (
    ARGUMENT_CLASSES, DataArguments, ModelArguments, TrainArguments, load_config_file, parse_args, parse_report_to,
)
from theworld.training.checkpoints import (
    CHECKPOINT_DIR, checkpoint_dirs, load_checkpoint, rng_state, save_checkpoint, set_rng_state,
)
from theworld.training.data import (
    SYNTHETIC_TASKS, TASK_FILE, heldout_loads, open_datasets, synthetic_task, task_record, training_stream,
)
from theworld.training.heldout import (
    EVAL_BATCH_SIZE, HeldOutSet, check_heldout_samples, collate_eval_batches, evaluate, evaluate_world_and_no_world,
    prepare_heldout, to_device,
)
from theworld.training.loop import (RunContext, open_run, open_run_data, open_training_samples,
                                    resolve_mixed_precision, resume_state, run_steps, train, train_step)
from theworld.training.model import build_model, lora_config, world_projector_parameters
from theworld.training.reporting import (
    build_summary, peak_memory_mb, print_summary, reduce_sample_counts, write_json_atomic, write_loss_curve,
)
from theworld.training.sharding import SHARDED_LAYER_CLASSES, full_tensor, is_sharded, shard_model
from theworld.training.state import TrainState, build_train_state
from theworld.training.worker_session import ENDPOINT_FILE, WorkerSession, open_worker_session, safety_worker

__all__ = [
    "ARGUMENT_CLASSES", "CHECKPOINT_DIR", "ENDPOINT_FILE", "EVAL_BATCH_SIZE", "SHARDED_LAYER_CLASSES", "SYNTHETIC_TASKS",
    "TASK_FILE", "full_tensor", "is_sharded", "shard_model", "synthetic_task",
    "DataArguments", "ModelArguments", "TrainArguments", "build_model", "checkpoint_dirs", "collate_eval_batches",
    "evaluate", "evaluate_world_and_no_world", "heldout_loads", "is_saved_theworld", "load_checkpoint",
    "load_config_file", "lora_config", "open_datasets", "parse_args", "parse_report_to", "peak_memory_mb",
    "print_summary", "resolve_mixed_precision", "rng_state", "safety_worker", "save_checkpoint", "set_rng_state",
    "task_record", "to_device", "train", "training_stream", "world_projector_parameters", "write_json_atomic",
    "write_loss_curve", "HeldOutSet", "RunContext", "TrainState", "WorkerSession", "build_summary", "build_train_state",
    "check_heldout_samples", "open_run", "open_run_data", "open_training_samples", "resume_state", "run_steps", "open_worker_session", "prepare_heldout", "reduce_sample_counts", "train_step",
]
