"""`python -m theworld.train`: training on safety-checked data through the real safety worker.

Runs are short (a few to a few dozen steps of the tiny models) and most share one session worker
(`tiny_safety_worker`); the mission test and the shared-worker test run the real command line.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from theworld.data.sources import SampleStream
from theworld.data.synthetic import SyntheticMotionTask, SyntheticWorldTask
from theworld.train import build_model, parse_args, train

REPO_ROOT = Path(__file__).resolve().parent.parent


def small_run_args(output_dir, tiny_models, *extra):
    """Flags for a seconds-long run on the session's tiny models: fewer samples and steps, nothing else.

    Behavioural defaults (the TensorBoard tracker, the safety window) stay what users get; a test that
    needs another value passes it in ``extra``. The full defaults, with no flags at all, are run by the
    README's own commands (``tests/test_readme_blocks.py``: ``python -m theworld.train`` and the
    two-process ``torchrun`` form)."""
    gemma, cosmos = tiny_models
    return [
        "--output-dir", str(output_dir), "--gemma-model", str(gemma), "--cosmos-model", str(cosmos),
        "--synthetic-size", "64", "--synthetic-eval-size", "8", "--eval-size", "8", "--batch-size", "2",
        "--max-steps", "6", "--warmup-steps", "2", "--eval-every", "6", "--save-every", "6", "--log-every", "2",
        *extra,
    ]


def run_in_process(output_dir, tiny_models, endpoint, *extra) -> dict:
    return train(*parse_args(small_run_args(output_dir, tiny_models, "--safety-endpoint", endpoint, *extra)))


def run_cli(output_dir, tiny_models, *extra, env: dict | None = None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), **(env or {}))
    return subprocess.Popen(
        [sys.executable, "-m", "theworld.train", *small_run_args(output_dir, tiny_models, *extra)],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def seen_ids(summary, size=64, seed=0):
    """The sample ids a single-process run read, in order, from its reading position 0."""
    task = SyntheticMotionTask(size=size, seed=seed)
    stream = SampleStream(task, seed=seed)
    return [task.sample_id(stream.index_at(p)) for p in range(summary["seen"])]


def test_trainer_keeps_grad_while_its_spawned_worker_has_it_off(tmp_path, tiny_models):
    """The mission: the guardrail runs (grad off) in the worker the trainer spawned; training updates the projector."""
    out = finish(run_cli(tmp_path, tiny_models))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["safety_worker_spawned"]
    assert summary["worker"]["grad_enabled"] is False
    assert summary["worker"]["modules_loaded"]["cosmos_guardrail"] is True
    assert summary["trainer_grad_enabled"] is True
    assert "seen" in out and "held-out loss" in out  # the printed summary
    # The projector moved away from the initial weights the same seed builds.
    initial = build_model(parse_args(small_run_args(tmp_path, tiny_models))[0], seed=0)
    trained = load_file(tmp_path / "checkpoints" / "step-000006" / "trainable.safetensors")
    projector = {n: p for n, p in initial.named_parameters() if n.startswith("world_projector.")}
    assert projector and all(name in trained for name in projector)
    assert max((trained[n] - p.detach()).abs().max().item() for n, p in projector.items()) > 1e-4
    # The spawned worker was stopped with the run.
    with pytest.raises(ProcessLookupError):
        os.kill(summary["worker"]["pid"], 0)


def test_heldout_loss_halves_with_world_tokens_and_the_no_world_baseline_is_reported(tmp_path, tiny_models, tiny_safety_worker):
    """Learning: 40 steps on the synthetic task at least halve the held-out answer loss (threshold 0.5x)."""
    steps = ["--max-steps", "40", "--batch-size", "4", "--eval-every", "40", "--save-every", "40", "--blocked-fraction", "0"]
    world = run_in_process(tmp_path / "world", tiny_models, tiny_safety_worker.endpoint, *steps)
    baseline = run_in_process(tmp_path / "no_world", tiny_models, tiny_safety_worker.endpoint, *steps, "--no-enable-world")
    print(f"\nheld-out loss with world tokens {world['initial_eval_loss']:.3f} -> {world['final_eval_loss']:.3f} "
          f"(accuracy {world['final_eval_accuracy']:.2f}); same model, world tokens left out: "
          f"{world['final_eval_loss_no_world']:.3f}; no-world baseline {baseline['initial_eval_loss']:.3f} -> "
          f"{baseline['final_eval_loss']:.3f} (accuracy {baseline['final_eval_accuracy']:.2f})")
    assert world["final_eval_loss"] < 0.5 * world["initial_eval_loss"]
    assert world["final_eval_loss_no_world"] is not None
    assert baseline["enable_world"] is False and baseline["final_eval_loss_no_world"] is None
    assert baseline["final_eval_loss"] < baseline["initial_eval_loss"]
    assert (tmp_path / "world" / "loss_curve.png").stat().st_size > 0


def test_blocked_texts_are_ledgered_and_every_sample_is_accounted_for(tmp_path, tiny_models, tiny_safety_worker):
    summary = run_in_process(tmp_path, tiny_models, tiny_safety_worker.endpoint, "--blocked-fraction", "0.25")
    read = seen_ids(summary)
    expected_blocked = [i for i in read if i in SyntheticMotionTask(size=64, blocked_fraction=0.25).blocked_ids]
    ledger = read_jsonl(tmp_path / "blocked.jsonl")
    assert expected_blocked, "the run should have read some blocked samples"
    assert [r["id"] for r in ledger] == expected_blocked
    assert all(r["reason"] for r in ledger)
    assert summary["seen"] == summary["trained"] + summary["blocked"] + summary["errors"]
    assert summary["errors"] == 0 and summary["blocked"] == len(expected_blocked)
    assert summary["trained"] == 6 * 2  # steps x batch size
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["seen"] == summary["seen"] and "initial_eval_loss" in saved and "final_eval_loss" in saved
    # The per-step times (what the imagination bench reads per epoch) are the loop's time, step by step.
    assert len(saved["step_seconds"]) == 6
    assert sum(saved["step_seconds"]) == pytest.approx(saved["train_seconds"], rel=0.02, abs=0.01)


def test_a_checkpoint_restores_everything_the_next_steps_depend_on(tmp_path, tiny_models):
    """Resume exactness is a property of the checkpoint: after `load_checkpoint` into a model, optimizer and
    scheduler built from another seed, the next steps draw the same random numbers (python, numpy, torch),
    see the same learning rates, compute the same losses and end with the same weights (projector statistics
    included) as the run that wrote it and went on; the rank's own state comes back as written."""
    import random

    import numpy as np
    from accelerate import Accelerator
    from transformers import get_scheduler

    from theworld.data.collator import TheWorldCollator
    from theworld.training.checkpoints import load_checkpoint, save_checkpoint

    model_args = parse_args(small_run_args(tmp_path, tiny_models))[0]
    task = SyntheticMotionTask(size=8, seed=0)
    accelerator = Accelerator()

    def build(seed):
        model = build_model(model_args, seed=seed)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=8)
        return accelerator.prepare(model, optimizer, scheduler)

    def steps(model, optimizer, scheduler, count):
        collator, seen = TheWorldCollator(accelerator.unwrap_model(model)), []
        for _ in range(count):
            picks = torch.randint(len(task), (2,)).tolist()  # the batch drawn from the torch RNG
            loss = model(**collator([task[i] for i in picks])).loss
            accelerator.backward(loss)
            optimizer.step(), scheduler.step(), optimizer.zero_grad()
            seen.append((picks, loss.item(), scheduler.get_last_lr()[0], random.random(), float(np.random.rand())))
        return seen

    written = build(seed=0)
    steps(*written, 2)
    rank_state = {"step": 2, "filter": {"next_position": 5}, "history": [{"step": 1, "loss": 0.5}]}
    checkpoint = save_checkpoint(accelerator, *written, 2, rank_state, tmp_path, keep=1)
    expected = steps(*written, 3)

    restored = build(seed=1)
    steps(*restored, 1)  # an optimizer with state of its own, which the checkpoint must replace
    before = {k: t.clone() for k, t in accelerator.unwrap_model(restored[0]).trainable_state_dict().items()}
    assert load_checkpoint(accelerator, *restored, checkpoint) == rank_state
    assert steps(*restored, 3) == expected  # exactly equal floats, not approximately
    a, b = (accelerator.unwrap_model(m).trainable_state_dict() for m in (written[0], restored[0]))
    assert a.keys() == b.keys() and any(name.startswith("world_projector.") for name in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], before[k]) for k in a)  # the weights really were replaced


def test_a_crashed_run_keeps_its_metrics_and_resume_reproduces_the_uninterrupted_run(tmp_path, tiny_models,
                                                                                    tiny_safety_worker, monkeypatch):
    """The loop end to end: a run that crashed after its step-2 checkpoint, resumed, ends exactly like the run
    that never stopped: the same metrics (equal floats), counters, ledgers and weights. What the checkpoint and
    the filter's state restore is unit-tested above and in test_train_safety_filter.py; this checks that the
    loop saves and restores all of it."""
    import theworld.training.state as train_state  # TrainState.save writes the checkpoints

    flags = ["--max-steps", "6", "--save-every", "2", "--eval-every", "2", "--blocked-fraction", "0.25"]
    endpoint = tiny_safety_worker.endpoint
    whole = run_in_process(tmp_path / "whole", tiny_models, endpoint, *flags)
    save = train_state.save_checkpoint

    def crash_at_step_4(accelerator, model, optimizer, scheduler, step, *args):
        if step == 4:
            raise RuntimeError("simulated crash")
        return save(accelerator, model, optimizer, scheduler, step, *args)

    monkeypatch.setattr(train_state, "save_checkpoint", crash_at_step_4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_in_process(tmp_path / "parts", tiny_models, endpoint, *flags)
    # Written as the run went: steps 1-4 and the evaluations at 0, 2 and 4, although it never finished.
    crashed = read_jsonl(tmp_path / "parts" / "metrics.jsonl")
    assert [(r["step"], "loss" in r) for r in crashed] == [(0, False), (1, True), (2, True), (2, False), (3, True),
                                                           (4, True), (4, False)]
    assert [p.name for p in (tmp_path / "parts" / "checkpoints").iterdir()] == ["step-000002"]
    monkeypatch.setattr(train_state, "save_checkpoint", save)
    resumed = run_in_process(tmp_path / "parts", tiny_models, endpoint, *flags, "--resume")  # from step 2
    assert read_jsonl(tmp_path / "parts" / "metrics.jsonl") == read_jsonl(tmp_path / "whole" / "metrics.jsonl")
    for key in ("seen", "trained", "blocked", "errors", "initial_eval_loss", "final_eval_loss"):
        assert resumed[key] == whole[key], key
    assert whole["blocked"] > 0  # the ledger below holds lines written after the checkpoint and cut back
    assert (tmp_path / "parts" / "blocked.jsonl").read_text() == (tmp_path / "whole" / "blocked.jsonl").read_text()
    final = "checkpoints/step-000006/trainable.safetensors"
    a, b = load_file(tmp_path / "whole" / final), load_file(tmp_path / "parts" / final)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.long  # an end-to-end run of the real commands: CI runs it with `pytest -m long`
def test_two_concurrent_runs_share_one_external_worker(tmp_path, tiny_models, tiny_safety_worker):
    endpoint = tiny_safety_worker.endpoint
    # Two trainers at once on this test machine's cores: one thread each (a trainer that spawns no worker
    # keeps torch's default, every core, and two of them would thrash).
    procs = [run_cli(tmp_path / f"run{i}", tiny_models, "--safety-endpoint", endpoint, "--seed", str(i),
                     "--blocked-fraction", "0.25", env={"OMP_NUM_THREADS": "1"}) for i in range(2)]
    for proc in procs:
        finish(proc)
    from safety_worker import SafetyClient

    with SafetyClient(endpoint) as client:
        instance = client.hello()["instance_id"]  # still serving after both runs detached
    for i in range(2):
        summary = json.loads((tmp_path / f"run{i}" / "summary.json").read_text())
        assert not summary["safety_worker_spawned"] and summary["worker"]["instance_id"] == instance
        assert summary["seen"] == summary["trained"] + summary["blocked"] + summary["errors"]
        task = SyntheticMotionTask(size=64, seed=i, blocked_fraction=0.25)
        blocked = [r["id"] for r in read_jsonl(tmp_path / f"run{i}" / "blocked.jsonl")]
        assert blocked == [x for x in seen_ids(summary, seed=i) if x in task.blocked_ids]


def two_ranks(output_dir, tiny_models, *extra) -> str:
    """Four steps of two CPU processes under torchrun, as the README launches them."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), ACCELERATE_USE_CPU="true")
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "theworld.train",
         *small_run_args(output_dir, tiny_models, "--max-steps", "4", "--blocked-fraction", "0.25", *extra)],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    return finish(proc)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, tiny_models):
    """One data-parallel (DDP) two-process run, shared by the tests that read it."""
    output_dir = tmp_path_factory.mktemp("two-ranks")
    two_ranks(output_dir, tiny_models)
    return output_dir


@pytest.mark.long  # an end-to-end run of the real commands: CI runs it with `pytest -m long`
def test_two_ranks_share_the_worker_their_local_main_process_spawns(two_rank_run, tiny_models):
    """`torchrun`/`accelerate launch`: rank 0 spawns one worker, rank 1 attaches; counters are summed over ranks.

    With the default tracker (TensorBoard), whose end_training destroys the process group: the summary's
    reduction and the last barrier must come before it, or rank 1 dies and no summary.json is written."""
    tmp_path = two_rank_run
    assert (tmp_path / "tensorboard").is_dir()  # the default tracker was on
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["safety_worker_spawned"]
    assert summary["worker_stats"]["requests"]["hello"] == 3  # the spawn's readiness check + one per rank
    assert summary["trained"] == 2 * 4 * 2  # ranks x steps x batch size
    assert summary["seen"] == summary["trained"] + summary["blocked"] + summary["errors"]
    ledgers = read_jsonl(tmp_path / "blocked.jsonl") + read_jsonl(tmp_path / "blocked.rank1.jsonl")
    assert len(ledgers) == summary["blocked"]
    assert {r["id"] for r in ledgers} <= SyntheticMotionTask(size=64, blocked_fraction=0.25).blocked_ids
    assert (tmp_path / "checkpoints" / "step-000004" / "rng_rank1.pt").is_file()
    # Each rank scored half of the held-out set and the sums were reduced: one process's figure for all 8.
    import contextlib

    from theworld.training import collate_eval_batches, evaluate

    class OneProcess:
        device, autocast = torch.device("cpu"), contextlib.nullcontext

        @staticmethod
        def unwrap_model(model):
            return model

        @staticmethod
        def reduce(tensor, reduction):
            return tensor

    model = build_model(parse_args(small_run_args(tmp_path, tiny_models))[0], seed=0)
    heldout = SyntheticMotionTask(split="heldout", size=8, seed=0)
    batches = collate_eval_batches(model, [heldout[i] for i in range(8)], 32, world=None)
    assert summary["eval_samples"] == 8
    assert summary["initial_eval_loss"] == pytest.approx(evaluate(model, batches, OneProcess())["loss"], rel=1e-5)


@pytest.mark.long  # an end-to-end run of the real commands: CI runs it with `pytest -m long`
def test_fsdp_shards_the_model_trains_like_ddp_and_resumes_from_its_checkpoint(tmp_path, two_rank_run, tiny_models):
    """`--fsdp` (FSDP2 on two gloo CPU processes): stopped after 2 of 4 steps and resumed, the run takes the
    same steps as the unsharded data-parallel run: same losses, same saved weights. Checkpoints and the final
    model hold whole tensors, gathered from the shards."""
    two_ranks(tmp_path, tiny_models, "--fsdp", "--stop-after-steps", "2")
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000002"]
    out = two_ranks(tmp_path, tiny_models, "--fsdp", "--resume")
    assert "resumed from" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    reference = json.loads((two_rank_run / "summary.json").read_text())
    assert summary["fsdp"] and not reference["fsdp"] and summary["steps"] == 4
    losses = [r["loss"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
    assert losses == pytest.approx([r["loss"] for r in read_jsonl(two_rank_run / "metrics.jsonl") if "loss" in r],
                                   rel=1e-5)
    assert summary["final_eval_loss"] == pytest.approx(reference["final_eval_loss"], rel=1e-5)
    sharded, unsharded = (load_file(run / "model" / "theworld_trainable.safetensors") for run in (tmp_path, two_rank_run))
    assert sharded.keys() == unsharded.keys()
    for name, tensor in unsharded.items():
        # An attention key bias has no gradient (softmax ignores a shift shared by all scores): AdamW moves it
        # by the sign of rounding noise, which the two runs' reductions sum in different orders (2e-6 seen).
        atol = 1e-5 if name.endswith("k_proj.bias") else 1e-6
        torch.testing.assert_close(sharded[name], tensor, rtol=1e-5, atol=atol, msg=name)
    # A resumed run that lost its optimizer state would have moved its weights elsewhere: this is not vacuous.
    initial = build_model(parse_args(small_run_args(tmp_path, tiny_models))[0], seed=0).trainable_state_dict()
    assert max((initial[n] - t).abs().max().item() for n, t in unsharded.items() if "standardizer" not in n) > 1e-3


@pytest.mark.parametrize("form", ["jsonl", "save_to_disk"])
def test_trains_on_jsonl_files_and_saved_datasets(tmp_path, tiny_models, tiny_safety_worker, form):
    """The two file formats go through the same checked path as the synthetic task."""
    import datasets
    from PIL import Image

    from theworld.data.sources import sample_text, write_jsonl

    train_task, heldout_task = SyntheticWorldTask(size=8, blocked_fraction=0.25), SyntheticWorldTask("heldout", size=4)
    if form == "jsonl":
        data = ["--data", str(write_jsonl(train_task, tmp_path / "data" / "train.jsonl")),
                "--eval-data", str(write_jsonl(heldout_task, tmp_path / "data" / "heldout.jsonl"))]
    else:
        def rows(task):
            samples = [task[i] for i in range(len(task))]
            return datasets.Dataset.from_dict({
                "key": [s["id"] for s in samples], "picture": [Image.fromarray(s["images"][0]) for s in samples],
                "prompt": [s["messages"][0]["content"][1]["text"] for s in samples],
                "label": [sample_text({"messages": s["messages"][1:]}) for s in samples]})
        datasets.DatasetDict({"train": rows(train_task), "test": rows(heldout_task)}).save_to_disk(str(tmp_path / "ds"))
        data = ["--data", str(tmp_path / "ds"), "--data-columns", "id=key,images=picture,question=prompt,answer=label"]
    summary = run_in_process(tmp_path / "run", tiny_models, tiny_safety_worker.endpoint, *data, "--max-steps", "3",
                             "--eval-every", "3", "--save-every", "3")
    assert summary["trained"] == 3 * 2 and summary["eval_samples"] == 4
    assert summary["seen"] == summary["trained"] + summary["blocked"] + summary["errors"]
    blocked = {r["id"] for r in read_jsonl(tmp_path / "run" / "blocked.jsonl")}
    assert blocked and blocked <= train_task.blocked_ids


def test_the_accelerate_fsdp_config_shards_the_layers_the_trainer_shards(tiny_models):
    """configs/accelerate_fsdp_4b.yaml is an FSDP config accelerate reads, naming the trainer's layer classes,
    and those classes are in the model (`shard_model` finds them in the tiny build)."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    from theworld.training.sharding import SHARDED_LAYER_CLASSES

    config = load_config_from_file(str(REPO_ROOT / "configs" / "accelerate_fsdp_4b.yaml"))
    assert config.distributed_type == DistributedType.FSDP and config.mixed_precision == "bf16"
    assert tuple(config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(",")) == SHARDED_LAYER_CLASSES
    model = build_model(parse_args(small_run_args("unused", tiny_models))[0], seed=0)
    assert {type(m).__name__ for m in model.modules()} >= set(SHARDED_LAYER_CLASSES)


def test_fsdp_without_several_processes_is_a_one_line_usage_error():
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    env.pop("WORLD_SIZE", None)
    r = subprocess.run([sys.executable, "-m", "theworld.train", "--fsdp"], cwd=REPO_ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "--fsdp" in r.stderr and "torchrun --nproc-per-node 2" in r.stderr
