"""scripts/eval_world.py really feeds the world tokens, and evaluates rollout on/off from one checkpoint."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from theworld import TheWorld
from theworld.data.synthetic import SyntheticWorldTask

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "eval_world.py"
SIZE = 4


@pytest.fixture(scope="module")
def eval_world():
    spec = importlib.util.spec_from_file_location("eval_world", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def samples():
    task = SyntheticWorldTask(split="heldout", size=SIZE)
    return [task[i] for i in range(SIZE)]


@pytest.fixture(scope="module")
def two_checkpoints(tiny_models, tmp_path_factory):
    """The same model saved twice; only the world projector's weights differ."""
    gemma_dir, cosmos_dir = tiny_models
    root = tmp_path_factory.mktemp("eval-checkpoints")
    model = TheWorld.from_pretrained(gemma_dir, cosmos_model=cosmos_dir)
    model.save_pretrained(root / "a")
    with torch.no_grad():
        for param in model.world_projector.parameters():
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
    model.save_pretrained(root / "b")
    return root / "a", root / "b"


def test_different_projector_weights_give_different_outputs(eval_world, two_checkpoints, samples):
    rows = {}
    for name, checkpoint in zip("ab", two_checkpoints):
        for row in eval_world.evaluate_checkpoint(checkpoint, samples, rollout=0, batch_size=SIZE, max_new_tokens=4,
                                                  rollout_steps=2):
            rows[name, row["variant"]] = row
    assert rows["a", "world"]["loss"] != rows["b", "world"]["loss"]
    # Control: without world tokens the two checkpoints are the same model.
    assert rows["a", "world tokens off"]["loss"] == rows["b", "world tokens off"]["loss"]
    assert rows["a", "world tokens off"]["answers"] == rows["b", "world tokens off"]["answers"]


def test_rollout_variant_keeps_the_trained_weights(eval_world, two_checkpoints):
    checkpoint = two_checkpoints[1]
    trained = eval_world.load_checkpoint(checkpoint)
    rolled = eval_world.load_checkpoint(checkpoint, num_world_steps=1)
    assert rolled.config.num_world_steps == 1 and rolled.world_projector.num_frames == 2
    embedding = rolled.world_projector.temporal_embedding
    assert torch.equal(embedding[:1], trained.world_projector.temporal_embedding)
    assert torch.equal(embedding[1:], torch.zeros_like(embedding[1:]))
    for (name, a), (_, b) in zip(trained.world_projector.proj.named_parameters(),
                                 rolled.world_projector.proj.named_parameters()):
        assert torch.equal(a, b), name


def test_cli_reports_world_no_world_and_rollout_side_by_side(eval_world, two_checkpoints, tiny_models, tmp_path,
                                                            capsys):
    gemma_dir, cosmos_dir = tiny_models
    no_world = tmp_path / "no-world"
    TheWorld.from_pretrained(gemma_dir, cosmos_model=cosmos_dir, enable_world=False).save_pretrained(no_world)
    out = tmp_path / "rows.json"
    code = eval_world.main([str(two_checkpoints[0]), str(no_world), "--size", "2", "--rollout", "1",
                            "--rollout-steps", "2", "--max-new-tokens", "2", "--json", str(out)])
    assert code == 0
    variants = [(Path(r["checkpoint"]).name, r["variant"]) for r in json.loads(out.read_text())]
    assert variants == [("a", "world"), ("a", "world tokens off"), ("a", "world, rollout 1"),
                        ("no-world", "no-world model")]
    assert "world, rollout 1" in capsys.readouterr().out
