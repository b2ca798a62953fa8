"""The world path learns what only it can see (the motion task), and the ablations prove it.

Both arms train with the trainer's default recipe through the shared tiny safety worker: a world model
and a `--no-enable-world` model. The direction of motion is visible only across a clip's frames, which
only the world path receives; the colour is visible in the last frame, which both paths receive.

- `long`, in CI's long test command (`test_world_model_reads_motion_that_the_no_world_model_cannot`): a
  shortened run (600 of the 1200 default steps) of the world arm at two seeds and of the no-world arm
  once, still minutes on 2 CPU cores, asserts the claims that must hold whatever the exact figures: the
  world model's direction interval lies wholly above the no-world model's, and shuffling the world
  latents across samples (positions unchanged) costs at least 30 points. The seeds are 0 (the default)
  and 6, the seed whose default run stalled before the projector's MLP was widened (docs/training.md,
  "Every seed"). Two seeds do not show that the result holds for every seed: with the wider MLP seed 7
  stalls (same section); `scripts/seed_sweep.py` is the check across seeds.
- `slow` (`test_default_runs_meet_the_motion_task_targets`): the full defaults at the same two seeds,
  against the targets stated in the issue (direction >= 80 %, no-world and shuffled <= 35 %, reversed
  clips flip >= 80 %, colour >= 70 % in both arms). `scripts/seed_sweep.py` runs seeds 0-9.
"""
import pytest
import torch

from theworld.train import parse_args, train


def run_arm(output_dir, tiny_models, endpoint, *extra) -> dict:
    gemma, cosmos = tiny_models
    torch.manual_seed(0)
    return train(*parse_args(["--output-dir", str(output_dir), "--gemma-model", str(gemma),
                              "--cosmos-model", str(cosmos), "--safety-endpoint", endpoint, *extra]))


@pytest.fixture(scope="module")
def caching_worker(spawn_tiny_worker):
    """A worker with the verdict cache of `serve --replicas` (one checker): both arms read the same clips,
    so the second arm's checks are answered from the cache (each arm's first epoch waits on the worker)."""
    with spawn_tiny_worker("none", "--replicas", "1") as worker:
        yield worker


# The default seed and the seed whose run stalled with the narrower projector (docs/training.md, "Every seed").
SEEDS = (0, 6)
SHORT_RUN = ["--max-steps", "600", "--eval-every", "600", "--save-every", "600"]


@pytest.fixture(scope="module")
def short_no_world_arm(tmp_path_factory, tiny_models, caching_worker):
    """The no-world baseline, once: it cannot see motion at any seed."""
    no_world = run_arm(tmp_path_factory.mktemp("no_world"), tiny_models, caching_worker.endpoint,
                       "--no-enable-world", *SHORT_RUN)
    print("no-world:", no_world["eval_by_question"])
    return no_world["eval_by_question"]


@pytest.mark.long
@pytest.mark.timeout(3600)  # each 600-step arm takes minutes on 2 cores; a loaded machine passed 600 s in one
@pytest.mark.parametrize("seed", SEEDS)
def test_world_model_reads_motion_that_the_no_world_model_cannot(seed, tmp_path, tiny_models, caching_worker,
                                                                 short_no_world_arm):
    world = run_arm(tmp_path / "world", tiny_models, caching_worker.endpoint, "--seed", str(seed),
                    *SHORT_RUN)["eval_by_question"]
    print(f"world, seed {seed}:", world)
    no_world = short_no_world_arm
    direction, baseline = world["direction"], no_world["direction"]
    assert direction["n"] >= 200 and baseline["n"] >= 200  # 512 held-out samples, two question types
    assert direction["ci_low"] > baseline["ci_high"], (direction, baseline)
    assert direction["accuracy"] - direction["shuffled_world"] >= 0.30, direction
    # The no-world model answers the direction no better than the majority answer (it cannot see it).
    assert baseline["ci_low"] <= baseline["majority"], baseline


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("seed", SEEDS)
def test_default_runs_meet_the_motion_task_targets(seed, tmp_path, tiny_models, caching_worker):
    world = run_arm(tmp_path / "world", tiny_models, caching_worker.endpoint, "--seed", str(seed))["eval_by_question"]
    no_world = run_arm(tmp_path / "no_world", tiny_models, caching_worker.endpoint, "--seed", str(seed),
                       "--no-enable-world")["eval_by_question"]
    assert world["direction"]["accuracy"] >= 0.80, world
    assert no_world["direction"]["accuracy"] <= 0.35, no_world
    assert world["direction"]["shuffled_world"] <= 0.35, world
    assert world["direction"]["reversed_flips"] >= 0.80, world
    assert world["colour"]["accuracy"] >= 0.70 and no_world["colour"]["accuracy"] >= 0.70, (world, no_world)
