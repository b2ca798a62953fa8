"""The training loop, read top to bottom: build, check, step, evaluate, checkpoint.

`train()` reads top to bottom (as nanoGPT's train.py does); what it is built from has a name of its own and a
unit test: the run context (`open_run`), the train state (`theworld.training.state`), the safety worker session
(`theworld.training.worker_session`), the held-out set (`theworld.training.heldout`), one optimizer step
(`train_step`) and the summary (`theworld.training.reporting.build_summary`). The loop of steps (`run_steps`),
the restore (`resume_state`) and the checked samples (`open_training_samples`) are shared with
`theworld.train_world`, which trains the Cosmos transformer with the same machinery."""
from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from theworld import assert_grad_enabled  # importing theworld installs the import guard first
from theworld.training.arguments import DataArguments, ModelArguments, TrainArguments, parse_report_to
from theworld.training.checkpoints import CHECKPOINT_DIR, checkpoint_dirs
from theworld.training.data import TASK_FILE, check_curated_identity, open_datasets, task_record, training_stream
from theworld.training.heldout import EVAL_BATCH_SIZE, check_heldout_samples, prepare_heldout, to_device
from theworld.training.model import build_model, configure_rollout, world_projector_parameters
from theworld.training.reporting import (MetricsLog, build_summary, log_heldout_examples, peak_memory_mb,
                                         reduce_sample_counts, worker_and_run_fields, write_json_atomic,
                                         write_loss_curve)
from theworld.training.sharding import full_tensor, is_sharded
from theworld.training.state import TrainState, build_train_state
from theworld.training.worker_session import local_processes, open_worker_session


def resolve_mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


@dataclass
class RunContext:
    """Where and how this process runs: its `accelerator` (and so its rank among `world_size` processes,
    `local` of them on this node), the `output_dir`, the trackers (`report_to`), the checkpoints already there,
    and the CPU threads a spawned safety worker gets (`worker_threads`, None: its default)."""

    accelerator: object
    output_dir: Path
    report_to: list[str]
    rank: int
    world_size: int
    local: int
    checkpoints: list[Path]
    worker_threads: int | None

    def start_trackers(self, *arguments) -> None:
        """Start the `--report-to` trackers (none: nothing), their run config the flags that are set."""
        if self.report_to:
            self.accelerator.init_trackers("theworld", config={k: v for a in arguments
                                                               for k, v in dataclasses.asdict(a).items() if v is not None})


def open_run(train_args: TrainArguments) -> RunContext:
    """Create the output directory and the accelerator, split the CPU threads, and check that `--resume`
    matches what the output directory holds (before anything slow is built)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    report_to = parse_report_to(train_args.report_to)
    output_dir = Path(train_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(
        gradient_accumulation_steps=train_args.gradient_accumulation_steps,
        mixed_precision=resolve_mixed_precision(train_args.mixed_precision),
        log_with=report_to or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "tensorboard")),
    )
    local = local_processes(accelerator)  # this node's processes: they share its cores and its safety worker
    worker_threads = None
    if train_args.num_threads:
        torch.set_num_threads(train_args.num_threads)
    elif accelerator.device.type == "cpu" and not train_args.safety_endpoint and train_args.safety_device == "cpu":
        # Two CPU-bound processes on the same cores with a full thread pool each thrash; split the cores.
        worker_threads = max(1, (os.cpu_count() or 2) // 2)
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // (2 * local)))
    checkpoints = checkpoint_dirs(output_dir)
    if train_args.resume and not checkpoints:
        raise FileNotFoundError(f"--resume: no checkpoint in {output_dir / CHECKPOINT_DIR}; start without --resume")
    if not train_args.resume and checkpoints:
        raise FileExistsError(f"{output_dir} already holds checkpoints; pass --resume to continue or pick another --output-dir")
    return RunContext(accelerator, output_dir, report_to, accelerator.process_index, accelerator.num_processes, local,
                      checkpoints, worker_threads)


def train_step(state: TrainState, next_batch: Callable[[], dict], accelerator, accumulation_steps: int,
               max_grad_norm: float) -> float:
    """One optimizer step over `accumulation_steps` micro-batches from `next_batch`; the mean micro-batch loss.

    Checks on every micro-batch that autograd is on and reaches the loss: a guardrail import anywhere in the
    process, or a model with nothing trainable, would otherwise train nothing without a word."""
    micro_losses = []
    for _ in range(accumulation_steps):
        batch = to_device(next_batch(), accelerator.device)
        with accelerator.accumulate(state.model):
            with accelerator.autocast():
                loss = state.model(**batch).loss
            assert_grad_enabled("the training step")
            if not loss.requires_grad:
                raise RuntimeError("the training loss does not require grad although autograd is on: no "
                                   "trainable parameter reaches the loss (is enable_world off with every "
                                   "Gemma part frozen? see --freeze-gemma-language)")
            accelerator.backward(loss)
            if accelerator.sync_gradients and max_grad_norm > 0:
                accelerator.clip_grad_norm_(state.params, max_grad_norm)
            state.optimizer.step()
            state.scheduler.step()
            state.optimizer.zero_grad()
        micro_losses.append(loss.detach().float().item())
    return sum(micro_losses) / len(micro_losses)


def resume_state(state: TrainState, stream, run: RunContext, train_args: TrainArguments):
    """With `--resume`, restore the latest checkpoint into `state` and the reading position of `stream`; the
    run's `metrics.jsonl` log (starting from the restored records) either way."""
    if train_args.resume:
        state.restore(run.accelerator, run.checkpoints[-1])
        stream.load_state_dict(state.data_state)
        run.accelerator.print(f"resumed from {run.checkpoints[-1]} at step {state.step}")
    return MetricsLog(run.output_dir / "metrics.jsonl", state.history + state.evals,
                      enabled=run.accelerator.is_main_process)


def open_run_data(run: RunContext, data_args: DataArguments, train_args: TrainArguments):
    """`(max_bad_samples, train_data, heldout_data, stream)`: the run's data opened, and its start-up errors
    (a bad `--max-bad-samples`, a missing file) raised, before anything slow is built; `stream` is this rank's
    reading order of `train_data`."""
    from theworld.data.safety_filter import BadSampleLimit
    from theworld.data.sources import DataError

    try:
        max_bad_samples = BadSampleLimit.parse(data_args.max_bad_samples)
    except ValueError as e:
        raise DataError(str(e)) from None
    train_data, heldout_data = open_datasets(data_args, train_args.seed)
    return max_bad_samples, train_data, heldout_data, training_stream(train_data, train_args.seed, run.rank,
                                                                      run.world_size)


def open_training_samples(stack: ExitStack, run: RunContext, state: TrainState, stream, worker, data_args, train_args,
                          ledger_suffix: str, max_bad_samples, make_sample_filter=None, curated: bool = False):
    """`(reader, samples)`: the training samples read and decoded ahead in threads from where the samples taken
    so far end (`reader`), each checked by the safety worker (`samples`, a `SafetyFilter` unless
    `make_sample_filter` is given; `curated`: a curate output whose samples were checked already), both closed
    when `stack` closes."""
    from theworld.data.prefetch import Prefetcher
    from theworld.data.safety_filter import SafetyFilter

    reader = Prefetcher(stream.iter_loads_from(state.filter_state["next_position"] if state.filter_state else 0),
                        data_args.data_workers, data_args.data_prefetch)
    stack.callback(reader.close)
    if make_sample_filter is None:
        samples = SafetyFilter(worker.client, reader, window=worker.window, output_dir=run.output_dir,
                               ledger_suffix=ledger_suffix, max_errors=train_args.safety_max_errors,
                               result_timeout=train_args.safety_timeout, state=state.filter_state,
                               max_bad_samples=max_bad_samples, reuse_mb=train_args.safety_cache_mb,
                               worker_hello=worker.hello, curated=curated)
    else:
        samples = make_sample_filter(worker.client, reader, run.output_dir, state.filter_state)
    stack.callback(samples.close)
    return reader, samples


def run_steps(state: TrainState, next_batch: Callable[[], dict], samples, stream, evaluate: Callable[[int], None],
              run: RunContext, train_args: TrainArguments, metrics, desc: str,
              step_seconds: list[float] | None = None) -> tuple[float, float]:
    """The loop: optimizer steps until `--max-steps` (or `--stop-after-steps` more), each logged to `metrics`,
    the progress bar and the trackers; `evaluate(step)` every `--eval-every` steps and at the last one; a
    checkpoint every `--save-every` steps and where this invocation stops. Returns the loop's seconds without
    the evaluations and checkpoints, and the safety filter's wait seconds when it started. `step_seconds`, when
    given, gets the wall seconds of each step appended (its wait for samples included; evaluations and
    checkpoints not): they add up to the loop's seconds."""
    from tqdm.auto import tqdm

    accelerator = run.accelerator
    stop_at = train_args.max_steps
    if train_args.stop_after_steps is not None:
        stop_at = min(stop_at, state.step + train_args.stop_after_steps)
    progress = tqdm(total=train_args.max_steps, initial=state.step, desc=desc,
                    disable=not accelerator.is_local_main_process)
    other_seconds = 0.0
    wait_at_start = samples.counts.wait_seconds
    state.model.train()
    started = time.perf_counter()
    while state.step < stop_at:
        step_started = time.perf_counter()
        loss = train_step(state, next_batch, accelerator, train_args.gradient_accumulation_steps,
                          train_args.max_grad_norm)
        state.step += 1
        step = state.step
        record = {"step": step, "loss": loss, "lr": state.scheduler.get_last_lr()[0]}
        state.history.append(record)
        metrics.append(record)
        progress.update(1)
        if step % train_args.log_every == 0 or step == stop_at:
            progress.set_postfix(loss=f"{loss:.4f}", blocked=samples.counts.blocked)
            if run.report_to:
                accelerator.log({"train/loss": loss, "train/lr": record["lr"]}, step=step)

        pause = time.perf_counter()
        if step_seconds is not None:
            step_seconds.append(pause - step_started)
        if step % train_args.eval_every == 0 or step == train_args.max_steps:
            evaluate(step)
        if step % train_args.save_every == 0 or step == stop_at:
            state.save(accelerator, run.output_dir, train_args.save_total_limit, samples.state_dict(),
                       stream.state_dict())
        other_seconds += time.perf_counter() - pause
    progress.close()
    return time.perf_counter() - started - other_seconds, wait_at_start


def train(model_args: ModelArguments, data_args: DataArguments, train_args: TrainArguments, *,
          make_sample_filter=None) -> dict:
    """Run training and return the summary (also written to ``output_dir/summary.json``).

    ``make_sample_filter(client, stream, output_dir, state)`` replaces the live ``SafetyFilter`` (the
    benchmark uses it to compare against pre-checked data); by default every sample is checked live.
    """
    from accelerate.utils import DistributedType

    from theworld.data.collator import TheWorldCollator
    from theworld.evaluation import evaluate_by_question
    from theworld.modeling.world_encoder import LatentCache

    assert_grad_enabled("training (at start)")
    run = open_run(train_args)
    accelerator, output_dir, report_to = run.accelerator, run.output_dir, run.report_to
    # ---- data: opened (and its start-up errors raised) before anything slow is built
    max_bad_samples, train_data, heldout_data, stream = open_run_data(run, data_args, train_args)

    # ---- model, optimizer, schedule
    model = build_model(model_args, train_args.seed)
    if train_args.gradient_checkpointing:
        # Non-reentrant: recomputation works when a layer's input needs no grad (frozen embeddings under LoRA).
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if model.world_encoder is not None and model.config.freeze_cosmos_vae and train_args.latent_cache_mb > 0:
        # A frozen VAE encodes a clip the same way every time: later epochs and evaluations reuse it.
        model.world_encoder.cache = LatentCache(max_bytes=int(train_args.latent_cache_mb * 2**20))
    configure_rollout(model, model_args.world_rollout_steps, train_args.rollout_cache_mb)
    collator = TheWorldCollator(model)
    # `--fsdp`, or an accelerate config with FSDP (GPUs: accelerate runs a CPU launch as DDP): one sharding.
    fsdp = train_args.fsdp or accelerator.distributed_type == DistributedType.FSDP
    state = build_train_state(model, train_args, accelerator, fsdp)
    model, unwrapped = state.model, accelerator.unwrap_model(state.model)
    sharded = is_sharded(model)
    projector_before = {n: full_tensor(p.detach()).clone() for n, p in world_projector_parameters(unwrapped).items()}
    ledger_suffix = "" if run.rank == 0 else f".rank{run.rank}"
    metrics = resume_state(state, stream, run, train_args)

    with ExitStack() as stack:
        worker = open_worker_session(stack, train_args, accelerator, run.worker_threads, run.local)
        for data in (train_data, heldout_data):  # curated data is trained on unchecked: same checker only
            check_curated_identity(data, worker.hello, data_args.accept_curated_identity)
        assert_grad_enabled("training (after connecting to the safety worker)")

        # ---- held-out set: checked once through the same worker, collated once
        eval_samples = check_heldout_samples(heldout_data, worker, data_args, train_args, ledger_suffix)
        heldout = prepare_heldout(unwrapped, eval_samples, run.rank, run.world_size, sharded)

        # ---- training samples: read and decoded ahead in threads, from where the samples taken so far end
        reader, samples = open_training_samples(stack, run, state, stream, worker, data_args, train_args,
                                                ledger_suffix, max_bad_samples, make_sample_filter,
                                                curated=hasattr(train_data, "curated"))

        run.start_trackers(model_args, data_args, train_args)

        def next_batch() -> dict:
            return collator([next(samples)[1] for _ in range(train_args.batch_size)])

        def evaluate(at_step: int) -> None:
            state.evals.append(heldout.evaluate(model, accelerator, at_step))
            metrics.append(state.evals[-1])
            if {"tensorboard", "all"} & set(report_to) and train_args.heldout_examples > 0:
                log_heldout_examples(accelerator, model, heldout.samples[: train_args.heldout_examples], at_step)

        def evaluate_and_log(at_step: int) -> None:
            evaluate(at_step)
            if report_to:
                accelerator.log({k.replace("eval_", "eval/"): v for k, v in state.evals[-1].items() if k != "step"},
                                step=at_step)

        # ---- the loop
        if not train_args.resume:
            evaluate(0)
        data_wait_at_start = reader.wait_seconds
        step_seconds: list[float] = []
        loop_seconds, wait_at_start = run_steps(state, next_batch, samples, stream, evaluate_and_log, run, train_args,
                                                metrics, "train", step_seconds)
        # The final held-out table: per question type, against the majority baseline, with ablations.
        eval_by_question = evaluate_by_question(unwrapped, heldout.samples, batch_size=EVAL_BATCH_SIZE,
                                                seed=train_args.seed, autocast=accelerator.autocast)
        counts = samples.counts
        data_wait = reader.wait_seconds - data_wait_at_start
        stats = worker.client.stats()

    # ---- summary (counters summed over ranks) and the saved model
    projector_after = {n: full_tensor(p.detach()) for n, p in world_projector_parameters(unwrapped).items()}
    summary = build_summary(
        steps=state.step, max_steps=train_args.max_steps, steps_run=state.step - state.resumed_from,
        samples=reduce_sample_counts(accelerator, counts), evals=state.evals, eval_samples=len(heldout.samples),
        eval_by_question=eval_by_question, enable_world=unwrapped.config.enable_world, loop_seconds=loop_seconds,
        step_seconds=step_seconds,
        safety_wait_seconds=counts.wait_seconds - wait_at_start, data_wait_seconds=data_wait,
        projector_max_abs_change=max(((projector_after[n] - projector_before[n]).abs().max().item()
                                      for n in projector_before), default=None),
        trainable_parameters=sum(p.numel() for p in state.params),
        curated=getattr(train_data, "curated", {}).get("counts"),
        run={
            **worker_and_run_fields(worker, stats, accelerator, run.world_size, model_args.lora_r),
            "gradient_checkpointing": train_args.gradient_checkpointing,
            "fsdp": sharded,
            **peak_memory_mb(accelerator.device),
        },
    )
    weights = unwrapped.trainable_state_dict()  # collective when sharded
    if accelerator.is_main_process:
        write_loss_curve(state.history, state.evals, output_dir / "loss_curve.png")
        # Reloadable with TheWorld.from_pretrained(output_dir / "model"): config + trainable weights.
        unwrapped.save_pretrained(output_dir / "model", state_dict=weights)
        write_json_atomic(output_dir / "model" / TASK_FILE, task_record(data_args, train_args.seed))
        write_json_atomic(output_dir / "summary.json", summary)
    accelerator.wait_for_everyone()
    # Last: end_training finishes the trackers and destroys the process group, so every collective
    # (the reduce above, the barriers) must come before it.
    accelerator.end_training()
    return summary
