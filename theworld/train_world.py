"""Post-train the Cosmos world model on safety-checked clips: ``python -m theworld.train_world [--config FILE] [--key value ...]``.

The real ``diffusers.CosmosTransformer3DModel`` learns to predict clips Video2World style (the first
``--condition-frames`` latent frames given clean with the condition-mask channel, the rest denoised; the
VAE frozen), with Cosmos-Predict2's rectified-flow objective (``theworld.training.world_model`` states the
parameterisation and weighting, with the source). With no arguments: the project's tiny Cosmos (its VAE trained
as an autoencoder: ``python -m theworld.tiny``) on the motion task's clips, offline. Real models: ``--cosmos-model nvidia/Cosmos-Predict2-2B-Video2World
--lora-r 16 --data my.jsonl --eval-data heldout.jsonl``. Multi-GPU: ``accelerate launch -m theworld.train_world``.

Every training clip goes through the safety worker first, exactly as in ``python -m theworld.train``
(spawned, or ``--safety-endpoint``; blocked clips in ``blocked.jsonl``, bad samples in ``errors.jsonl``,
``seen = trained + blocked + errors`` in ``summary.json``); the run context, worker session, held-out check,
train state, optimizer step and checkpoints are the trainer's own (``theworld.training``). This process
never imports the guard and asserts autograd on at every step.

On a tiny build (the default) the transformer trained is a new, larger one (``--transformer-shape``) on
latents standardised per element (``--standardize-latents``; the statistics are saved beside its weights in
``model/transformer/theworld_latent_statistics.safetensors`` and every theworld loader uses them).

Outputs in ``--output-dir``: ``model/`` (a complete Cosmos directory in the diffusers layout, usable as
``--cosmos-model`` by ``theworld.train``, ``theworld.generate`` and ``theworld.serve``, plus
``theworld_task.json``), ``summary.json`` (with ``rollout_eval``: the counterfactual rollout evaluation
of ``theworld.evaluation_world`` at 1, 4 and 35 sampling steps, on the synthetic motion task),
``metrics.jsonl``, ``loss_curve.png``, ``blocked.jsonl``, ``errors.jsonl``, ``tensorboard/``,
``checkpoints/step-NNNNNN/``.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from theworld import assert_grad_enabled  # importing theworld installs the import guard first
from theworld.training.arguments import DataArguments, TrainArguments, parse_args
from theworld.training.world_model import DEFAULT_TRANSFORMER_LORA_TARGETS, LOSS_WEIGHTINGS

DESCRIPTION = __doc__.split("\n\n")[0]
# The transformer `--transformer-shape auto` trains for a tiny build (width x blocks x patch): the tiny build's own
# (32x2x2) cannot carry a patch's 64 latent values through its 32-wide stream; docs/world_model.md has the table.
TINY_WORLD_TRANSFORMER_SHAPE = "128x2x1"


@dataclass
class WorldModelArguments:
    """Which Cosmos model to post-train, how, and how much of it moves."""

    cosmos_model: Optional[str] = field(
        default=None,
        metadata={"help": "Cosmos-Predict2 Video2World repository id or directory (e.g. "
                          "nvidia/Cosmos-Predict2-2B-Video2World), or the model/ of an earlier train_world run. "
                          "Default: the project's tiny Cosmos (python -m theworld.tiny; its VAE trained as an "
                          "autoencoder, its transformer random and replaced, see --transformer-shape)."},
    )
    condition_frames: int = field(
        default=2,
        metadata={"help": "Latent frames given clean (Video2World's conditioning); the clip's later latent frames "
                          "are predicted. 2 on the default 9-frame clips: 5 observed frames, 4 predicted. A world model rolls "
                          "out well only from as many latent frames as it was trained on: for TheWorld's "
                          "num_world_steps = 1 on 9-frame clips (3 latent frames) train with --synthetic-frames 13 "
                          "--condition-frames 3 (docs/imagination.md)."},
    )
    loss_weighting: str = field(
        default="rectified-flow",
        metadata={"help": "'rectified-flow': x0 MSE weighted by (1+sigma)^2/sigma^2, Cosmos-Predict2's (the velocity "
                          "MSE); 'x0': unweighted x0 MSE.", "choices": list(LOSS_WEIGHTINGS)},
    )
    sigma_mean: float = field(default=0.0, metadata={"help": "Mean of ln(sigma) of the training noise (log-normal)."})
    sigma_std: float = field(default=1.0, metadata={"help": "Standard deviation of ln(sigma) of the training noise."})
    sigma_frame_scaling: bool = field(
        default=True, metadata={"help": "Multiply sigma by sqrt(latent frames), as Cosmos-Predict2 does for video."}
    )
    lora_r: int = field(
        default=0,
        metadata={"help": "Train LoRA adapters of this rank in the transformer (peft) instead of its weights, which "
                          "are then frozen; 0: train every weight. The saved model/ has them merged."},
    )
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator (the update is scaled by alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA adapters' input."})
    lora_target_modules: str = field(
        default=",".join(DEFAULT_TRANSFORMER_LORA_TARGETS),
        metadata={"help": "Comma-separated module names of the transformer to adapt (default: its attention "
                          "projections), or 'all-linear'."},
    )
    transformer_shape: str = field(
        default="auto",
        metadata={"help": "'WIDTHxLAYERSxPATCH' (e.g. 64x2x1): train a new, randomly initialised transformer of that "
                          "hidden width (heads of the source's head size), number of blocks and spatial patch size, "
                          "built from --cosmos-model's transformer config, instead of its weights; 'keep': train "
                          "--cosmos-model's own transformer; 'auto' (default): " + TINY_WORLD_TRANSFORMER_SHAPE
                          + " for a tiny build (python -m theworld.tiny, whose 32x2x2 transformer is random and too "
                          "small to predict), else 'keep' (also with --lora-r)."},
    )
    standardize_latents: str = field(
        default="auto",
        metadata={"help": "Train the transformer on latents standardised per element (channel, latent frame, cell) "
                          "with statistics of the first --latent-statistics-clips training clips, saved with it "
                          "(transformer/theworld_latent_statistics.safetensors; every theworld consumer of the model "
                          "uses them). 'auto': on for a new transformer (--transformer-shape), and a kept transformer "
                          "that has statistics keeps them; 'true' / 'false'.", "choices": ["auto", "true", "false"]},
    )
    latent_statistics_clips: int = field(
        default=1024,
        metadata={"help": "Training clips the latent statistics are measured on (the first ones; then fixed)."},
    )
    rollout_eval_steps: str = field(
        default="1,4,35",
        metadata={"help": "Sampling-step counts of the final counterfactual rollout evaluation (synthetic motion "
                          "task only); empty: none."},
    )
    rollout_eval_size: int = field(default=256, metadata={"help": "Held-out clips of the rollout evaluation."})
    world_image_size: Optional[str] = field(
        default=None,
        metadata={"help": "'H,W' every clip (training, held-out and the rollout evaluation's) is resized to for the "
                          "Cosmos VAE, both multiples of 16, as theworld.train's --world-image-size (e.g. 480,640, the "
                          "real model's resolution; after the safety check, which sees the clips as they are). "
                          "Default: the clips' own size."},
    )


@dataclass
class WorldDataArguments(DataArguments):
    eval_size: int = field(
        default=64, metadata={"help": "Held-out clips (checked by the worker once) whose denoising loss is evaluated."}
    )
    question_types: Optional[str] = field(
        default=None, metadata={"help": "Not used by train_world (it trains on the clips; their questions are ignored)."}
    )


@dataclass
class WorldTrainArguments(TrainArguments):
    output_dir: str = field(default="runs/world_model", metadata={"help": "Where every output of the run is written."})
    max_steps: int = field(default=3000, metadata={"help": "Optimizer steps in the whole run (sets the LR schedule)."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Peak learning rate (AdamW)."})
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute the transformer blocks' activations in the backward pass instead of keeping "
                          "them (diffusers' enable_gradient_checkpointing: less memory, more compute)."},
    )
    fsdp: bool = field(default=False, metadata={"help": "Not supported by train_world (an error): use --lora-r, "
                                                        "with DDP across processes."})
    heldout_examples: int = field(default=0, metadata={"help": "Not used by train_world (it has no answers to show)."})
    rollout_cache_mb: float = field(default=0, metadata={"help": "Not used by train_world (it trains the transformer "
                                                                 "whose rollouts theworld.train caches)."})


ARGUMENT_CLASSES = (WorldModelArguments, WorldDataArguments, WorldTrainArguments)


def _is_tiny_build(cosmos: str) -> bool:
    """Whether `cosmos` is a tiny Cosmos directory written by `python -m theworld.tiny` (trained or random VAE;
    its transformer is random). Its completion marker reads "VERSION seed=N [VARIANT]"; a `--real-shapes` build
    (variant "real-shapes ...") stands for the real model and keeps its transformer."""
    from theworld.tiny import _COMPLETE_MARKER, RANDOM_VAE_VARIANT

    marker = Path(cosmos) / _COMPLETE_MARKER
    if not marker.is_file():
        return False
    variant = marker.read_text().split()[2:]
    # "trained-vae": format 4's opt-in trained build, still on disk in older runs.
    return variant in ([], [RANDOM_VAE_VARIANT], ["trained-vae"])


def parse_transformer_shape(shape: str) -> tuple[int, int, int]:
    """'WIDTHxLAYERSxPATCH' -> (width, layers, patch)."""
    try:
        width, layers, patch = (int(part) for part in shape.lower().split("x"))
    except ValueError:
        raise ValueError(f"--transformer-shape must be 'auto', 'keep' or WIDTHxLAYERSxPATCH (e.g. "
                         f"{TINY_WORLD_TRANSFORMER_SHAPE}), got {shape!r}") from None
    if min(width, layers, patch) < 1:
        raise ValueError(f"--transformer-shape {shape}: width, layers and patch must be positive")
    return width, layers, patch


def new_transformer(cosmos: str, shape: str):
    """A randomly initialised `CosmosTransformer3DModel` of `shape` with `cosmos`'s transformer config otherwise
    (channels, text width, positional settings)."""
    from diffusers import CosmosTransformer3DModel

    width, layers, patch = parse_transformer_shape(shape)
    config = dict(CosmosTransformer3DModel.load_config(cosmos, subfolder="transformer"))
    head_dim = config["attention_head_dim"]
    if width % head_dim:
        raise ValueError(f"--transformer-shape {shape}: the width must be a multiple of the source transformer's "
                         f"head size, {head_dim}")
    config.update(num_attention_heads=width // head_dim, num_layers=layers, patch_size=(1, patch, patch))
    return CosmosTransformer3DModel.from_config(config)


def build_trainee(model_args: WorldModelArguments, seed: int, clip_shape: tuple[int, tuple[int, int]] | None = None):
    """`(trainee, cosmos_dir)`: the transformer (new, loaded, or with LoRA adapters), the frozen VAE and the
    latent statistics it trains in. `clip_shape` `(frames, (H, W))`: the shape of the clips the VAE encodes,
    which the statistics need (known for the synthetic tasks: `synthetic_clip_shape`)."""
    from diffusers import CosmosTransformer3DModel
    from transformers import set_seed

    from theworld.configuration_theworld import latent_frames
    from theworld.modeling.latent_statistics import WorldLatentStatistics
    from theworld.modeling.world_encoder import CosmosWorldEncoder
    from theworld.tiny import build_tiny_models, default_tiny_dir
    from theworld.training.world_model import VideoToWorldTrainee

    cosmos = model_args.cosmos_model or str(build_tiny_models(default_tiny_dir())[1])
    shape = model_args.transformer_shape
    if shape == "auto":
        shape = TINY_WORLD_TRANSFORMER_SHAPE if _is_tiny_build(cosmos) and model_args.lora_r == 0 else "keep"
    set_seed(seed)
    saved_statistics = None
    if shape == "keep":
        transformer = CosmosTransformer3DModel.from_pretrained(cosmos, subfolder="transformer")
        saved_statistics = WorldLatentStatistics.load(cosmos)
    else:
        transformer = new_transformer(cosmos, shape)
    standardize = model_args.standardize_latents
    if saved_statistics is not None and standardize == "false":
        raise ValueError(f"{cosmos}'s transformer was trained on standardised latents (its transformer/ holds "
                         "latent statistics): it cannot continue without them; drop --standardize-latents false")
    measure_statistics = saved_statistics is None and (standardize == "true"
                                                       or (standardize == "auto" and shape != "keep"))
    if measure_statistics and clip_shape is None:
        raise ValueError("--standardize-latents needs clips of one known shape (the synthetic tasks'); pass "
                         "--standardize-latents false for this data")
    if model_args.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        targets = [t.strip() for t in model_args.lora_target_modules.split(",") if t.strip()]
        if not targets:
            raise ValueError("--lora-target-modules is empty: name the transformer's modules to adapt, e.g. "
                             + ",".join(DEFAULT_TRANSFORMER_LORA_TARGETS))
        transformer = get_peft_model(transformer, LoraConfig(
            r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
            target_modules="all-linear" if targets == ["all-linear"] else targets, bias="none"))
    encoder = CosmosWorldEncoder.from_pretrained(cosmos).eval()
    statistics = saved_statistics  # fixed when loaded: they define the space the loaded weights denoise in
    if measure_statistics:
        height, width = (side // encoder.spatial_factor for side in clip_shape[1])
        statistics = WorldLatentStatistics(encoder.latent_channels, latent_frames(clip_shape[0]), (height, width),
                                           max_clips=model_args.latent_statistics_clips)
    trainee = VideoToWorldTrainee(transformer, encoder, model_args.condition_frames, model_args.loss_weighting,
                                  model_args.sigma_mean, model_args.sigma_std, model_args.sigma_frame_scaling,
                                  statistics)
    return trainee, cosmos


def synthetic_clip_shape(data_args, image_size: tuple[int, int] | None = None) -> tuple[int, tuple[int, int]] | None:
    """`(frames, (H, W))` of the clips the VAE encodes when the data fixes it (the synthetic motion task): its
    square side, or `image_size` when `--world-image-size` resizes them; else None."""
    if data_args.data != "synthetic":
        return None
    side = data_args.synthetic_image_size
    return data_args.synthetic_frames, image_size or (side, side)


def collate_clips(samples: list[dict], image_size: tuple[int, int] | None = None) -> dict:
    """Checked samples -> the trainee's input (their sanitised frames, oldest first, resized to `image_size`
    `(H, W)` when given, as theworld.train's processor resizes for the VAE; else at their own size)."""
    from theworld.video_processing_theworld import preprocess_world_clips

    if image_size is not None:
        height, width = image_size
    else:
        first = samples[0]["images"][0]
        height, width = first.shape[:2] if hasattr(first, "shape") else first.size[::-1]
        if height % 16 or width % 16:
            raise ValueError(f"clip frames are {height}x{width}; the Cosmos VAE needs sides divisible by 16: resize "
                             "them with --world-image-size H,W or resize the data (e.g. --synthetic-image-size 32)")
    pixels, num_frames = preprocess_world_clips([s["images"] for s in samples], height, width)
    return {"world_pixel_values": pixels, "num_frames": num_frames}


def heldout_batches(samples: list[dict], trainee, batch_size: int, seed: int,
                    image_size: tuple[int, int] | None = None) -> list[dict]:
    """The held-out clips collated once, each with fixed noise and sigmas: every evaluation scores the same
    noisy inputs, so the held-out loss moves only with the model."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for start in range(0, len(samples), batch_size):
        batch = collate_clips(samples[start : start + batch_size], image_size)
        latents = trainee.encode(**batch)
        batch["sigma"] = trainee.sample_sigma(latents.shape[0], latents.shape[2], generator=generator)
        batch["noise"] = torch.randn(latents.shape, generator=generator)
        batches.append(batch)
    return batches


@torch.no_grad()
def heldout_loss(model, batches: list[dict], accelerator) -> float:
    from theworld.training.heldout import to_device

    model = accelerator.unwrap_model(model)
    was_training = model.training
    model.eval()
    losses = [model(**to_device(batch, accelerator.device)).loss.item() for batch in batches]
    model.train(was_training)
    return sum(losses) / max(len(losses), 1)


def train_world(model_args: WorldModelArguments, data_args: WorldDataArguments, train_args: WorldTrainArguments) -> dict:
    """Run world-model post-training and return the summary (also written to ``output_dir/summary.json``)."""
    from theworld.evaluation_world import evaluate_world_model
    from theworld.modeling.world_encoder import LatentCache
    from theworld.training.data import TASK_FILE, task_record
    from theworld.training.heldout import check_heldout_samples
    from theworld.training.loop import open_run, open_run_data, open_training_samples, resume_state, run_steps
    from theworld.training.arguments import parse_world_image_size
    from theworld.training.reporting import (peak_memory_mb, reduce_sample_counts, sample_accounting,
                                             worker_and_run_fields, write_json_atomic, write_loss_curve)
    from theworld.training.state import build_train_state
    from theworld.training.worker_session import open_worker_session
    from theworld.training.world_model import save_world_model

    assert_grad_enabled("world-model training (at start)")
    if train_args.fsdp:
        raise ValueError("--fsdp is not supported by theworld.train_world: shard with --lora-r and DDP "
                         "(accelerate launch -m theworld.train_world) instead")
    # The resize step: every clip reaches the VAE at this size (None: its own), checked before anything is built.
    image_size = parse_world_image_size(model_args.world_image_size) if model_args.world_image_size else None
    run = open_run(train_args)
    accelerator, output_dir = run.accelerator, run.output_dir
    max_bad_samples, train_data, heldout_data, stream = open_run_data(run, data_args, train_args)

    trainee, cosmos = build_trainee(model_args, train_args.seed, synthetic_clip_shape(data_args, image_size))
    if train_args.gradient_checkpointing:
        trainee.transformer.enable_gradient_checkpointing()
    if train_args.latent_cache_mb > 0:  # the VAE is frozen: a clip seen again is not encoded again
        trainee.encoder.cache = LatentCache(max_bytes=int(train_args.latent_cache_mb * 2**20))
    state = build_train_state(trainee, train_args, accelerator, fsdp=False)
    unwrapped = accelerator.unwrap_model(state.model)
    ledger_suffix = "" if run.rank == 0 else f".rank{run.rank}"
    metrics = resume_state(state, stream, run, train_args)

    with ExitStack() as stack:
        worker = open_worker_session(stack, train_args, accelerator, run.worker_threads, run.local)
        assert_grad_enabled("world-model training (after connecting to the safety worker)")
        # Held-out clips: checked once through the same worker; every rank scores all of them (few, tiny).
        eval_samples = check_heldout_samples(heldout_data, worker, data_args, train_args, ledger_suffix)
        if not eval_samples:
            raise ValueError("no held-out clip passed the safety check; see the .eval ledgers in --output-dir")
        heldout = heldout_batches(eval_samples, unwrapped, train_args.batch_size, train_args.seed, image_size)

        _, samples = open_training_samples(stack, run, state, stream, worker, data_args, train_args, ledger_suffix,
                                           max_bad_samples)
        run.start_trackers(model_args, data_args, train_args)

        def next_batch() -> dict:
            return collate_clips([next(samples)[1] for _ in range(train_args.batch_size)], image_size)

        def evaluate(at_step: int) -> None:
            state.evals.append({"step": at_step, "eval_loss": heldout_loss(state.model, heldout, accelerator)})
            metrics.append(state.evals[-1])
            if run.report_to:
                accelerator.log({"eval/loss": state.evals[-1]["eval_loss"]}, step=at_step)

        if not train_args.resume:
            evaluate(0)
        loop_seconds, wait_at_start = run_steps(state, next_batch, samples, stream, evaluate, run, train_args, metrics,
                                                "train_world")
        counts = samples.counts
        stats = worker.client.stats()

    task = task_record(data_args, train_args.seed)
    if image_size is not None:  # the rollout evaluation (here and scripts/eval_world_model.py) encodes at it too
        task["world_image_size"] = image_size
    steps = tuple(int(s) for s in model_args.rollout_eval_steps.split(",") if s.strip())
    rollout = {"rollout_eval": None, "rollout_eval_baselines": None}
    eval_seconds = None
    if accelerator.is_main_process and steps and task["data"] == "synthetic":
        eval_started = time.perf_counter()
        rollout = evaluate_world_model(unwrapped.transformer, unwrapped.encoder, task,
                                       eval_size=model_args.rollout_eval_size, steps=steps,
                                       statistics=unwrapped.statistics)
        eval_seconds = time.perf_counter() - eval_started
    steps_run = state.step - state.resumed_from
    summary = {
        "steps": state.step,
        "max_steps": train_args.max_steps,
        **sample_accounting(reduce_sample_counts(accelerator, counts)),
        "initial_eval_loss": state.evals[0]["eval_loss"],
        "final_eval_loss": state.evals[-1]["eval_loss"],
        **rollout,
        "rollout_eval_seconds": eval_seconds,
        "train_seconds": loop_seconds,
        "steps_per_second": steps_run / loop_seconds if loop_seconds > 0 else None,
        "safety_wait_seconds": counts.wait_seconds - wait_at_start,
        "grad_enabled": torch.is_grad_enabled(),
        "trainable_parameters": sum(p.numel() for p in state.params),
        "objective": {"condition_frames": model_args.condition_frames, "loss_weighting": model_args.loss_weighting,
                      "sigma_mean": model_args.sigma_mean, "sigma_std": model_args.sigma_std,
                      "sigma_frame_scaling": model_args.sigma_frame_scaling,
                      "standardized_latents": unwrapped.statistics is not None},
        "transformer": {key: unwrapped.transformer.config[key] for key in
                        ("num_attention_heads", "attention_head_dim", "num_layers", "patch_size")},
        "cosmos_model": cosmos,
        **worker_and_run_fields(worker, stats, accelerator, run.world_size, model_args.lora_r),
        **peak_memory_mb(accelerator.device),
        # The transformer's own switch (through peft's wrapper with --lora-r), not the flag: it says the flag acted.
        "gradient_checkpointing": bool(getattr(unwrapped.transformer, "gradient_checkpointing", False)),
        "world_image_size": image_size,
        "world_latent_shape": list(heldout[0]["noise"].shape[1:]),  # [C, T, h, w]: what the resize gave the VAE
    }
    if accelerator.is_main_process:
        write_loss_curve(state.history, state.evals, output_dir / "loss_curve.png",
                         ylabel="Video2World denoising loss")
        save_world_model(unwrapped.transformer, cosmos, output_dir / "model", unwrapped.statistics)
        write_json_atomic(output_dir / "model" / TASK_FILE, task)
        write_json_atomic(output_dir / "summary.json", summary)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def print_world_summary(summary: dict, output_dir: str) -> None:
    from theworld.evaluation_world import format_rollout_table

    print(f"\nTheWorld world-model training: {summary['steps']}/{summary['max_steps']} steps, "
          f"{summary['steps_per_second'] or 0:.2f} steps/s\n"
          f"  samples: seen {summary['seen']} = trained {summary['trained']} + blocked {summary['blocked']} "
          f"+ errors {summary['errors']}\n"
          f"  held-out denoising loss {summary['initial_eval_loss']:.4f} -> {summary['final_eval_loss']:.4f}")
    if summary["rollout_eval"]:
        print("  counterfactual rollout evaluation (forced choice among 5 continuations, chance 20%):")
        print("\n".join("    " + line for line in format_rollout_table(summary["rollout_eval"],
                                                                       summary["rollout_eval_baselines"]).splitlines()))
    print(f"  outputs in {output_dir}: model/ (use as --cosmos-model), summary.json, metrics.jsonl, "
          "loss_curve.png, blocked.jsonl, errors.jsonl, tensorboard/, checkpoints/")


def main(argv: list[str] | None = None) -> int:
    """Console entry point (``theworld-train-world``)."""
    from theworld.data.safety_filter import TooManyBadSamples
    from theworld.data.sources import DataError

    model_args, data_args, train_args = parse_args(argv, ARGUMENT_CLASSES, DESCRIPTION, "theworld.train_world")
    try:
        summary = train_world(model_args, data_args, train_args)
    except DataError as e:
        print(f"theworld-train-world: error: {e}", file=sys.stderr)
        return 2
    except TooManyBadSamples as e:
        print(f"theworld-train-world: stopped: {e}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print_world_summary(summary, train_args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
