"""The training loop, read top to bottom: build, check, step, evaluate, checkpoint."""
from __future__ import annotations

import dataclasses
import os
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from theworld import assert_grad_enabled  # importing theworld installs the import guard first
from theworld.training.arguments import DataArguments, ModelArguments, TrainArguments, parse_report_to
from theworld.training.checkpoints import CHECKPOINT_DIR, checkpoint_dirs, load_checkpoint, save_checkpoint
from theworld.training.data import (TASK_FILE, check_curated_identity, heldout_loads, open_datasets, task_record,
                                    training_stream)
from theworld.training.heldout import EVAL_BATCH_SIZE, collate_eval_batches, evaluate_world_and_no_world, to_device
from theworld.training.model import build_model, world_projector_parameters
from theworld.training.sharding import full_tensor, is_sharded, shard_model
from theworld.training.reporting import MetricsLog, log_heldout_examples, peak_memory_mb, write_json_atomic, write_loss_curve
from theworld.training.worker_session import local_processes, safety_window_share, safety_worker


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
    from accelerate.utils import DistributedType, ProjectConfiguration
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
    # `--fsdp`, or an accelerate config with FSDP (GPUs: accelerate runs a CPU launch as DDP): one sharding.
    fsdp = train_args.fsdp or accelerator.distributed_type == DistributedType.FSDP
    if fsdp:
        shard_model(model)  # before the optimizer is built: sharding replaces the parameters
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train_args.learning_rate, weight_decay=train_args.weight_decay)
    # accelerate steps a prepared scheduler once per process per optimizer step.
    scheduler = get_scheduler(train_args.lr_scheduler_type, optimizer, num_warmup_steps=train_args.warmup_steps * world_size,
                              num_training_steps=train_args.max_steps * world_size)
    if fsdp:  # distributed by its shards already: no DDP wrapper, no second wrapping by accelerate
        optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
    else:
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    sharded = is_sharded(model)
    projector_before = {n: full_tensor(p.detach()).clone()
                        for n, p in world_projector_parameters(accelerator.unwrap_model(model)).items()}

    ledger_suffix = "" if rank == 0 else f".rank{rank}"

    step, history, evals, filter_state = 0, [], [], None
    if train_args.resume:
        state = load_checkpoint(accelerator, model, optimizer, scheduler, checkpoints[-1])
        step, history, evals, filter_state = state["step"], state["history"], state["evals"], state["filter"]
        stream.load_state_dict(state.get("data"))
        accelerator.print(f"resumed from {checkpoints[-1]} at step {step}")
    metrics = MetricsLog(output_dir / "metrics.jsonl", history + evals, enabled=accelerator.is_main_process)

    with ExitStack() as stack:
        endpoint, spawned = stack.enter_context(safety_worker(train_args, accelerator, worker_threads))
        # A worker shared by several processes (or runs) can be briefly full: resend a `busy` check
        # until its deadline rather than count it as a failed check after a few seconds.
        client = stack.enter_context(SafetyClient(endpoint, timeout=train_args.safety_timeout, busy_retries=None))
        worker_hello = client.hello()
        for data in (train_data, heldout_data):  # curated data is trained on unchecked: same checker only
            check_curated_identity(data, worker_hello, data_args.accept_curated_identity)
        safety_window = safety_window_share(train_args.safety_window, worker_hello, local)
        if safety_window < train_args.safety_window:
            accelerator.print(f"safety window: {safety_window} checks in flight per process ({local} processes "
                              f"share the worker's queue of {worker_hello['limits']['queue_size']})")
        assert_grad_enabled("training (after connecting to the safety worker)")

        # ---- held-out set: checked once through the same worker, collated once
        heldout = Prefetcher(heldout_loads(heldout_data, data_args.eval_size), data_args.data_workers,
                             data_args.data_prefetch)
        eval_filter = SafetyFilter(client, heldout, window=safety_window, output_dir=output_dir,
                                   ledger_suffix=f".eval{ledger_suffix}", max_errors=train_args.safety_max_errors,
                                   result_timeout=train_args.safety_timeout, fresh_ledgers=True,
                                   curated=hasattr(heldout_data, "curated"))
        eval_samples = [sample for _, sample in eval_filter]
        eval_filter.close()
        heldout.close()
        if not eval_samples:
            raise ValueError("no held-out sample passed the safety check; see eval blocked/errors ledgers in --output-dir")
        # Each rank scores its share of the held-out set; `evaluate` sums the scores over the ranks.
        eval_share = eval_samples[rank::world_size]
        eval_batches = collate_eval_batches(accelerator.unwrap_model(model), eval_share, EVAL_BATCH_SIZE, world=None)
        no_world_batches = None
        if accelerator.unwrap_model(model).config.enable_world:
            no_world_batches = collate_eval_batches(accelerator.unwrap_model(model), eval_share, EVAL_BATCH_SIZE,
                                                    world=False)
        # A sharded model's forward is a collective: a rank with fewer held-out batches runs this one, uncounted.
        lockstep = collate_eval_batches(accelerator.unwrap_model(model), eval_samples[:1], 1, world=None)[0] if sharded else None

        # Read and decoded ahead in threads, from where the samples taken so far end.
        reader = Prefetcher(stream.iter_loads_from(filter_state["next_position"] if filter_state else 0),
                            data_args.data_workers, data_args.data_prefetch)
        stack.callback(reader.close)
        if make_sample_filter is None:
            samples = SafetyFilter(client, reader, window=safety_window, output_dir=output_dir,
                                   ledger_suffix=ledger_suffix, max_errors=train_args.safety_max_errors,
                                   result_timeout=train_args.safety_timeout, state=filter_state,
                                   max_bad_samples=max_bad_samples, reuse_mb=train_args.safety_cache_mb,
                                   worker_hello=worker_hello, curated=hasattr(train_data, "curated"))
        else:
            samples = make_sample_filter(client, reader, output_dir, filter_state)
        stack.callback(samples.close)

        if report_to:
            accelerator.init_trackers("theworld", config={k: v for a in (model_args, data_args, train_args)
                                                          for k, v in dataclasses.asdict(a).items() if v is not None})

        def show_examples(at_step: int) -> None:
            if {"tensorboard", "all"} & set(report_to) and train_args.heldout_examples > 0:
                log_heldout_examples(accelerator, model, eval_samples[: train_args.heldout_examples], at_step)

        if not train_args.resume:
            evals.append({"step": 0, **evaluate_world_and_no_world(model, eval_batches, no_world_batches, accelerator, lockstep)})
            metrics.append(evals[-1])
            show_examples(0)
        stop_at = train_args.max_steps
        if train_args.stop_after_steps is not None:
            stop_at = min(stop_at, step + train_args.stop_after_steps)
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
            metrics.append(record)
            progress.update(1)
            if step % train_args.log_every == 0 or step == stop_at:
                progress.set_postfix(loss=f"{record['loss']:.4f}", blocked=samples.counts.blocked)
                if report_to:
                    accelerator.log({"train/loss": record["loss"], "train/lr": record["lr"]}, step=step)

            pause = time.perf_counter()
            if step % train_args.eval_every == 0 or step == train_args.max_steps:
                evals.append({"step": step, **evaluate_world_and_no_world(model, eval_batches, no_world_batches, accelerator, lockstep)})
                metrics.append(evals[-1])
                show_examples(step)
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
    projector_after = {n: full_tensor(p.detach()) for n, p in world_projector_parameters(accelerator.unwrap_model(model)).items()}
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
        # A curate output's own counts (its blocked and errors never reach this run): read = kept + blocked + errors.
        "curated": getattr(train_data, "curated", {}).get("counts"),
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
        "projector_max_abs_change": max(((projector_after[n] - projector_before[n]).abs().max().item()
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
        "fsdp": sharded,
        **peak_memory_mb(accelerator.device),
    }
    weights = accelerator.unwrap_model(model).trainable_state_dict()  # collective when sharded
    if accelerator.is_main_process:
        write_loss_curve(history, evals, output_dir / "loss_curve.png")
        # Reloadable with TheWorld.from_pretrained(output_dir / "model"): config + trainable weights.
        accelerator.unwrap_model(model).save_pretrained(output_dir / "model", state_dict=weights)
        write_json_atomic(output_dir / "model" / TASK_FILE, task_record(data_args, train_args.seed))
        write_json_atomic(output_dir / "summary.json", summary)
    accelerator.wait_for_everyone()
    # Last: end_training finishes the trackers and destroys the process group, so every collective
    # (the reduce above, the barriers) must come before it.
    accelerator.end_training()
    return summary
