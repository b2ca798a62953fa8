"""Train TheWorld on safety-checked data: ``python -m theworld.train [--config FILE] [--key value ...]``.

With no arguments this is the complete offline default: the project's tiny Gemma 3 and Cosmos
(built on first use under ``theworld.tiny.default_tiny_dir()``), the synthetic world task, and a
spawned safety worker running the tiny guardrail; a few hundred steps on a laptop CPU, then a summary.
Real models train with the same command: ``--gemma-model google/gemma-3-4b-it --cosmos-model
nvidia/Cosmos-Predict2-2B-Video2World --data my.jsonl``. Multi-GPU: ``accelerate launch -m
theworld.train ...`` (one safety worker per node: the local main process spawns it, the other local
ranks attach to it).

Every training sample goes through the safety worker (``theworld.data.safety_filter``) before the
model sees it; the worker is the only process that imports ``cosmos_guardrail``, so autograd stays
on here. The loop below is meant to be read top to bottom: build, check, step, evaluate, checkpoint.

Outputs in ``--output-dir``: ``summary.json``, ``metrics.jsonl``, ``loss_curve.png``,
``blocked.jsonl``, ``errors.jsonl``, ``tensorboard/``, ``checkpoints/step-NNNNNN/``, ``model/`` (the
trained model for ``TheWorld.from_pretrained``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import socket
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from theworld import assert_grad_enabled  # importing theworld installs the import guard first
from theworld.modeling.modeling_theworld import DEFAULT_LORA_TARGET_MODULES

CHECKPOINT_DIR = "checkpoints"
SYNTHETIC_TASKS = ("synthetic", "synthetic-arrow")
# Written next to the trained model: which data it was trained on, so evaluations rebuild the task.
TASK_FILE = "theworld_task.json"
ENDPOINT_FILE = ".safety-endpoint-{host}"


# ------------------------------------------------------------------------------------------ config


@dataclass
class ModelArguments:
    """Which models to train and which of their weights move."""

    gemma_model: Optional[str] = field(
        default=None,
        metadata={"help": "Gemma 3 model id or directory (e.g. google/gemma-3-4b-it), or the model/ folder of an "
                          "earlier run to continue training it (its world settings then apply). Default: the "
                          "project's tiny Gemma 3, built on first use in theworld.tiny.default_tiny_dir()."},
    )
    cosmos_model: Optional[str] = field(
        default=None,
        metadata={"help": "Cosmos-Predict2 Video2World repository id or directory (e.g. "
                          "nvidia/Cosmos-Predict2-2B-Video2World). Default: the project's tiny Cosmos."},
    )
    enable_world: bool = field(
        default=True,
        metadata={"help": "Insert Cosmos world tokens (true) or train the no-world Gemma baseline (false)."},
    )
    world_projection: str = field(
        default="spatial",
        metadata={"help": "How Cosmos latents become world tokens: 'spatial' (one token per latent patch) "
                          "or 'channel' (pooled).", "choices": ["spatial", "channel"]},
    )
    world_projector_type: str = field(
        default="mlp", metadata={"help": "World projector: 'mlp' (Linear-GELU-Linear) or 'linear'.", "choices": ["mlp", "linear"]}
    )
    world_tokens_per_side: Optional[int] = field(
        default=None,
        metadata={"help": "Average-pool each latent frame to this many positions per side before projecting "
                          "(default: every latent position becomes a token)."},
    )
    world_image_size: Optional[str] = field(
        default=None,
        metadata={"help": "'H,W' the world image is resized to for the Cosmos VAE, both multiples of 16 "
                          "(default: the Gemma vision tower's image size)."},
    )
    num_world_steps: int = field(
        default=0, metadata={"help": "Future latent frames rolled out by the Cosmos transformer and added as world tokens."}
    )
    freeze_gemma_language: bool = field(
        default=False,
        metadata={"help": "Freeze Gemma's language model (embeddings, decoder, LM head). The world projector "
                          "always trains. Freeze it for real Gemma checkpoints; the tiny default is random, so "
                          "its language model has to learn too."},
    )
    freeze_gemma_vision: bool = field(
        default=False,
        metadata={"help": "Freeze the SigLIP vision tower and Gemma's multimodal projector. Freeze them for real "
                          "Gemma checkpoints; the tiny default is random, so its image path has to learn too (frozen, "
                          "its random features hide a small object: the no-world baseline could not read the colour)."},
    )
    lora_r: int = field(
        default=0,
        metadata={"help": "Train LoRA adapters of this rank in Gemma's language model (peft) instead of its weights, "
                          "which are then frozen; 0: no adapters. SigLIP is never adapted; the world projector trains "
                          "fully. Adapters are saved with the model and restored by TheWorld.from_pretrained."},
    )
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator (the update is scaled by alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA adapters' input."})
    lora_target_modules: str = field(
        default=",".join(DEFAULT_LORA_TARGET_MODULES),
        metadata={"help": "Comma-separated module names of the language model to adapt (default: its attention and "
                          "MLP projections), or 'all-linear'."},
    )


@dataclass
class DataArguments:
    """Where samples come from. Every training and held-out sample passes the safety worker."""

    data: str = field(
        default="synthetic",
        metadata={"help": "Training data: 'synthetic' (the built-in motion task: clips of a moving square, asked "
                          "its direction or colour), 'synthetic-arrow' (the single-image arrow task), a .jsonl file "
                          "(image or clip frame paths, or a video path, + chat messages, see theworld.data.sources), "
                          "a glob of local parquet or webdataset .tar shards read as a stream (quote it; see "
                          "theworld.data.shards) or a directory written by datasets' save_to_disk."},
    )
    eval_data: Optional[str] = field(
        default=None,
        metadata={"help": "Held-out data in the same forms. Default: the synthetic task's held-out split when "
                          "data=synthetic, else the 'test' split of a save_to_disk DatasetDict."},
    )
    data_split: str = field(default="train", metadata={"help": "Split to train on when data is a DatasetDict."})
    data_columns: str = field(
        default="",
        metadata={"help": "Column mapping for save_to_disk and parquet data, e.g. "
                          "'images=image,question=prompt,answer=label' (roles: id, images, messages, question, answer)."},
    )
    max_bad_samples: str = field(
        default="1%",
        metadata={"help": "Stop once more samples than this could not be loaded (missing or undecodable files, "
                          "malformed samples; each is in errors.jsonl with kind 'data' and skipped): a count N or a "
                          "percentage P%% of the samples read (the first 10 bad samples are always allowed)."},
    )
    data_workers: int = field(
        default=2,
        metadata={"help": "Threads that read and decode samples ahead of the trainer (0: on the training thread)."},
    )
    data_prefetch: int = field(
        default=64, metadata={"help": "Samples read and decoded ahead of the trainer at most (per process)."}
    )
    synthetic_size: int = field(default=2048, metadata={"help": "Training samples in the synthetic task."})
    synthetic_eval_size: int = field(default=512, metadata={"help": "Held-out samples in the synthetic task."})
    synthetic_image_size: int = field(default=32, metadata={"help": "Side of the synthetic images in pixels."})
    synthetic_frames: int = field(
        default=9, metadata={"help": "Frames per clip of the motion task (1 + 4k: 9 frames are 3 Cosmos latent frames)."}
    )
    blocked_fraction: float = field(
        default=0.05,
        metadata={"help": "Fraction of synthetic training samples whose text carries the tiny guard's blocked "
                          "phrase (they must end up in blocked.jsonl, never in training)."},
    )
    eval_size: int = field(
        default=512,
        metadata={"help": "Evaluate on at most this many held-out samples (at least 512 for accuracies with useful "
                          "confidence intervals)."},
    )


@dataclass
class TrainArguments:
    """The loop, its outputs, and the safety worker it talks to."""

    output_dir: str = field(default="runs/theworld", metadata={"help": "Where every output of the run is written."})
    max_steps: int = field(default=200, metadata={"help": "Optimizer steps in the whole run (sets the LR schedule)."})
    stop_after_steps: Optional[int] = field(
        default=None,
        metadata={"help": "End this invocation after this many more optimizer steps (writing a checkpoint) without "
                          "changing the schedule: for time-sliced jobs; continue with --resume."},
    )
    batch_size: int = field(default=4, metadata={"help": "Samples per micro-batch per process."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Peak learning rate (AdamW)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    lr_scheduler_type: str = field(
        default="cosine", metadata={"help": "Any transformers.get_scheduler name (linear, cosine, constant, ...)."}
    )
    warmup_steps: int = field(default=20, metadata={"help": "Linear warm-up steps of the LR schedule."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the gradient norm to this (0: no clipping)."})
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute the Gemma language and SigLIP layers' activations in the backward pass instead of "
                          "keeping them (less memory, about a third more compute)."},
    )
    mixed_precision: str = field(
        default="auto",
        metadata={"help": "'auto' (bf16 on a GPU that has it, else fp32), 'no', 'bf16' or 'fp16'.",
                  "choices": ["auto", "no", "bf16", "fp16"]},
    )
    seed: int = field(default=0, metadata={"help": "Seed for model initialisation, data order and the synthetic task."})
    eval_every: int = field(default=50, metadata={"help": "Evaluate on held-out data every N steps (and at start and end)."})
    save_every: int = field(default=100, metadata={"help": "Write a checkpoint every N steps (and at the end)."})
    save_total_limit: int = field(default=2, metadata={"help": "Keep at most this many checkpoints."})
    log_every: int = field(default=10, metadata={"help": "Log to TensorBoard and the progress bar every N steps."})
    report_to: str = field(
        default="tensorboard",
        metadata={"help": "Experiment trackers accelerate logs to: one name or several, comma-separated (e.g. "
                          "'tensorboard,wandb'; any of accelerate's LoggerType values, or 'all'), or 'none'."},
    )
    resume: bool = field(
        default=False,
        metadata={"help": "Continue from the latest checkpoint in --output-dir (same losses as an uninterrupted run)."},
    )
    num_threads: Optional[int] = field(
        default=None,
        metadata={"help": "torch CPU threads of the trainer. Default: torch's choice, except when training on CPU "
                          "beside a spawned CPU worker: then trainer and worker get half of the cores each."},
    )
    latent_cache_mb: float = field(
        default=1024,
        metadata={"help": "Memory for the Cosmos latents of clips already encoded (a frozen VAE encodes a clip the "
                          "same way every time, so later epochs and evaluations reuse them); 0 turns it off."},
    )
    safety_endpoint: Optional[str] = field(
        default=None,
        metadata={"help": "Attach to this running safety worker (e.g. ipc:///run/safety/worker.sock or "
                          "tcp://host:5555) instead of spawning one."},
    )
    safety_preset: str = field(
        default="tiny", metadata={"help": "Guardrail preset of a spawned worker ('tiny' is built offline)."}
    )
    safety_device: str = field(default="cpu", metadata={"help": "Device of a spawned worker's guard models."})
    safety_window: int = field(
        default=32, metadata={"help": "Safety checks kept in flight ahead of the trainer (per process)."}
    )
    safety_timeout: float = field(default=120.0, metadata={"help": "Seconds to wait for one safety verdict."})
    safety_max_errors: int = field(
        default=50, metadata={"help": "Abort once more than this many samples failed their safety check."}
    )


ARGUMENT_CLASSES = (ModelArguments, DataArguments, TrainArguments)


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainArguments]:
    """Dataclasses from ``--config FILE`` (JSON or YAML, flat keys as in --help) overridden by the command line."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(ARGUMENT_CLASSES, description=__doc__.split("\n\n")[0],
                              epilog="Every key can also be set in the --config file (flat, with underscores).")
    parser.add_argument("--config", default=None, help="JSON or YAML file of keys; command-line flags override it.")
    argv = sys.argv[1:] if argv is None else list(argv)
    known, _ = parser.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**load_config_file(known.config))
    *arguments, _namespace = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    return tuple(arguments)


def load_config_file(path: str) -> dict:
    import yaml

    text = Path(path).read_text()
    values = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of keys to values, got {type(values).__name__}")
    known = {f.name for cls in ARGUMENT_CLASSES for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; see `python -m theworld.train --help` for the keys")
    return values


# ----------------------------------------------------------------------------------------- building


def build_model(model_args: ModelArguments, seed: int):
    """TheWorld with the requested parts frozen (the world projector always trains, Cosmos never does)."""
    from transformers import set_seed

    from theworld import TheWorld

    gemma, cosmos = model_args.gemma_model, model_args.cosmos_model
    if gemma is None or cosmos is None:
        from theworld.tiny import build_tiny_models, default_tiny_dir

        tiny_gemma, tiny_cosmos = build_tiny_models(default_tiny_dir())
        gemma, cosmos = gemma or str(tiny_gemma), cosmos or str(tiny_cosmos)
    set_seed(seed)  # the projector's initial weights are part of the run
    options = dict(enable_world=model_args.enable_world, world_projection=model_args.world_projection,
                   world_projector_type=model_args.world_projector_type, num_world_steps=model_args.num_world_steps,
                   freeze_gemma_language=model_args.freeze_gemma_language,
                   freeze_gemma_vision=model_args.freeze_gemma_vision)
    if model_args.world_tokens_per_side is not None:
        options["world_tokens_per_side"] = model_args.world_tokens_per_side
    if model_args.world_image_size:
        options["world_image_size"] = [int(v) for v in model_args.world_image_size.split(",")]
    if is_saved_theworld(gemma):
        # A TheWorld saved by an earlier run (its model/ folder) fixes its world settings; only freezing may change.
        model = TheWorld.from_pretrained(gemma, freeze_gemma_language=model_args.freeze_gemma_language,
                                         freeze_gemma_vision=model_args.freeze_gemma_vision)
    else:
        model = TheWorld.from_pretrained(gemma, cosmos_model=cosmos, **options)
    if model_args.lora_r > 0:
        if model.language_adapter_config is not None:
            if model.language_adapter_config.r != model_args.lora_r:
                raise ValueError(f"{gemma} already has LoRA adapters of rank {model.language_adapter_config.r}; they "
                                 f"keep training: drop --lora-r or pass --lora-r {model.language_adapter_config.r}")
        else:
            model.add_language_adapter(lora_config(model_args))
    return model


def lora_config(model_args: ModelArguments):
    """The peft `LoraConfig` of the --lora-* flags."""
    from peft import LoraConfig

    targets = [name.strip() for name in model_args.lora_target_modules.split(",") if name.strip()]
    if not targets:
        raise ValueError("--lora-target-modules is empty: name the language model's modules to adapt, e.g. "
                         f"{','.join(DEFAULT_LORA_TARGET_MODULES)}")
    return LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
                      target_modules="all-linear" if targets == ["all-linear"] else targets, bias="none")


def parse_report_to(value: str) -> list[str]:
    """Tracker names of --report-to (``[]`` for 'none'); an unknown or uninstalled tracker is an error now,
    not after the model is built."""
    import importlib.util

    from accelerate.utils import LoggerType

    names = [name.strip().lower() for name in value.split(",") if name.strip()]
    if not names or names == ["none"]:
        return []
    known = sorted(t.value for t in LoggerType)
    unknown = [name for name in names if name not in known]
    if unknown or "none" in names:
        raise ValueError(f"--report-to {value!r}: unknown tracker(s) {unknown or ['none']}; use 'none' alone, or "
                         f"one or more of {known}, comma-separated")
    # Each tracker's package has the tracker's name (accelerate imports it by that name).
    missing = [name for name in names if name != "all" and importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"--report-to: tracker(s) {missing} are not installed here (pip install {' '.join(missing)}), "
                         "or leave them out")
    return names


def is_saved_theworld(path: str) -> bool:
    config = Path(path) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "theworld"


def world_projector_parameters(model) -> dict[str, torch.Tensor]:
    return dict(model.world_projector.named_parameters()) if model.world_projector is not None else {}


def open_datasets(data_args: DataArguments, seed: int):
    """``(train, heldout)``: map-style datasets in the sample format, or ``ShardSource``s of shards.

    Raises ``DataError`` (one line, exit code 2 from ``main``) when the data cannot be opened at all."""
    from theworld.data.shards import ShardSource, is_shard_spec
    from theworld.data.sources import DataError, DiskDataset, JsonlDataset
    from theworld.data.synthetic import SyntheticMotionTask, SyntheticWorldTask

    def open_one(spec: str, split: str):
        if spec in SYNTHETIC_TASKS:
            size = data_args.synthetic_size if split == "train" else data_args.synthetic_eval_size
            fraction = data_args.blocked_fraction if split == "train" else 0.0
            if spec == "synthetic-arrow":
                return SyntheticWorldTask(split=split, size=size, seed=seed,
                                          image_size=data_args.synthetic_image_size, blocked_fraction=fraction)
            return SyntheticMotionTask(split=split, size=size, seed=seed, num_frames=data_args.synthetic_frames,
                                       image_size=data_args.synthetic_image_size, blocked_fraction=fraction)
        if spec.endswith(".jsonl"):
            return JsonlDataset(spec)
        if Path(spec).is_dir():
            return DiskDataset(spec, split=data_args.data_split if split == "train" else "test", columns=data_args.data_columns)
        if is_shard_spec(spec):
            return ShardSource(spec, columns=data_args.data_columns)
        if not Path(spec).exists():
            raise DataError(f"{spec}: no such file or directory")
        raise DataError(f"data {spec!r} is neither one of {SYNTHETIC_TASKS}, a .jsonl file, a glob of .parquet or .tar "
                        "shards nor a save_to_disk directory")

    train = open_one(data_args.data, "train")
    if data_args.eval_data is None and (data_args.data.endswith(".jsonl") or isinstance(train, ShardSource)):
        raise DataError(f"set --eval-data to held-out data: {data_args.data} has no held-out split")
    heldout = open_one(data_args.eval_data or data_args.data, "heldout")
    if data_args.eval_data is None and isinstance(heldout, DiskDataset) and heldout.split != "test":
        # A plain saved Dataset has no splits: evaluating on it would score the training rows.
        raise DataError(f"set --eval-data: {data_args.data} is not a DatasetDict with a 'test' split, so it has no "
                        "held-out rows of its own")
    return train, heldout


def training_stream(train_data, seed: int, rank: int, world_size: int):
    """This rank's endless reading order over the training data (``iter_loads_from(position)``)."""
    from theworld.data.shards import ShardSource, ShardStream
    from theworld.data.sources import SampleStream

    if isinstance(train_data, ShardSource):
        return ShardStream(train_data, seed=seed, rank=rank, world_size=world_size)
    return SampleStream(train_data, seed=seed, rank=rank, world_size=world_size)


def heldout_loads(heldout_data, size: int):
    """``(position, load)`` of the first ``size`` held-out samples, in file order (every rank the same)."""
    from itertools import islice

    from theworld.data.shards import ShardSource, ShardStream
    from theworld.data.sources import SampleStream

    if isinstance(heldout_data, ShardSource):
        return islice(ShardStream(heldout_data, shuffle=False, max_epochs=1).iter_loads_from(0), size)
    return islice(SampleStream(heldout_data, shuffle=False).iter_loads_from(0), min(len(heldout_data), size))


@contextmanager
def safety_worker(train_args: TrainArguments, accelerator, threads: int | None = None):
    """The endpoint of the safety worker this process talks to; spawned (and stopped) here unless attached.

    ``threads`` caps a spawned worker's CPU threads (OMP_NUM_THREADS), for a worker sharing the trainer's cores."""
    if train_args.safety_endpoint:
        yield train_args.safety_endpoint, None
        return
    from safety_worker import spawn_worker

    endpoint_file = Path(train_args.output_dir) / ENDPOINT_FILE.format(host=socket.gethostname())
    if accelerator.is_local_main_process:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
        with spawn_worker(preset=train_args.safety_preset, device=train_args.safety_device, env=env) as worker:
            endpoint_file.write_text(worker.endpoint)
            accelerator.wait_for_everyone()  # the other local ranks read the endpoint now
            try:
                yield worker.endpoint, worker
            finally:
                accelerator.wait_for_everyone()  # nobody still needs the worker
                endpoint_file.unlink(missing_ok=True)
    else:
        accelerator.wait_for_everyone()
        try:
            yield endpoint_file.read_text().strip(), None
        finally:
            accelerator.wait_for_everyone()


# --------------------------------------------------------------------------------------- evaluation


# Held-out batches are inference only: larger than training micro-batches, fewer passes.
EVAL_BATCH_SIZE = 32


def collate_eval_batches(model, samples: list[dict], batch_size: int, world: bool | None) -> list[dict]:
    """The held-out set, collated once for every evaluation of the run."""
    from theworld.data.collator import TheWorldCollator

    collate = TheWorldCollator(model, world=world)
    return [collate(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]


def task_record(data_args: DataArguments, seed: int) -> dict:
    """What a saved model was trained on, for `scripts/eval_world.py` to rebuild the held-out task."""
    record = {"data": data_args.data, "seed": seed}
    if data_args.data in SYNTHETIC_TASKS:
        record.update(image_size=data_args.synthetic_image_size, eval_size=data_args.synthetic_eval_size,
                      num_frames=data_args.synthetic_frames if data_args.data == "synthetic" else 1)
    return record


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, batches: list[dict], accelerator) -> dict:
    """Mean answer-token loss and answer accuracy (every answer token predicted right, teacher-forced)."""
    from theworld.evaluation import answer_scores

    was_training = model.training
    model.eval()
    total_loss = total_tokens = correct = count = 0.0
    for batch in batches:
        right, loss_sum, tokens = answer_scores(model, to_device(batch, accelerator.device), accelerator.autocast)
        total_loss += loss_sum.sum().item()
        total_tokens += tokens.sum().item()
        correct += right.sum().item()
        count += right.numel()
    model.train(was_training)
    return {"loss": total_loss / max(total_tokens, 1), "accuracy": correct / max(count, 1)}


def evaluate_world_and_no_world(model, batches, no_world_batches, accelerator) -> dict:
    """Held-out metrics with world tokens and, for a world model, the same model with them left out."""
    result = {f"eval_{k}": v for k, v in evaluate(model, batches, accelerator).items()}
    if no_world_batches is not None:
        result.update({f"eval_{k}_no_world": v for k, v in evaluate(model, no_world_batches, accelerator).items()})
    return result


# -------------------------------------------------------------------------------------- checkpoints


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    root = output_dir / CHECKPOINT_DIR
    return sorted(root.glob("step-*")) if root.exists() else []


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(accelerator, model, optimizer, scheduler, step: int, rank_state: dict, output_dir: Path, keep: int):
    """Write ``checkpoints/step-N`` atomically: everything goes into a temp dir that is renamed at the end,
    so a crash leaves either the old set of checkpoints or the new one, never half a checkpoint."""
    from safetensors.torch import save_file

    root = output_dir / CHECKPOINT_DIR
    final, tmp = root / f"step-{step:06d}", root / f".tmp-step-{step:06d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    rank = accelerator.process_index
    # Every rank saves its own RNG streams and data position (ranks read different samples).
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    (tmp / f"state_rank{rank}.json").write_text(json.dumps(rank_state))
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        save_file(unwrapped.trainable_state_dict(), tmp / "trainable.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoint_dirs(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, model, optimizer, scheduler, checkpoint: Path) -> dict:
    from safetensors.torch import load_file

    unwrapped = accelerator.unwrap_model(model)
    weights = load_file(checkpoint / "trainable.safetensors")
    missing = [n for n, p in unwrapped.named_parameters() if p.requires_grad and n not in weights]
    if missing:
        raise ValueError(f"{checkpoint} lacks trainable weights {missing[:5]}; was it written with other --freeze-* flags?")
    unwrapped.load_state_dict(weights, strict=False)
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=False))
    rank = accelerator.process_index
    set_rng_state(torch.load(checkpoint / f"rng_rank{rank}.pt", weights_only=False))
    return json.loads((checkpoint / f"state_rank{rank}.json").read_text())


# ------------------------------------------------------------------------------------------ outputs


def write_loss_curve(history: list[dict], evals: list[dict], path: Path):
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
    ax.set_ylabel("answer-token cross-entropy")
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


def write_json_atomic(path: Path, value):
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, default=str) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------- train


def resolve_mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def train(model_args: ModelArguments, data_args: DataArguments, train_args: TrainArguments, *,
          make_sample_filter=None) -> dict:
    """Run training and return the summary (also written to ``output_dir/summary.json``).

    ``make_sample_filter(client, stream, output_dir, state)`` replaces the live ``SafetyFilter`` (the
    benchmark uses it to compare against pre-checked data); by default every sample is checked live.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from safety_worker import SafetyClient
    from theworld.data.collator import TheWorldCollator
    from theworld.data.prefetch import Prefetcher
    from theworld.data.safety_filter import BadSampleLimit, SafetyFilter
    from theworld.data.sources import DataError
    from theworld.evaluation import evaluate_by_question
    from theworld.modeling.world_encoder import LatentCache

    assert_grad_enabled("training (at start)")
    report_to = parse_report_to(train_args.report_to)
    output_dir = Path(train_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(
        gradient_accumulation_steps=train_args.gradient_accumulation_steps,
        mixed_precision=resolve_mixed_precision(train_args.mixed_precision),
        log_with=report_to or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "tensorboard")),
    )
    rank, world_size = accelerator.process_index, accelerator.num_processes
    worker_threads = None
    if train_args.num_threads:
        torch.set_num_threads(train_args.num_threads)
    elif accelerator.device.type == "cpu" and not train_args.safety_endpoint and train_args.safety_device == "cpu":
        # Two CPU-bound processes on the same cores with a full thread pool each thrash; split the cores.
        worker_threads = max(1, (os.cpu_count() or 2) // 2)
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // (2 * accelerator.num_processes)))
    checkpoints = checkpoint_dirs(output_dir)
    if train_args.resume and not checkpoints:
        raise FileNotFoundError(f"--resume: no checkpoint in {output_dir / CHECKPOINT_DIR}; start without --resume")
    if not train_args.resume and checkpoints:
        raise FileExistsError(f"{output_dir} already holds checkpoints; pass --resume to continue or pick another --output-dir")
    # ---- data: opened (and its start-up errors raised) before anything slow is built
    try:
        max_bad_samples = BadSampleLimit.parse(data_args.max_bad_samples)
    except ValueError as e:
        raise DataError(str(e)) from None
    train_data, heldout_data = open_datasets(data_args, train_args.seed)
    stream = training_stream(train_data, train_args.seed, rank, world_size)

    # ---- model, optimizer, schedule
    model = build_model(model_args, train_args.seed)
    if train_args.gradient_checkpointing:
        # Non-reentrant: recomputation works when a layer's input needs no grad (frozen embeddings under LoRA).
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if model.world_encoder is not None and model.config.freeze_cosmos_vae and train_args.latent_cache_mb > 0:
        # A frozen VAE encodes a clip the same way every time: later epochs and evaluations reuse it.
        model.world_encoder.cache = LatentCache(max_bytes=int(train_args.latent_cache_mb * 2**20))
    collator = TheWorldCollator(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train_args.learning_rate, weight_decay=train_args.weight_decay)
    # accelerate steps a prepared scheduler once per process per optimizer step.
    scheduler = get_scheduler(train_args.lr_scheduler_type, optimizer, num_warmup_steps=train_args.warmup_steps * world_size,
                              num_training_steps=train_args.max_steps * world_size)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    projector_before = {n: p.detach().clone() for n, p in world_projector_parameters(accelerator.unwrap_model(model)).items()}

    ledger_suffix = "" if rank == 0 else f".rank{rank}"

    step, history, evals, filter_state = 0, [], [], None
    if train_args.resume:
        state = load_checkpoint(accelerator, model, optimizer, scheduler, checkpoints[-1])
        step, history, evals, filter_state = state["step"], state["history"], state["evals"], state["filter"]
        stream.load_state_dict(state.get("data"))
        accelerator.print(f"resumed from {checkpoints[-1]} at step {step}")

    with ExitStack() as stack:
        endpoint, spawned = stack.enter_context(safety_worker(train_args, accelerator, worker_threads))
        client = stack.enter_context(SafetyClient(endpoint, timeout=train_args.safety_timeout))
        worker_hello = client.hello()
        assert_grad_enabled("training (after connecting to the safety worker)")

        # ---- held-out set: checked once through the same worker, collated once
        heldout = Prefetcher(heldout_loads(heldout_data, data_args.eval_size), data_args.data_workers,
                             data_args.data_prefetch)
        eval_filter = SafetyFilter(client, heldout, window=train_args.safety_window, output_dir=output_dir,
                                   ledger_suffix=f".eval{ledger_suffix}", max_errors=train_args.safety_max_errors,
                                   result_timeout=train_args.safety_timeout, fresh_ledgers=True)
        eval_samples = [sample for _, sample in eval_filter]
        eval_filter.close()
        heldout.close()
        if not eval_samples:
            raise ValueError("no held-out sample passed the safety check; see eval blocked/errors ledgers in --output-dir")
        eval_batches = collate_eval_batches(accelerator.unwrap_model(model), eval_samples, EVAL_BATCH_SIZE, world=None)
        no_world_batches = None
        if accelerator.unwrap_model(model).config.enable_world:
            no_world_batches = collate_eval_batches(accelerator.unwrap_model(model), eval_samples, EVAL_BATCH_SIZE,
                                                    world=False)

        # Read and decoded ahead in threads, from where the samples taken so far end.
        reader = Prefetcher(stream.iter_loads_from(filter_state["next_position"] if filter_state else 0),
                            data_args.data_workers, data_args.data_prefetch)
        stack.callback(reader.close)
        if make_sample_filter is None:
            samples = SafetyFilter(client, reader, window=train_args.safety_window, output_dir=output_dir,
                                   ledger_suffix=ledger_suffix, max_errors=train_args.safety_max_errors,
                                   result_timeout=train_args.safety_timeout, state=filter_state,
                                   max_bad_samples=max_bad_samples)
        else:
            samples = make_sample_filter(client, reader, output_dir, filter_state)
        stack.callback(samples.close)

        if not train_args.resume:
            evals.append({"step": 0, **evaluate_world_and_no_world(model, eval_batches, no_world_batches, accelerator)})
        stop_at = train_args.max_steps
        if train_args.stop_after_steps is not None:
            stop_at = min(stop_at, step + train_args.stop_after_steps)
        if report_to:
            accelerator.init_trackers("theworld", config={k: v for a in (model_args, data_args, train_args)
                                                          for k, v in dataclasses.asdict(a).items() if v is not None})
        progress = tqdm(total=train_args.max_steps, initial=step, desc="train", disable=not accelerator.is_local_main_process)
        loop_seconds = other_seconds = 0.0
        wait_at_start, data_wait_at_start = samples.counts.wait_seconds, reader.wait_seconds
        model.train()
        started = time.perf_counter()
        checked_grad = False
        while step < stop_at:
            micro_losses = []
            for _ in range(train_args.gradient_accumulation_steps):
                batch = to_device(collator([next(samples)[1] for _ in range(train_args.batch_size)]), accelerator.device)
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        loss = model(**batch).loss
                    if not checked_grad:
                        assert_grad_enabled("the training step")
                        if not loss.requires_grad:
                            raise RuntimeError("the training loss does not require grad although autograd is on: no "
                                               "trainable parameter reaches the loss (is enable_world off with every "
                                               "Gemma part frozen? see --freeze-gemma-language)")
                        checked_grad = True
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and train_args.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, train_args.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                micro_losses.append(loss.detach().float().item())
            step += 1
            record = {"step": step, "loss": sum(micro_losses) / len(micro_losses), "lr": scheduler.get_last_lr()[0]}
            history.append(record)
            progress.update(1)
            if step % train_args.log_every == 0 or step == stop_at:
                progress.set_postfix(loss=f"{record['loss']:.4f}", blocked=samples.counts.blocked)
                if report_to:
                    accelerator.log({"train/loss": record["loss"], "train/lr": record["lr"]}, step=step)

            pause = time.perf_counter()
            if step % train_args.eval_every == 0 or step == train_args.max_steps:
                evals.append({"step": step, **evaluate_world_and_no_world(model, eval_batches, no_world_batches, accelerator)})
                if report_to:
                    accelerator.log({k.replace("eval_", "eval/"): v for k, v in evals[-1].items() if k != "step"}, step=step)
            if step % train_args.save_every == 0 or step == stop_at:
                save_checkpoint(accelerator, model, optimizer, scheduler, step,
                                {"step": step, "history": history, "evals": evals, "filter": samples.state_dict(),
                                 "data": stream.state_dict()},
                                output_dir, train_args.save_total_limit)
            other_seconds += time.perf_counter() - pause
        progress.close()
        loop_seconds = time.perf_counter() - started - other_seconds
        # The final held-out table: per question type, against the majority baseline, with ablations.
        eval_by_question = evaluate_by_question(accelerator.unwrap_model(model), eval_samples,
                                                batch_size=EVAL_BATCH_SIZE, seed=train_args.seed,
                                                autocast=accelerator.autocast)
        counts = samples.counts
        data_wait = reader.wait_seconds - data_wait_at_start
        stats = client.stats()

    # ---- summary (counters summed over ranks)
    totals = accelerator.reduce(torch.tensor([counts.seen, counts.passed, counts.blocked, counts.errors,
                                              counts.data_errors], dtype=torch.float64, device=accelerator.device),
                                "sum").tolist()
    seen, trained, blocked, errors, bad_samples = (int(x) for x in totals)
    projector_after = world_projector_parameters(accelerator.unwrap_model(model))
    wait = counts.wait_seconds - wait_at_start
    steps_run = step - (state["step"] if train_args.resume else 0)
    summary = {
        "steps": step,
        "max_steps": train_args.max_steps,
        "seen": seen,
        "trained": trained,
        "blocked": blocked,
        "errors": errors,
        "bad_samples": bad_samples,
        "accounting_holds": seen == trained + blocked + errors,
        "initial_eval_loss": evals[0]["eval_loss"],
        "final_eval_loss": evals[-1]["eval_loss"],
        "initial_eval_accuracy": evals[0]["eval_accuracy"],
        "final_eval_accuracy": evals[-1]["eval_accuracy"],
        "final_eval_loss_no_world": evals[-1].get("eval_loss_no_world"),
        "final_eval_accuracy_no_world": evals[-1].get("eval_accuracy_no_world"),
        "enable_world": accelerator.unwrap_model(model).config.enable_world,
        "eval_samples": len(eval_samples),
        "eval_by_question": eval_by_question,
        "train_seconds": loop_seconds,
        "steps_per_second": steps_run / loop_seconds if loop_seconds > 0 else None,
        "safety_wait_seconds": wait,
        "safety_wait_fraction": wait / loop_seconds if loop_seconds > 0 else None,
        "data_wait_seconds": data_wait,
        "data_wait_fraction": data_wait / loop_seconds if loop_seconds > 0 else None,
        "trainer_grad_enabled": torch.is_grad_enabled(),
        "projector_max_abs_change": max(((projector_after[n].detach() - projector_before[n]).abs().max().item()
                                         for n in projector_before), default=None),
        "trainable_parameters": sum(p.numel() for p in params),
        "safety_endpoint": endpoint,
        "safety_worker_spawned": spawned is not None,
        "worker": worker_hello,
        "worker_stats": stats,
        "mixed_precision": accelerator.mixed_precision,
        "num_processes": world_size,
        "lora_r": model_args.lora_r,
        "gradient_checkpointing": train_args.gradient_checkpointing,
        **peak_memory_mb(accelerator.device),
    }
    if accelerator.is_main_process:
        with open(output_dir / "metrics.jsonl", "w") as f:
            for record in sorted(history + evals, key=lambda r: (r["step"], "loss" not in r)):
                f.write(json.dumps(record) + "\n")
        write_loss_curve(history, evals, output_dir / "loss_curve.png")
        # Reloadable with TheWorld.from_pretrained(output_dir / "model"): config + trainable weights.
        accelerator.unwrap_model(model).save_pretrained(output_dir / "model")
        write_json_atomic(output_dir / "model" / TASK_FILE, task_record(data_args, train_args.seed))
        write_json_atomic(output_dir / "summary.json", summary)
    accelerator.wait_for_everyone()
    # Last: end_training finishes the trackers and destroys the process group, so every collective
    # (the reduce above, the barriers) must come before it.
    accelerator.end_training()
    return summary


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


def main(argv: list[str] | None = None) -> int:
    """Console entry point (``theworld-train``)."""
    from theworld.data.safety_filter import TooManyBadSamples
    from theworld.data.sources import DataError

    model_args, data_args, train_args = parse_args(argv)
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
