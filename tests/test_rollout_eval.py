"""scripts/eval_world.py and theworld.evaluation: exact answers per question type, against the majority
baseline with a Wilson interval, and ablations that change the world's content, not its positions."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from theworld import TheWorld
from theworld.data.synthetic import SyntheticMotionTask
from theworld.evaluation import evaluate_by_question, time_reversed, wilson_interval

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "eval_world.py"
SIZE = 8


@pytest.fixture(scope="module")
def eval_world():
    spec = importlib.util.spec_from_file_location("eval_world", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def samples():
    task = SyntheticMotionTask(split="heldout", size=SIZE)
    return [task[i] for i in range(SIZE)]


@pytest.fixture(scope="module")
def two_models(tiny_models, tmp_path_factory):
    """The same model saved twice; only the world projector's weights differ."""
    gemma_dir, cosmos_dir = tiny_models
    root = tmp_path_factory.mktemp("eval-models")
    torch.manual_seed(0)
    model = TheWorld.from_pretrained(gemma_dir, cosmos_model=cosmos_dir)
    model.save_pretrained(root / "a")
    with torch.no_grad():
        for param in model.world_projector.parameters():
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
    model.save_pretrained(root / "b")
    return root / "a", root / "b"


def test_wilson_interval_matches_the_closed_form():
    low, high = wilson_interval(80, 100)
    assert math.isclose(low, 0.7111, abs_tol=1e-4) and math.isclose(high, 0.8666, abs_tol=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0


def test_a_reversed_clip_plays_backwards_and_expects_the_opposite_direction(samples):
    direction = next(s for s in samples if s["question_type"] == "direction")
    reversed_sample = time_reversed(direction)
    assert all(a is b for a, b in zip(reversed_sample["images"], direction["images"][::-1]))
    opposite = {"up": "down", "down": "up", "left": "right", "right": "left"}[direction["answer"]]
    assert reversed_sample["answer"] == opposite
    assert reversed_sample["messages"][-1]["content"][0]["text"] == opposite
    assert reversed_sample["messages"][0] == direction["messages"][0]


def test_shuffled_world_changes_the_content_the_model_sees(tiny_models, samples, monkeypatch):
    """The shuffled pass feeds other samples' latents (never a sample's own) at unchanged positions."""
    torch.manual_seed(0)
    model = TheWorld.from_pretrained(tiny_models[0], cosmos_model=tiny_models[1]).eval()
    seen = []
    original = model.forward

    def spy(**batch):
        if "world_latents" in batch:
            seen.append((batch["input_ids"].clone(), batch["world_latents"].clone()))
        return original(**batch)

    monkeypatch.setattr(model, "forward", spy)
    result = evaluate_by_question(model, samples, batch_size=SIZE)
    plain, shuffled = seen[0], seen[1]
    assert torch.equal(plain[0], shuffled[0])  # the same tokens and positions
    for i in range(SIZE):  # every row got another sample's latents
        assert not torch.equal(plain[1][i], shuffled[1][i])
        assert any(torch.equal(shuffled[1][i], plain[1][j]) for j in range(SIZE) if j != i)
    for entry in result.values():
        assert set(entry) >= {"accuracy", "ci_low", "ci_high", "majority", "n", "shuffled_world"}
        assert entry["ci_low"] <= entry["accuracy"] <= entry["ci_high"]
    assert "reversed_flips" in result["direction"] and "reversed_flips" not in result["colour"]


def test_cli_prints_every_model_side_by_side(eval_world, two_models, tiny_models, tmp_path, capsys):
    gemma_dir, cosmos_dir = tiny_models
    no_world = tmp_path / "no-world" / "model"
    TheWorld.from_pretrained(gemma_dir, cosmos_model=cosmos_dir, enable_world=False).save_pretrained(no_world)
    out = tmp_path / "rows.json"
    code = eval_world.main([str(two_models[0]), str(no_world), "--size", str(SIZE), "--rollout", "1",
                            "--rollout-steps", "2", "--json", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())
    assert [(Path(r["model"]).name, r["variant"]) for r in rows] == [
        ("a", "world"), ("a", "world tokens off"), ("a", "world, rollout 1"), ("model", "no-world model")]
    assert "shuffled_world" in rows[0]["eval_by_question"]["colour"]
    assert "shuffled_world" not in rows[3]["eval_by_question"]["colour"]
    printed = capsys.readouterr().out
    assert "majority" in printed and "no-world model" in printed


def test_different_projector_weights_give_different_answers_only_with_the_world(eval_world, two_models, samples):
    rows = {name: eval_world.evaluate_model(path, samples, batch_size=SIZE) for name, path in zip("ab", two_models)}
    scores = {name: {r["variant"]: r["eval_by_question"] for r in model_rows} for name, model_rows in rows.items()}
    # Control: without world tokens the two models are the same model.
    assert scores["a"]["world tokens off"] == scores["b"]["world tokens off"]
    # What "only with the world" rests on: with world tokens the two projectors give different logits,
    # without them the same (answer accuracies of random models on 8 samples cannot show it).
    from theworld import TheWorldCollator

    models = [TheWorld.from_pretrained(path).eval() for path in two_models]
    with torch.no_grad():
        for world, same in ((True, False), (False, True)):
            batch = TheWorldCollator(models[0], world=world)(samples[:2])
            logits_a, logits_b = (model(**batch).logits for model in models)
            assert torch.equal(logits_a, logits_b) == same
