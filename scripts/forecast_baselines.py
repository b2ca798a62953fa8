"""The baselines of the motion task's forecast question ("future"): what can be read without imagination.

    python scripts/forecast_baselines.py [--train-size 2048] [--eval-size 1024] [--seed 0] [--json OUT]

Each probe is a lookup table fit on training samples (feature -> the most common answer; an unseen
feature gets the overall most common) and scored on held-out samples; the features are read off the
frames' pixels (the square is the only bright thing in the scene):

- majority: always the held-out split's most common answer (chance: 1 in 32 on the 32-px scene);
- last frame / first frame / best middle frame: the square's position in that one frame;
- direction: the motion alone (read from two frames), without where the square is;
- position + direction: the point ``forecast_cell`` gives for the last position moved on
  ``forecast_frames`` along the motion: a rule, not a fit, and exactly the answer (100 %).

The forecast question is answerable only by combining the last position and the motion: the probe of the
last frame (what Gemma sees) leaves the four points the four directions lead to (1 in 4), the first frame
(the first Cosmos latent frame) likewise, and the direction probe 16 points (1 in 16). A middle frame is another matter, for this question as for the direction question
(the task's design, not the forecast's): the last position lies on the 8-px lattice, so a middle frame's
offset from it (1-7 px along the axis of motion) says the direction, and with its position the answer;
only the middle frame (offset 4 both ways) reads half. No single Cosmos latent frame after the first
holds one frame alone: the causal VAE's later latent frames each cover four frames. The script prints
every frame's probe for both questions.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as `python scripts/forecast_baselines.py` from a checkout
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

# Background pixels are below the task's `background` (4); every square colour has a channel >= 200.
SQUARE_THRESHOLD = 128


def square_position(frame: np.ndarray) -> tuple[int, int]:
    """Top/left of the square in ``frame`` on the wrapped scene (the row/column whose predecessor is empty)."""
    rows, cols = np.nonzero(frame.max(axis=-1) >= SQUARE_THRESHOLD)
    size = frame.shape[0]

    def first(values):
        present = set(values.tolist())
        return next(v for v in sorted(present) if (v - 1) % size not in present)

    return first(rows), first(cols)


def clip_features(sample: dict) -> dict:
    """The features each probe reads: every frame's square position and the motion per frame."""
    positions = [square_position(frame) for frame in sample["images"]]
    size = sample["images"][0].shape[0]
    (r0, c0), (r1, c1) = positions[0], positions[1]
    # One pixel per frame on a torus: a wrapped difference of size - 1 is a step of -1.
    step = tuple(((b - a + 1) % size) - 1 for a, b in ((r0, r1), (c0, c1)))
    return {"positions": positions, "step": step}


def fit_lookup(features: list, answers: list[str]):
    """A probe: feature -> the most common training answer with that feature (else the overall most common)."""
    by_feature = defaultdict(Counter)
    for feature, answer in zip(features, answers):
        by_feature[feature][answer] += 1
    fallback = Counter(answers).most_common(1)[0][0]
    table = {feature: counts.most_common(1)[0][0] for feature, counts in by_feature.items()}
    return lambda feature: table.get(feature, fallback)


def question_rows(question: str, split: str, size: int, seed: int) -> list[tuple[dict, str]]:
    """``(clip_features, answer)`` of ``size`` samples of the motion task asking ``question`` only."""
    from theworld.data.synthetic import SyntheticMotionTask

    task = SyntheticMotionTask(split=split, size=size, seed=seed, questions=(question,))
    return [(clip_features(task[i]), task[i]["answer"]) for i in range(len(task))]


def probe_accuracy(read, train_rows, eval_rows) -> float:
    """Held-out accuracy of a lookup probe of the feature ``read(features)`` fit on ``train_rows``."""
    predict = fit_lookup([read(f) for f, _ in train_rows], [a for _, a in train_rows])
    return float(np.mean([predict(read(f)) == a for f, a in eval_rows]))


def measure(train_size: int = 2048, eval_size: int = 1024, seed: int = 0) -> dict:
    """Held-out accuracy of every baseline on the forecast question, and of the same single-frame probes
    on the direction question (``direction_question_frames``); see the module docstring."""
    from theworld.data.synthetic import SyntheticMotionTask, forecast_cell

    heldout = SyntheticMotionTask(split="heldout", size=eval_size, seed=seed, questions=("future",))
    train_rows = question_rows("future", "train", train_size, seed)
    eval_rows = question_rows("future", "heldout", eval_size, seed)
    num_frames = heldout.num_frames

    def probe(read) -> float:
        return probe_accuracy(read, train_rows, eval_rows)

    frame_probes = [probe(lambda f, t=t: f["positions"][t]) for t in range(num_frames)]
    direction_rows = (question_rows("direction", "train", train_size, seed),
                      question_rows("direction", "heldout", eval_size, seed))
    direction_frames = [probe_accuracy(lambda f, t=t: f["positions"][t], *direction_rows) for t in range(num_frames)]
    ahead = heldout.forecast_frames

    def rule(f) -> str:
        (top, left), (dy, dx) = f["positions"][-1], f["step"]
        return forecast_cell(top + dy * ahead, left + dx * ahead, heldout.image_size, heldout.square, heldout.cell)

    answers = Counter(a for _, a in eval_rows)
    return {
        "n_train": train_size, "n_eval": eval_size, "seed": seed, "forecast_frames": ahead,
        "answer_shares": {answer: answers[answer] / eval_size for answer in sorted(answers)},
        "majority": answers.most_common(1)[0][1] / eval_size,
        "last_frame": frame_probes[-1],
        "first_frame": frame_probes[0],
        "best_middle_frame": max(frame_probes[1:-1]),
        "frames": frame_probes,
        "direction": probe(lambda f: f["step"]),
        "position_and_direction": float(np.mean([rule(f) == a for f, a in eval_rows])),
        "direction_question_frames": direction_frames,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-size", type=int, default=2048, help="Training samples the probes are fit on.")
    parser.add_argument("--eval-size", type=int, default=1024, help="Held-out samples they are scored on (>= 512).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the motion task.")
    parser.add_argument("--json", default=None, help="Also write the figures to this JSON file.")
    args = parser.parse_args(argv)
    result = measure(args.train_size, args.eval_size, args.seed)
    print(f"forecast question: where the square is {result['forecast_frames']} frames after the last "
          f"({result['n_eval']} held-out samples, probes fit on {result['n_train']})")
    for key in ("majority", "last_frame", "first_frame", "best_middle_frame", "direction", "position_and_direction"):
        print(f"  {key:<24} {result[key]:.3f}")
    print("single-frame probes, frame 0 (first) to the last:")
    print("  forecast question       ", " ".join(f"{v:.3f}" for v in result["frames"]))
    print("  direction question      ", " ".join(f"{v:.3f}" for v in result["direction_question_frames"]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
