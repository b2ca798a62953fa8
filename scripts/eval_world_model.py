"""Does a post-trained Cosmos world model predict? The counterfactual rollout table of `theworld.train_world`.

    python scripts/eval_world_model.py runs/world_model/model --json rollout.json

MODEL is the `model/` directory `python -m theworld.train_world` wrote (a Cosmos directory in the
diffusers layout plus `theworld_task.json`, the motion task it was trained on). For each sampling-step
count (`--steps`, default 1,4,35) it prints, on held-out clips of an unseen task seed, the forced choice
between the true continuation and four alternatives (stops, reverses, turns left, turns right; chance
20 %), the rollout's latent MSE against the true future, and the MSE of a ridge past-to-future predictor
and of copying the last latent frame (`theworld.evaluation_world`, the same code `train_world` runs at the
end of training). `--json OUT` writes `{"rollout_eval": {...}, "rollout_eval_baselines": {...}}` with the
keys of `summary.json`.

The clips are rendered here, encoded and compared, never shown: no safety worker is involved.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as `python scripts/eval_world_model.py` from a checkout
    sys.path.insert(0, str(REPO_ROOT))


def load_world_model(model_dir: str | Path):
    """`(transformer, encoder, task_record, statistics)` of a `theworld.train_world` output (`OUTPUT_DIR/model`);
    `statistics`: the latent statistics saved with the transformer, or None."""
    from diffusers import CosmosTransformer3DModel

    from theworld.modeling.latent_statistics import WorldLatentStatistics
    from theworld.modeling.world_encoder import CosmosWorldEncoder
    from theworld.train import TASK_FILE

    model_dir = Path(model_dir)
    task_file = model_dir / TASK_FILE
    if not task_file.is_file():
        raise FileNotFoundError(f"{task_file} is missing: pass the model/ directory that python -m "
                                "theworld.train_world wrote (it records the task the model was trained on)")
    transformer = CosmosTransformer3DModel.from_pretrained(model_dir, subfolder="transformer").eval()
    encoder = CosmosWorldEncoder.from_pretrained(str(model_dir)).eval()
    return transformer, encoder, json.loads(task_file.read_text()), WorldLatentStatistics.load(model_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="the model/ directory written by python -m theworld.train_world")
    parser.add_argument("--json", default=None, help="also write the table to this file")
    parser.add_argument("--steps", default="1,4,35", help="comma-separated sampling-step counts (default 1,4,35)")
    parser.add_argument("--eval-size", type=int, default=256, help="held-out clips (default 256)")
    parser.add_argument("--train-size", type=int, default=1024,
                        help="training clips the ridge baseline is fit on (default 1024)")
    args = parser.parse_args(argv)
    import theworld  # noqa: F401  (installs the import guard before diffusers is imported)
    from theworld.evaluation_world import evaluate_world_model, format_rollout_table

    try:
        steps = tuple(int(s) for s in args.steps.split(",") if s.strip())
        transformer, encoder, task, statistics = load_world_model(args.model)
    except (ValueError, FileNotFoundError) as e:
        print(f"eval_world_model: error: {e}", file=sys.stderr)
        return 2
    result = evaluate_world_model(transformer, encoder, task, eval_size=args.eval_size, train_size=args.train_size,
                                  steps=steps, statistics=statistics)
    print(format_rollout_table(result["rollout_eval"], result["rollout_eval_baselines"]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
