"""Held-out answer accuracy of TheWorld checkpoints on the synthetic world task: world vs no-world,
rollout on vs off, measured side by side in one run.

    python scripts/eval_world.py runs/world/model runs/no-world/model --rollout 1

Each CHECKPOINT is a directory written by `TheWorld.save_pretrained` (a training run's `model/` or
`checkpoints/step-N/`). For each one, on the same held-out samples (`SyntheticWorldTask(split="heldout")`):

- `world`: the model as trained, with its world tokens (the input image's Cosmos latent);
- `world tokens off`: the same weights answering from Gemma's own inputs only (world models only);
- `rollout N` (with `--rollout N`): world tokens of the image plus N future latent frames predicted
  by the Cosmos transformer. A checkpoint trained without rollout has one temporal embedding; the
  embeddings of the new frames start at zero, exactly as at initialisation (so this measures the
  rollout zero-shot).

Metrics: `accuracy` is greedy generation matching the reference answer (case and spacing ignored);
`tf_accuracy` and `loss` are teacher-forced on the answer tokens (`theworld.train.evaluate`).
The synthetic images are generated here, not user input, so no safety worker is involved.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as `python scripts/eval_world.py` from a checkout
    sys.path.insert(0, str(REPO_ROOT))

from theworld import TheWorld, TheWorldConfig  # noqa: E402  (after the path fix above)
from theworld.data.collator import TheWorldCollator  # noqa: E402

TEMPORAL_EMBEDDING = "world_projector.temporal_embedding"


def load_checkpoint(checkpoint: str | Path, num_world_steps: int | None = None, device: str = "cpu") -> TheWorld:
    """`TheWorld.from_pretrained(checkpoint)`, or with a different number of rollout frames: the same
    trained weights, the temporal embedding cut or zero-extended to the new frame count."""
    from safetensors.torch import load_file

    from theworld.modeling.modeling_theworld import TRAINABLE_WEIGHTS_NAME, WORLD_OPTIONS

    saved = TheWorldConfig.from_pretrained(checkpoint)
    if num_world_steps is None or num_world_steps == saved.num_world_steps or not saved.enable_world:
        return TheWorld.from_pretrained(checkpoint).to(device).eval()
    options = {key: getattr(saved, key) for key in WORLD_OPTIONS if key != "num_world_steps"}
    model = TheWorld.from_pretrained(saved.gemma_model_name_or_path, cosmos_model=saved.cosmos_model_name_or_path,
                                     num_world_steps=num_world_steps, **options)
    state = load_file(Path(checkpoint) / TRAINABLE_WEIGHTS_NAME)
    trained = state[TEMPORAL_EMBEDDING]
    extended = torch.zeros_like(model.world_projector.temporal_embedding)
    frames = min(len(trained), len(extended))
    extended[:frames] = trained[:frames]
    state[TEMPORAL_EMBEDDING] = extended
    unexpected = model.load_state_dict(state, strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"{checkpoint} holds weights this model does not have: {unexpected[:5]}")
    return model.to(device).eval()


def _collator(model: TheWorld, world: bool, for_generation: bool) -> TheWorldCollator:
    from theworld.train import no_world_collator

    if world:
        return TheWorldCollator(model, for_generation=for_generation)
    return no_world_collator(model, for_generation=for_generation)


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def reference_answer(sample: dict) -> str:
    return "".join(item["text"] for item in sample["messages"][-1]["content"] if item["type"] == "text")


@torch.no_grad()
def generate_answers(model: TheWorld, samples: list[dict], world: bool, batch_size: int,
                     max_new_tokens: int) -> list[str]:
    """Greedy answers to the samples' questions (their reference answers are dropped)."""
    collate = _collator(model, world, for_generation=True)
    tokenizer = model.processor.tokenizer
    answers = []
    for start in range(0, len(samples), batch_size):
        batch = {k: v.to(model.device) for k, v in collate(samples[start : start + batch_size]).items()}
        output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        answers += tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return [answer.strip() for answer in answers]


def evaluate_variant(model: TheWorld, samples: list[dict], world: bool, batch_size: int,
                     max_new_tokens: int) -> dict:
    """Generated-answer accuracy plus the trainer's teacher-forced loss/accuracy for one variant."""
    from accelerate import Accelerator

    from theworld.train import evaluate

    answers = generate_answers(model, samples, world, batch_size, max_new_tokens)
    correct = [_normalise(a) == _normalise(reference_answer(s)) for a, s in zip(answers, samples)]
    collate = _collator(model, world, for_generation=False)
    batches = [collate(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]
    teacher_forced = evaluate(model, batches, Accelerator(cpu=model.device.type == "cpu"))
    return {"accuracy": sum(correct) / len(samples), "tf_accuracy": teacher_forced["accuracy"],
            "loss": teacher_forced["loss"], "answers": answers}


def evaluate_checkpoint(checkpoint: str | Path, samples: list[dict], rollout: int, batch_size: int,
                        max_new_tokens: int, rollout_steps: int, device: str = "cpu") -> list[dict]:
    """All variants of one checkpoint, one row each."""
    from theworld.modeling.rollout import RolloutConfig

    model = load_checkpoint(checkpoint, device=device)
    rows = []

    def row(variant: str, model: TheWorld, world: bool) -> dict:
        metrics = evaluate_variant(model, samples, world, batch_size, max_new_tokens)
        return {"checkpoint": str(checkpoint), "variant": variant, "samples": len(samples), **metrics}

    if not model.config.enable_world:
        return [row("no-world model", model, world=False)]
    model.rollout_config = RolloutConfig(num_inference_steps=rollout_steps)
    trained_steps = model.config.num_world_steps
    rows.append(row("world" if trained_steps == 0 else f"world, rollout {trained_steps}", model, world=True))
    rows.append(row("world tokens off", model, world=False))
    if rollout != trained_steps:
        other = load_checkpoint(checkpoint, num_world_steps=rollout, device=device)
        other.rollout_config = model.rollout_config
        rows.append(row(f"world, rollout {rollout}" if rollout else "world, rollout off", other, world=True))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="directories written by TheWorld.save_pretrained")
    parser.add_argument("--size", type=int, default=64, help="held-out samples (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="synthetic task seed; use the training run's (default: 0)")
    parser.add_argument("--image-size", type=int, default=32, help="synthetic image side in pixels (default: 32)")
    parser.add_argument("--rollout", type=int, default=0, metavar="N",
                        help="also evaluate each world checkpoint with N rolled-out frames (default: 0, off)")
    parser.add_argument("--rollout-steps", type=int, default=35, help="denoising steps per rollout (default: 35)")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per forward pass (default: 8)")
    parser.add_argument("--max-new-tokens", type=int, default=16,
                        help="answer length limit; the tiny tokenizer spends one token per character (default: 16)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows (with every generated answer) as JSON")
    args = parser.parse_args(argv)

    from theworld.data.synthetic import SyntheticWorldTask

    task = SyntheticWorldTask(split="heldout", size=args.size, seed=args.seed, image_size=args.image_size)
    samples = [task[i] for i in range(len(task))]
    rows = []
    for checkpoint in args.checkpoints:
        rows += evaluate_checkpoint(checkpoint, samples, args.rollout, args.batch_size, args.max_new_tokens,
                                    args.rollout_steps, args.device)
    print(f"{'checkpoint':<40} {'variant':<22} {'accuracy':>8} {'tf_acc':>7} {'loss':>8}")
    for r in rows:
        print(f"{r['checkpoint'][-40:]:<40} {r['variant']:<22} {r['accuracy']:>8.3f} {r['tf_accuracy']:>7.3f} "
              f"{r['loss']:>8.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
