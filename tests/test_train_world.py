"""`python -m theworld.train_world`: the Cosmos transformer post-trained on safety-checked clips.

One short command-line run with its own spawned worker (module fixture) is checked for the boundary, the
accounting, the ledgers and the saved Cosmos directory; resume runs in process on the session worker.
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
from theworld.data.synthetic import SyntheticMotionTask
from theworld.train_world import (ARGUMENT_CLASSES, DESCRIPTION, build_trainee, collate_clips, synthetic_clip_shape,
                                  train_world)
from theworld.training.arguments import parse_args

REPO_ROOT = Path(__file__).resolve().parent.parent
SIZE, BATCH, STEPS = 48, 2, 4


def small_args(output_dir, tiny_models, *extra):
    """Flags for a seconds-long run of the tiny Cosmos (fewer clips, steps and evaluation clips, nothing else)."""
    _, cosmos = tiny_models
    return ["--output-dir", str(output_dir), "--cosmos-model", str(cosmos), "--synthetic-size", str(SIZE),
            "--synthetic-eval-size", "4", "--eval-size", "4", "--batch-size", str(BATCH), "--max-steps", str(STEPS),
            "--warmup-steps", "1", "--eval-every", "2", "--save-every", "2", "--blocked-fraction", "0.25",
            "--rollout-eval-steps", "1,4", "--rollout-eval-size", "8", "--report-to", "none", *extra]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, tiny_models):
    """One `python -m theworld.train_world` run that spawns its own safety worker."""
    out = tmp_path_factory.mktemp("train_world")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "theworld.train_world", *small_args(out, tiny_models)], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return out, json.loads((out / "summary.json").read_text()), proc.stdout


@pytest.mark.long  # reads the module's end-to-end `python -m theworld.train_world` run
def test_world_trainer_keeps_grad_while_its_spawned_worker_has_it_off(cli_run):
    _, summary, stdout = cli_run
    assert summary["safety_worker_spawned"]
    assert summary["worker"]["grad_enabled"] is False
    assert summary["worker"]["modules_loaded"]["cosmos_guardrail"] is True
    assert summary["grad_enabled"] is True
    assert "seen" in stdout and "forced choice" in stdout


@pytest.mark.long  # reads the module's end-to-end `python -m theworld.train_world` run
def test_every_clip_is_checked_blocked_ones_are_ledgered_and_accounted_for(cli_run):
    out, summary, _ = cli_run
    task = SyntheticMotionTask(size=SIZE, blocked_fraction=0.25)
    stream = SampleStream(task, seed=0)
    read = [task.sample_id(stream.index_at(p)) for p in range(summary["seen"])]
    expected_blocked = [i for i in read if i in task.blocked_ids]
    assert expected_blocked, "the run should have read some blocked clips"
    assert [r["id"] for r in read_jsonl(out / "blocked.jsonl")] == expected_blocked
    assert summary["seen"] == summary["trained"] + summary["blocked"] + summary["errors"]
    assert summary["accounting_holds"] and summary["errors"] == 0
    assert summary["trained"] == STEPS * BATCH
    assert (out / "errors.jsonl").exists()


@pytest.mark.long  # reads the module's end-to-end `python -m theworld.train_world` run
def test_summary_has_the_rollout_table_with_every_key(cli_run):
    _, summary, _ = cli_run
    assert set(summary["rollout_eval"]) == {"1", "4"}
    for row in summary["rollout_eval"].values():
        assert set(row) == {"forced_choice_accuracy", "latent_mse", "linear_mse", "copy_last_mse", "n"}
        assert row["n"] == 8 and 0.0 <= row["forced_choice_accuracy"] <= 1.0
    assert set(summary["rollout_eval_baselines"]) == {"linear", "copy_last"}


@pytest.mark.long  # reads the module's end-to-end `python -m theworld.train_world` run
def test_model_is_a_complete_cosmos_directory_the_trainer_takes_as_cosmos_model(cli_run, tiny_models, tiny_safety_worker,
                                                                                  tmp_path):
    from theworld.train import parse_args as train_parse_args, train

    out, _, _ = cli_run
    model = out / "model"
    _, tiny_cosmos = tiny_models
    expected = {p.name for p in Path(tiny_cosmos).iterdir() if not p.name.startswith(".")}
    assert expected <= {p.name for p in model.iterdir()}
    assert (model / "theworld_task.json").is_file()
    # The saved transformer is the trained one (the last checkpoint's weights), not the tiny one copied.
    trained = load_file(out / "checkpoints" / f"step-{STEPS:06d}" / "trainable.safetensors")
    saved = load_file(model / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(trained[f"transformer.{k}"], v) for k, v in saved.items())
    gemma, _ = tiny_models
    summary = train(*train_parse_args([
        "--output-dir", str(tmp_path), "--gemma-model", str(gemma), "--cosmos-model", str(model),
        "--synthetic-size", "8", "--synthetic-eval-size", "4", "--eval-size", "4", "--batch-size", "2",
        "--max-steps", "1", "--report-to", "none", "--safety-endpoint", tiny_safety_worker.endpoint]))
    assert summary["steps"] == 1 and summary["trainer_grad_enabled"]


def test_resume_reproduces_the_uninterrupted_run(tmp_path, tiny_models, tiny_safety_worker):
    def run(name, *extra):
        args = parse_args(small_args(tmp_path / name, tiny_models, "--safety-endpoint", tiny_safety_worker.endpoint,
                                     "--rollout-eval-steps", "", *extra), ARGUMENT_CLASSES, DESCRIPTION)
        return train_world(*args)

    whole = run("whole")
    run("parts", "--stop-after-steps", "2")
    resumed = run("parts", "--resume")

    def losses(name):
        return [(r["step"], r.get("loss"), r.get("eval_loss")) for r in read_jsonl(tmp_path / name / "metrics.jsonl")]

    assert losses("parts") == losses("whole")  # exactly equal floats
    for key in ("seen", "trained", "blocked", "errors", "initial_eval_loss", "final_eval_loss"):
        assert resumed[key] == whole[key], key
    final = f"checkpoints/step-{STEPS:06d}/trainable.safetensors"
    a, b = load_file(tmp_path / "whole" / final), load_file(tmp_path / "parts" / final)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_only_the_transformer_learns_and_the_loss_reaches_it(tiny_models):
    model_args, data_args, _ = parse_args(["--cosmos-model", str(tiny_models[1])], ARGUMENT_CLASSES, DESCRIPTION)
    trainee, _ = build_trainee(model_args, seed=0, clip_shape=synthetic_clip_shape(data_args))
    batch = collate_clips([SyntheticMotionTask(size=2)[i] for i in range(2)])
    loss = trainee(**batch).loss
    assert loss.requires_grad
    loss.backward()
    assert all(p.grad is None for p in trainee.encoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainee.transformer.parameters())


def test_the_new_transformers_statistics_take_the_resized_clips_shape(tiny_models):
    """`--world-image-size` resizes the clips before the VAE: the statistics must be of the resized latents."""
    args = ["--cosmos-model", str(tiny_models[1]), "--world-image-size", "48,64"]
    model_args, data_args, _ = parse_args(args, ARGUMENT_CLASSES, DESCRIPTION)
    assert synthetic_clip_shape(data_args) == (9, (32, 32))
    trainee, _ = build_trainee(model_args, seed=0, clip_shape=synthetic_clip_shape(data_args, (48, 64)))
    batch = collate_clips([SyntheticMotionTask(size=2)[i] for i in range(2)], (48, 64))
    trainee(**batch).loss.backward()  # statistics of another shape would fail to broadcast here
    assert tuple(trainee.statistics.mean.shape[-2:]) == (6, 8)


def test_lora_trains_adapters_only_and_saves_a_plain_transformer(tiny_models, tmp_path):
    from diffusers import CosmosTransformer3DModel

    from theworld.training.world_model import save_world_model

    model_args, _, _ = parse_args(["--cosmos-model", str(tiny_models[1]), "--lora-r", "4"], ARGUMENT_CLASSES, DESCRIPTION)
    trainee, cosmos = build_trainee(model_args, seed=0)
    trainable = trainee.trainable_state_dict()
    assert trainable and all("lora_" in name for name in trainable)
    save_world_model(trainee.transformer, cosmos, tmp_path / "model")
    CosmosTransformer3DModel.from_pretrained(tmp_path / "model", subfolder="transformer")


def test_train_world_never_imports_the_guard():
    """The world-model trainer's process refuses the guard (theworld's import guard) and loads none of it."""
    code = ("import sys, theworld.train_world, torch\n"
            "assert torch.is_grad_enabled()\n"
            "assert not any(m.split('.')[0] in ('cosmos_guardrail', 'retinaface') for m in sys.modules if sys.modules[m])\n"
            "try:\n    import cosmos_guardrail\nexcept ImportError as e:\n    print('refused:', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "refused:" in proc.stdout and "safety" in proc.stdout.lower()


@pytest.mark.long  # reads the module's end-to-end `python -m theworld.train_world` run
def test_eval_script_prints_the_same_table_for_the_saved_model(cli_run, tmp_path):
    out, _, _ = cli_run
    result = tmp_path / "rollout.json"
    proc = subprocess.run([sys.executable, "scripts/eval_world_model.py", str(out / "model"), "--json", str(result),
                           "--steps", "1", "--eval-size", "4", "--train-size", "16"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = json.loads(result.read_text())
    assert set(table["rollout_eval"]["1"]) == {"forced_choice_accuracy", "latent_mse", "linear_mse", "copy_last_mse", "n"}
    assert table["rollout_eval"]["1"]["n"] == 4 and "forced choice" in proc.stdout


def test_only_tiny_builds_get_a_new_transformer_by_default(tmp_path):
    """`--transformer-shape auto` replaces the random transformer of a tiny build (trained VAE, the default, or
    random; format 4's opt-in trained build too); a real-shape build, an earlier train_world output or any
    other directory keeps its own."""
    from theworld.tiny import _COMPLETE_MARKER
    from theworld.train_world import _is_tiny_build

    for name, marker, expected in [("tiny", "5 seed=0", True), ("random", "5 seed=0 random-vae", True),
                                   ("trained4", "4 seed=0 trained-vae", True),
                                   ("real", "5 seed=0 real-shapes layers=2", False), ("model", None, False)]:
        (tmp_path / name).mkdir()
        if marker is not None:
            (tmp_path / name / _COMPLETE_MARKER).write_text(marker + "\n")
        assert _is_tiny_build(str(tmp_path / name)) is expected, name
