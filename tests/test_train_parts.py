"""The parts `train()` is built from, each on its own: run context, train state, one step, held-out set,
summary. Real tiny TheWorld models and a real (single-process) accelerator; no safety worker is needed here,
the whole runs in tests/test_train.py cover it."""
import copy

import pytest
import torch

from fixtures_model import load_tiny_world, make_sample

from theworld.data.collator import TheWorldCollator
from theworld.data.safety_filter import FilterCounts
from theworld.training import (
    TrainArguments, TrainState, build_summary, build_train_state, open_run, prepare_heldout, reduce_sample_counts,
    train_step,
)

# summary.json's keys, a fixed interface (README "Outputs"), in the order the file holds them.
SUMMARY_KEYS = [
    "steps", "max_steps", "seen", "trained", "blocked", "errors", "bad_samples", "accounting_holds", "curated",
    "initial_eval_loss", "final_eval_loss", "initial_eval_accuracy", "final_eval_accuracy",
    "final_eval_loss_no_world", "final_eval_accuracy_no_world", "enable_world", "eval_samples", "eval_by_question",
    "train_seconds", "steps_per_second", "step_seconds", "safety_wait_seconds", "safety_wait_fraction", "data_wait_seconds",
    "data_wait_fraction", "trainer_grad_enabled", "projector_max_abs_change", "trainable_parameters",
]


@pytest.fixture()
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def train_args(tmp_path, **overrides) -> TrainArguments:
    return TrainArguments(**{"output_dir": str(tmp_path), "max_steps": 10, "warmup_steps": 2, "learning_rate": 1e-2,
                             "num_threads": 1, "report_to": "none", **overrides})


def batches(model):
    collate = TheWorldCollator(model)
    fixed = [collate([make_sample(2 * i), make_sample(2 * i + 1, answer="A dog.")]) for i in range(3)]
    return iter(fixed * 4).__next__


def trained_weights(state: TrainState) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in state.model.trainable_state_dict().items()}


def optimizer_tensors(state: TrainState) -> list[torch.Tensor]:
    return [value for per_param in state.optimizer.state_dict()["state"].values() for value in per_param.values()]


def test_train_state_save_then_restore_gives_back_the_run_exactly(tmp_path, tiny_models, accelerator):
    args = train_args(tmp_path)
    before = build_train_state(load_tiny_world(tiny_models, seed=0).train(), args, accelerator, fsdp=False)
    next_batch = batches(before.model)
    for _ in range(2):
        train_step(before, next_batch, accelerator, accumulation_steps=1, max_grad_norm=1.0)
        before.step += 1
        before.history.append({"step": before.step, "loss": 0.5, "lr": before.scheduler.get_last_lr()[0]})
    before.evals.append({"step": 2, "eval_loss": 1.25})
    checkpoint = before.save(accelerator, tmp_path, keep=2, filter_state={"next_position": 7, "seen": 4},
                             data_state={"epoch": 0, "position": 7})
    draws_after_save = torch.rand(4)

    # Another initialisation (seed 1): everything that matches below came from the checkpoint.
    after = build_train_state(load_tiny_world(tiny_models, seed=1).train(), args, accelerator, fsdp=False)
    assert not all(torch.equal(a, b) for a, b in zip(trained_weights(after).values(), trained_weights(before).values()))
    after.restore(accelerator, checkpoint)

    assert torch.equal(torch.rand(4), draws_after_save)  # RNG restored to the moment of saving
    assert (after.step, after.resumed_from, after.history, after.evals) == (2, 2, before.history, before.evals)
    assert after.filter_state == {"next_position": 7, "seen": 4} and after.data_state == {"epoch": 0, "position": 7}
    assert after.scheduler.state_dict() == before.scheduler.state_dict()
    weights_before, weights_after = trained_weights(before), trained_weights(after)
    assert weights_before.keys() == weights_after.keys()
    assert all(torch.equal(weights_before[n], weights_after[n]) for n in weights_before)
    assert all(torch.equal(a, b) for a, b in zip(optimizer_tensors(before), optimizer_tensors(after)))
    # And the next step is the same step: Adam's moments and the LR came back, not only the weights.
    batch = next_batch()
    losses = [train_step(state, lambda: batch, accelerator, 1, 1.0) for state in (before, after)]
    assert losses[0] == losses[1]
    assert all(torch.equal(a, b) for a, b in zip(trained_weights(before).values(), trained_weights(after).values()))


def test_a_step_averages_its_micro_batches_and_steps_the_optimizer_once(tmp_path, tiny_models):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)  # as open_run builds it for this run
    state = build_train_state(load_tiny_world(tiny_models).train(), train_args(tmp_path, gradient_accumulation_steps=2),
                              accelerator, fsdp=False)
    next_batch = batches(state.model)
    first, second = next_batch(), next_batch()
    # The same two forwards on a copy: the projector's running latent statistics move with each forward in
    # training mode, and the weights must not move between micro-batches.
    shadow = copy.deepcopy(state.model)
    with torch.no_grad():
        expected = sum(shadow(**b).loss.item() for b in (first, second)) / 2
    start = trained_weights(state)
    loss = train_step(state, iter([first, second]).__next__, accelerator, accumulation_steps=2, max_grad_norm=1.0)
    assert loss == pytest.approx(expected, rel=1e-6)
    assert {int(s["step"]) for s in state.optimizer.state_dict()["state"].values()} == {1}
    assert any(not torch.equal(start[n], w) for n, w in trained_weights(state).items())


def test_a_step_with_nothing_trainable_reaching_the_loss_says_so(tmp_path, tiny_models, accelerator):
    state = build_train_state(load_tiny_world(tiny_models).train(), train_args(tmp_path), accelerator, fsdp=False)
    state.model.requires_grad_(False)
    with pytest.raises(RuntimeError, match="no trainable parameter reaches the loss"):
        train_step(state, batches(state.model), accelerator, 1, 1.0)


def test_the_run_refuses_resume_without_checkpoints_and_checkpoints_without_resume(tmp_path):
    with pytest.raises(FileNotFoundError, match="start without --resume"):
        open_run(train_args(tmp_path, resume=True))
    (tmp_path / "checkpoints" / "step-000002").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="pass --resume"):
        open_run(train_args(tmp_path))
    run = open_run(train_args(tmp_path, resume=True))
    assert run.checkpoints == [tmp_path / "checkpoints" / "step-000002"]
    assert (run.rank, run.world_size, run.report_to) == (0, 1, [])


def test_each_rank_holds_its_share_of_the_heldout_set(tiny_world_model):
    samples = [make_sample(i) for i in range(5)]
    first = prepare_heldout(tiny_world_model, samples, rank=0, world_size=2, sharded=False)
    second = prepare_heldout(tiny_world_model, samples, rank=1, world_size=2, sharded=False)
    assert [len(b["input_ids"]) for b in first.batches] == [3] and [len(b["input_ids"]) for b in second.batches] == [2]
    assert first.samples == samples  # the final per-question table scores them all
    assert "world_pixel_values" in first.batches[0] and "world_pixel_values" not in first.no_world_batches[0]
    assert first.lockstep is None
    assert prepare_heldout(tiny_world_model, samples, 1, 2, sharded=True).lockstep["input_ids"].shape[0] == 1
    with pytest.raises(ValueError, match="no held-out sample passed the safety check"):
        prepare_heldout(tiny_world_model, [], 0, 1, sharded=False)


def summary_of(samples: dict, loop_seconds: float = 4.0, **overrides) -> dict:
    values = dict(steps=12, max_steps=20, steps_run=8, samples=samples,
                  evals=[{"step": 0, "eval_loss": 2.0, "eval_accuracy": 0.1},
                         {"step": 12, "eval_loss": 1.0, "eval_accuracy": 0.5, "eval_loss_no_world": 1.5,
                          "eval_accuracy_no_world": 0.25}],
                  eval_samples=8, eval_by_question={}, enable_world=True, loop_seconds=loop_seconds,
                  safety_wait_seconds=1.0, data_wait_seconds=0.5, projector_max_abs_change=0.1,
                  trainable_parameters=100, run={"num_processes": 1})
    return build_summary(**{**values, **overrides})


def test_the_summary_accounts_for_every_sample_seen():
    holds = summary_of({"seen": 10, "trained": 7, "blocked": 2, "errors": 1, "bad_samples": 1})
    assert holds["accounting_holds"] is True
    assert (holds["seen"], holds["trained"], holds["blocked"], holds["errors"], holds["bad_samples"]) == (10, 7, 2, 1, 1)
    lost_one = summary_of({"seen": 10, "trained": 7, "blocked": 2, "errors": 0, "bad_samples": 0})
    assert lost_one["accounting_holds"] is False


def test_the_summary_rates_count_only_this_processes_steps_and_loop_time():
    summary = summary_of({"seen": 1, "trained": 1, "blocked": 0, "errors": 0, "bad_samples": 0})
    assert list(summary) == SUMMARY_KEYS + ["num_processes"]
    assert summary["steps_per_second"] == 2.0  # 8 steps run (a resumed run's earlier ones not counted) in 4 s
    assert (summary["safety_wait_fraction"], summary["data_wait_fraction"]) == (0.25, 0.125)
    assert (summary["initial_eval_loss"], summary["final_eval_loss"], summary["final_eval_accuracy_no_world"]) == (
        2.0, 1.0, 0.25)
    unmeasured = summary_of({"seen": 0, "trained": 0, "blocked": 0, "errors": 0, "bad_samples": 0}, loop_seconds=0.0)
    assert unmeasured["steps_per_second"] is None and unmeasured["safety_wait_fraction"] is None
    timed = summary_of({"seen": 1, "trained": 1, "blocked": 0, "errors": 0, "bad_samples": 0},
                       step_seconds=[0.51234567, 0.5, 1.0, 0.5, 0.5, 0.5, 0.25, 0.23765433])
    assert timed["step_seconds"] == [0.5123, 0.5, 1.0, 0.5, 0.5, 0.5, 0.25, 0.2377]  # one per step run, 0.1 ms


def test_sample_counts_are_summed_into_the_summary_names(accelerator):
    counts = FilterCounts(seen=9, passed=6, blocked=2, errors=1, data_errors=1)
    assert reduce_sample_counts(accelerator, counts) == {"seen": 9, "trained": 6, "blocked": 2, "errors": 1,
                                                         "bad_samples": 1}
