"""The command line of `python -m theworld.train`: three dataclasses of flags, a --config file, trackers."""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from theworld.modeling.modeling_theworld import DEFAULT_LORA_TARGET_MODULES

DESCRIPTION = "Train TheWorld on safety-checked data: ``python -m theworld.train [--config FILE] [--key value ...]``."


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
    world_projection: Optional[str] = field(
        default=None,
        metadata={"help": "How Cosmos latents become world tokens: 'spatial' (one token per latent patch), 'channel' "
                          "(one per latent channel) or 'frame' (--world-frame-tokens per latent frame, each reading "
                          "the whole frame and its change since the previous one). Default: 'frame' on the "
                          "project's tiny models (the motion task is learnt in minutes; see docs/model.md), "
                          "'spatial' on real checkpoints.", "choices": ["spatial", "channel", "frame"]},
    )
    world_frame_tokens: int = field(
        default=4, metadata={"help": "World tokens per latent frame of the 'frame' projection (4: the motion task "
                                     "was learnt by more seeds than with 16; see docs/model.md)."}
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
    world_rollout_steps: Optional[int] = field(
        default=None,
        metadata={"help": "Sampling steps of the world rollout when --num-world-steps > 0 (default: the pipeline's "
                          "35). The rollout is the Video2World pipeline's loop, whose last step moves nothing: N "
                          "steps make N - 1 moves, so N must be at least 2."},
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
                          "its direction or colour, see --question-types), 'synthetic-arrow' (the single-image arrow task), a .jsonl file "
                          "(image or clip frame paths, or a video path, + chat messages, see theworld.data.sources), "
                          "a glob of local parquet or webdataset .tar shards read as a stream (quote it; see "
                          "theworld.data.shards), a directory written by datasets' save_to_disk, or a folder written "
                          "by `python -m safety_worker curate` (its samples were checked there: not checked again)."},
    )
    eval_data: Optional[str] = field(
        default=None,
        metadata={"help": "Held-out data in the same forms. Default: the synthetic task's held-out split when "
                          "data=synthetic, else the 'test' split of a save_to_disk DatasetDict."},
    )
    data_split: str = field(default="train", metadata={"help": "Split to train on when data is a DatasetDict."})
    accept_curated_identity: bool = field(
        default=False,
        metadata={"help": "Train on a curate output (data or eval_data holding manifest.json) even though its "
                          "manifest names another checker than the safety worker's (models, policy or versions "
                          "differ); by default that is a start-up error. Its samples are not checked again."},
    )
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
    synthetic_oracle_frames: int = field(
        default=0,
        metadata={"help": "Append the true next N frames (the motion continued) to every motion-task clip, questions "
                          "and answers unchanged: the oracle arm of scripts/eval_imagination.py (its world tokens see "
                          "the future that a rollout predicts; Gemma still sees the last observed frame). 4 frames are "
                          "one Cosmos latent frame. Default 0: the observed clip only."},
    )
    question_types: Optional[str] = field(
        default=None,
        metadata={"help": "Question kinds of the synthetic task, comma-separated (e.g. direction,colour,future). "
                          "'synthetic': any of direction, colour and future (the forecast: where the square will "
                          "be 4 frames after the last one, a half-cell grid point such as C5; docs/imagination.md); default "
                          "direction,colour. 'synthetic-arrow': any of colour, position, direction; default all "
                          "three. The training split asks direction and future three times as often as colour, "
                          "the held-out split each kind equally often."},
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
    max_steps: int = field(default=1200, metadata={"help": "Optimizer steps in the whole run (sets the LR schedule)."})
    stop_after_steps: Optional[int] = field(
        default=None,
        metadata={"help": "End this invocation after this many more optimizer steps (writing a checkpoint) without "
                          "changing the schedule: for time-sliced jobs; continue with --resume."},
    )
    batch_size: int = field(default=16, metadata={"help": "Samples per micro-batch per process."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float = field(default=3e-3, metadata={"help": "Peak learning rate (AdamW)."})
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
    fsdp: bool = field(
        default=False,
        metadata={"help": "Shard parameters, gradients and optimizer state across the launched processes with "
                          "PyTorch FSDP2 (each Gemma decoder layer and SigLIP encoder layer, then the rest), on CPU "
                          "or GPU. Needs torchrun or accelerate launch. Implied by an accelerate config with "
                          "distributed_type FSDP (configs/accelerate_fsdp_4b.yaml)."},
    )
    mixed_precision: str = field(
        default="auto",
        metadata={"help": "'auto' (bf16 on a GPU that has it, else fp32), 'no', 'bf16' or 'fp16'.",
                  "choices": ["auto", "no", "bf16", "fp16"]},
    )
    seed: int = field(default=0, metadata={"help": "Seed for model initialisation, data order and the synthetic task."})
    eval_every: int = field(default=200, metadata={"help": "Evaluate on held-out data every N steps (and at start and end)."})
    save_every: int = field(default=200, metadata={"help": "Write a checkpoint every N steps (and at the end)."})
    save_total_limit: int = field(default=2, metadata={"help": "Keep at most this many checkpoints."})
    log_every: int = field(default=10, metadata={"help": "Log to TensorBoard and the progress bar every N steps."})
    report_to: str = field(
        default="tensorboard",
        metadata={"help": "Experiment trackers accelerate logs to: one name or several, comma-separated (e.g. "
                          "'tensorboard,wandb'; any of accelerate's LoggerType values, or 'all'), or 'none'."},
    )
    heldout_examples: int = field(
        default=4,
        metadata={"help": "Held-out samples shown in TensorBoard at each evaluation (frames, the model's answer, the "
                          "reference); 0: none. Needs the tensorboard tracker."},
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
    rollout_cache_mb: float = field(
        default=256,
        metadata={"help": "Memory for the world rollouts of clips already rolled out (--num-world-steps > 0): a frozen "
                          "Cosmos transformer with noise seeded per clip rolls a clip out the same way every time, so "
                          "later epochs and evaluations reuse it (keyed on the clip's latents, the world model and the "
                          "sampling settings, seed included). 0 turns it off: "
                          "every batch is then rolled out with one seeded noise draw."},
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
    safety_verdict_store: Optional[str] = field(
        default=None,
        metadata={"help": "The spawned worker answers checks from this shared verdict store (SQLite, created 0600) "
                          "and stores what it checks (`serve --verdict-store`): a later run on the same data, or a "
                          "curate job's store, checks nothing again (docs/scale.md). For an attached worker "
                          "(--safety-endpoint) serve it with --verdict-store instead."},
    )
    safety_window: int = field(
        default=64, metadata={"help": "Safety checks kept in flight ahead of the trainer (per process): four "
                                      "default batches, so the worker batches the next ones while a step runs. "
                                      "At most the process's share of the worker's queue (64 by default, shared "
                                      "by the node's processes): more would be answered busy."}
    )
    safety_timeout: float = field(default=120.0, metadata={"help": "Seconds to wait for one safety verdict."})
    safety_max_errors: int = field(
        default=50, metadata={"help": "Abort once more than this many samples failed their safety check."}
    )
    safety_cache_mb: float = field(
        default=512,
        metadata={"help": "Memory for the verdicts and sanitized frames of training samples already checked in this "
                          "run: a later epoch reuses them instead of sending the same content again (the checker is "
                          "deterministic; fault verdicts are never reused); 0 checks every read."},
    )


ARGUMENT_CLASSES = (ModelArguments, DataArguments, TrainArguments)


def parse_args(argv: list[str] | None = None, classes: tuple = ARGUMENT_CLASSES, description: str = DESCRIPTION,
               command: str = "theworld.train") -> tuple:
    """Dataclasses from ``--config FILE`` (JSON or YAML, flat keys as in --help) overridden by the command line.

    ``classes``, ``description`` and ``command`` are the command's (``theworld.train_world`` passes its own)."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(classes, description=description,
                              epilog="Every key can also be set in the --config file (flat, with underscores).")
    parser.add_argument("--config", default=None, help="JSON or YAML file of keys; command-line flags override it.")
    argv = sys.argv[1:] if argv is None else list(argv)
    known, _ = parser.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**load_config_file(known.config, classes, command))
    *arguments, _namespace = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    return tuple(arguments)


def load_config_file(path: str, classes: tuple = ARGUMENT_CLASSES, command: str = "theworld.train") -> dict:
    import yaml

    text = Path(path).read_text()
    values = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of keys to values, got {type(values).__name__}")
    known = {f.name for cls in classes for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; see `python -m {command} --help` for the keys")
    return values


def parse_world_image_size(value: str) -> list[int]:
    """``--world-image-size 'H,W'`` -> ``[H, W]``, checked now (before anything slow is built) by the
    configuration's rule (``check_world_image_size``)."""
    from theworld.configuration_theworld import check_world_image_size

    try:
        return check_world_image_size(value.split(","))
    except ValueError:
        raise ValueError(f"--world-image-size must be 'H,W', both positive multiples of 16 (e.g. 480,640), "
                         f"got {value!r}") from None


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
