"""The motion task's forecast question ("future"): opt-in, balanced, and answerable only from the last
position and the motion together (issue 23)."""
import hashlib
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from theworld.data.synthetic import DEFAULT_MOTION_QUESTIONS, DIRECTIONS, STEPS, SyntheticMotionTask, forecast_cell

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from forecast_baselines import measure  # noqa: E402

# sha256 of the first 64 samples of the default task (seed 0, blocked_fraction 0.05) and of 8 samples'
# counterfactual clips (seed 3), computed with the task as it was before the forecast question existed.
BEFORE_FORECAST = {
    "train": "c726ed59b57a0876a8a518201126285ba266a44b708583552baba4a0307765c0",
    "heldout": "d79cc05c99c862b3106801f294db46053d6aa2383d7207e5d5fe454fc320d4a9",
    "counterfactual": "f9cf7e8b1b7be7d8bbfd9a1d4686aa8d744deffef8fb59cd44b4dfee7b566df3",
}
FORECAST_TASK = ("direction", "colour", "future")


def samples_digest(task: SyntheticMotionTask, count: int) -> str:
    digest = hashlib.sha256()
    for i in range(count):
        sample = task[i]
        digest.update(json.dumps({k: sample[k] for k in ("id", "messages", "question_type", "answer")},
                                 sort_keys=True).encode())
        for frame in sample["images"]:
            digest.update(np.ascontiguousarray(frame).tobytes())
    return digest.hexdigest()


def test_the_default_task_is_unchanged_bit_for_bit():
    assert SyntheticMotionTask().questions == DEFAULT_MOTION_QUESTIONS == ("direction", "colour")
    for split in ("train", "heldout"):
        task = SyntheticMotionTask(split=split, size=64, seed=0, blocked_fraction=0.05)
        assert samples_digest(task, 64) == BEFORE_FORECAST[split], split
    task, digest = SyntheticMotionTask(size=64, seed=3), hashlib.sha256()
    for i in range(8):
        for name, frames in task.counterfactual_clips(i).items():
            digest.update(name.encode())
            for frame in frames:
                digest.update(frame.tobytes())
    assert digest.hexdigest() == BEFORE_FORECAST["counterfactual"]


def test_from_every_last_cell_the_four_directions_lead_to_four_points_and_every_point_is_reached_as_often():
    task = SyntheticMotionTask(size=1, questions=FORECAST_TASK)
    cells = task.image_size // task.cell
    offset = (task.cell - task.square) // 2
    reached = Counter()
    for i in range(cells):
        for j in range(cells):
            top, left = i * task.cell + offset, j * task.cell + offset
            points = {}
            for direction in DIRECTIONS:
                dy, dx = STEPS[direction]
                points[direction] = forecast_cell(top + dy * task.forecast_frames, left + dx * task.forecast_frames,
                                                  task.image_size, task.square, task.cell)
                reached[points[direction]] += 1
            assert len(set(points.values())) == 4, (i, j, points)
            # Chess-like: column letter, row number, on the half-cell grid; the cell's centre is (2j, 2i).
            assert points["right"] == f"{'ABCDEFGH'[2 * j + 1]}{2 * i + 1}", points
            assert points["up"] == f"{'ABCDEFGH'[2 * j]}{(2 * i - 1) % (2 * cells) + 1}", points
    # Every edge midpoint of the 4x4 torus (32 of them) is reached from its two neighbouring cells.
    assert len(reached) == 2 * cells * cells and set(reached.values()) == {2}, reached


def test_forecast_samples_ask_where_the_square_will_be_and_keep_the_clip_and_its_counterfactuals():
    mixed = SyntheticMotionTask(size=400, questions=FORECAST_TASK)
    plain = SyntheticMotionTask(size=400)
    kinds = Counter(mixed[i]["question_type"] for i in range(400))
    assert set(kinds) == set(FORECAST_TASK) and abs(kinds["future"] / 400 - 3 / 7) < 0.07  # train weights 3:1:3
    assert SyntheticMotionTask(split="heldout", questions=FORECAST_TASK).question_shares["future"] == pytest.approx(1 / 3)
    for i in range(16):
        sample = mixed[i]
        # The clip does not depend on the question asked: the same index draws the same scene.
        for a, b in zip(sample["images"], plain[i]["images"]):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(np.stack(mixed.counterfactual_clips(i)["continues"]), np.stack(sample["images"]))
        if sample["question_type"] == "future":
            assert sample["answer"][0] in "ABCDEFGH" and 1 <= int(sample["answer"][1:]) <= 8
            assert sample["messages"][0]["content"][1]["text"] == "Where will the square be 4 frames after the last one?"


def test_forecast_baselines_stay_at_chance_while_position_and_direction_answer_everything():
    result = measure(train_size=2048, eval_size=512, seed=0)
    assert len(result["answer_shares"]) == 32 and max(result["answer_shares"].values()) <= 0.07, result["answer_shares"]
    assert result["majority"] <= 0.07
    # What Gemma sees (the last frame) and the first frame leave the four points of the four directions
    # (1 in 4); the motion alone, the 16 points on grid lines of its orientation (1 in 16).
    for probe in ("last_frame", "first_frame"):
        assert result[probe] <= 0.31, (probe, result[probe])
    assert result["direction"] <= 0.1
    assert result["position_and_direction"] == 1.0


def test_the_forecast_question_refuses_scenes_its_answers_cannot_name():
    with pytest.raises(ValueError, match="'future' question needs at most 26 half cells per side"):
        SyntheticMotionTask(image_size=112, questions=FORECAST_TASK)
    SyntheticMotionTask(image_size=112)  # without the forecast question the scene is fine
    assert SyntheticMotionTask(image_size=48, size=4, questions=("future",))[0]["answer"][0] in "ABCDEFGHIJKL"


def test_question_types_flag_sets_the_mix_of_both_splits_and_is_recorded_for_evaluation():
    from theworld.data.sources import DataError
    from theworld.train import parse_args
    from theworld.training import open_datasets, synthetic_task, task_record

    _, data_args, _ = parse_args(["--question-types", "direction,colour,future", "--synthetic-size", "64",
                                  "--synthetic-eval-size", "32"])
    train, heldout = open_datasets(data_args, seed=0)
    assert train.questions == heldout.questions == FORECAST_TASK
    record = task_record(data_args, seed=0)
    assert record["questions"] == list(FORECAST_TASK)
    rebuilt = synthetic_task(json.loads(json.dumps(record)), "heldout", 32)  # as scripts/eval_world.py does
    assert rebuilt == heldout
    # The default run records no questions and asks the default ones.
    _, default_args, _ = parse_args([])
    assert "questions" not in task_record(default_args, seed=0)
    assert open_datasets(default_args, seed=0)[0].questions == DEFAULT_MOTION_QUESTIONS
    for bad, message in ((["--question-types", "direction,when"], "--question-types direction,when: questions must"),
                         (["--question-types", "future", "--data", "x.jsonl", "--eval-data", "y.jsonl"],
                          "leave --question-types out")):
        with pytest.raises(DataError, match=message):
            open_datasets(parse_args(bad)[1], seed=0)


def test_eval_by_question_reports_the_forecast_like_the_other_questions(tiny_world_model):
    from theworld.evaluation import evaluate_by_question, format_table

    task = SyntheticMotionTask(split="heldout", size=12, questions=FORECAST_TASK)
    samples = [task[i] for i in range(len(task))]
    result = evaluate_by_question(tiny_world_model, samples, batch_size=12)
    assert set(result) == set(FORECAST_TASK)
    future = result["future"]
    assert set(future) == {"accuracy", "ci_low", "ci_high", "majority", "n", "shuffled_world"}
    assert future["n"] == sum(s["question_type"] == "future" for s in samples)
    assert "reversed_flips" in result["direction"]  # only the direction has an answer that a reversal flips
    assert "future" in format_table([("held-out", result)])


def test_oracle_frames_append_the_true_future_and_keep_the_question_and_the_observed_frames():
    from theworld.train import parse_args
    from theworld.training import open_datasets, synthetic_task, task_record

    observed = SyntheticMotionTask(split="heldout", size=16, questions=FORECAST_TASK)
    oracle = SyntheticMotionTask(split="heldout", size=16, questions=FORECAST_TASK, oracle_frames=4)
    for i in range(16):
        seen, told = observed[i], oracle[i]
        assert len(told["images"]) == 13
        assert all(np.array_equal(a, b) for a, b in zip(seen["images"], told["images"][:9]))
        assert {k: told[k] for k in ("messages", "answer")} == {k: seen[k] for k in ("messages", "answer")}
        assert not np.array_equal(told["images"][12], told["images"][8])  # the square moved on
        assert told["gemma_frame"] == 8 and "gemma_frame" not in seen  # Gemma keeps the last observed frame
    _, data_args, _ = parse_args(["--question-types", "direction,colour,future", "--synthetic-oracle-frames", "4",
                                  "--synthetic-size", "8", "--synthetic-eval-size", "8"])
    record = task_record(data_args, seed=0)
    assert record["oracle_frames"] == 4 and len(open_datasets(data_args, seed=0)[0][0]["images"]) == 13
    assert synthetic_task(json.loads(json.dumps(record)), "heldout", 8) == oracle.__class__(
        split="heldout", size=8, questions=FORECAST_TASK, oracle_frames=4)
    assert "oracle_frames" not in task_record(parse_args([])[1], seed=0)


def test_evaluate_with_world_latents_of_the_clips_matches_the_plain_evaluation(tiny_world_model):
    import torch

    from theworld.data.collator import TheWorldCollator
    from theworld.evaluation import evaluate_by_question, evaluate_with_world_latents

    task = SyntheticMotionTask(split="heldout", size=12, questions=FORECAST_TASK)
    samples = [task[i] for i in range(len(task))]
    batch = TheWorldCollator(tiny_world_model, world=True)(samples)
    with torch.no_grad():
        encoded = tiny_world_model.encode_world(batch["world_pixel_values"], batch["world_num_frames"])
    latents = [encoded[i] for i in range(len(samples))]
    plain = evaluate_by_question(tiny_world_model, samples, batch_size=12, ablations=False)
    assert evaluate_with_world_latents(tiny_world_model, samples, latents, batch_size=5) == plain


def test_the_oracle_batch_gives_gemma_the_observed_frame_and_the_world_path_the_future(tiny_world_model):
    from theworld.data.collator import TheWorldCollator

    observed = SyntheticMotionTask(split="heldout", size=4, questions=FORECAST_TASK)
    oracle = SyntheticMotionTask(split="heldout", size=4, questions=FORECAST_TASK, oracle_frames=4)
    collate = TheWorldCollator(tiny_world_model, world=True)
    seen, told = collate([observed[i] for i in range(4)]), collate([oracle[i] for i in range(4)])
    assert torch_equal(told["pixel_values"], seen["pixel_values"])  # Gemma: the same (observed) last frame
    assert told["world_num_frames"].tolist() == [13] * 4 and seen["world_num_frames"].tolist() == [9] * 4
    assert torch_equal(told["world_pixel_values"][:, :, :9], seen["world_pixel_values"])
    future_last = dict(oracle[0], gemma_frame=-1)  # without it Gemma would see the future frame
    assert not torch_equal(collate([future_last])["pixel_values"], seen["pixel_values"][:1])


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))
