"""Does the world model predict? The counterfactual rollout evaluation of a post-trained Cosmos transformer.

Why counterfactual: the Wan VAE is causal, so every latent frame carries the past, and a predicted future
latent can look right while predicting nothing (with a random tiny VAE a probe fit on true future latents
reads the future cell from the latents of the same clip with the square *stopped*). So each held-out clip
is rendered with its true continuation and four alternatives after the same observed frames (the square
stops, reverses, turns left, turns right; `SyntheticMotionTask.counterfactual_clips`), all five are
encoded, and a rollout counts as right only when it is nearer (mean squared error in the normalised latent
space) to the true continuation than to every alternative: forced choice among five, chance 20 %.

Beside it, per sampling-step count: the rollout's `latent_mse` against the true future, and two baselines
on the same clips: `linear_mse`, a closed-form ridge regression from the observed latents to the future
latents fit on training clips of the same task (the simple predictor a world model must beat), and
`copy_last_mse`, the last observed latent frame repeated. Held-out clips come from the task's held-out split
at an unseen seed (`EVAL_SEED_OFFSET` added to the training seed).

`python -m theworld.train_world` writes the table into `summary.json` (`rollout_eval`) and
`scripts/eval_world_model.py MODEL --json OUT` prints it for a saved model; both call `evaluate_world_model`.
The rendered clips never reach a person or the trainer (they are encoded and compared), so they do not pass
the safety worker; training clips always do.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from theworld.configuration_theworld import check_clip_length

ROLLOUT_EVAL_STEPS = (1, 4, 35)
# The evaluation's clips come from a task seed the model never trained on.
EVAL_SEED_OFFSET = 1000
FUTURE_FRAMES = 4  # one Wan latent frame
RIDGE_ALPHA = 1.0
ENCODE_BATCH = 40  # 8 clips x 5 continuations


@dataclass
class CounterfactualSet:
    """`observed` latents `[N, C, To, h, w]` of N held-out clips and `candidates` `[N, K, C, Tf, h, w]`: the
    future latents of each clip's K continuations, the true one first (`names[0]`)."""

    observed: torch.Tensor
    candidates: torch.Tensor
    names: tuple[str, ...]

    @property
    def truth(self) -> torch.Tensor:
        return self.candidates[:, 0]


def _encode(encoder, clips: list[list], image_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Normalised latents `[B, C, T, h, w]` of equally long clips (posterior mode, no grad), resized to
    `image_size` `(H, W)` when given (the size the model trained at: `--world-image-size`)."""
    from theworld.video_processing_theworld import preprocess_world_clips

    height, width = image_size or clips[0][0].shape[:2]
    out = []
    with torch.no_grad():
        for start in range(0, len(clips), ENCODE_BATCH):
            pixels, _ = preprocess_world_clips(clips[start : start + ENCODE_BATCH], height, width)
            out.append(encoder(pixels.to(encoder.latents_mean.device)).float())
    return torch.cat(out)


def _observed_latent_frames(num_frames: int, future_frames: int) -> int:
    observed = num_frames - future_frames
    check_clip_length(observed)
    return (observed - 1) // 4 + 1


def encode_counterfactuals(task, encoder, size: int, future_frames: int = FUTURE_FRAMES,
                           image_size: tuple[int, int] | None = None) -> CounterfactualSet:
    """Render and encode the first `size` clips of `task` (a `SyntheticMotionTask`) with every continuation
    (resized to `image_size` for the VAE when given)."""
    from theworld.data.synthetic import CONTINUATIONS

    observed_frames = _observed_latent_frames(task.num_frames, future_frames)
    names = tuple(CONTINUATIONS)
    clips = []
    for index in range(min(size, len(task))):
        rendered = task.counterfactual_clips(index, future_frames)
        clips.extend(rendered[name] for name in names)
    latents = _encode(encoder, clips, image_size)
    latents = latents.view(-1, len(names), *latents.shape[1:])
    # The VAE is causal: the observed latents are the same in every continuation; take the true clip's.
    return CounterfactualSet(latents[:, 0, :, :observed_frames], latents[:, :, :, observed_frames:], names)


def encode_training_pairs(task, encoder, size: int, future_frames: int = FUTURE_FRAMES,
                          image_size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(observed, future)` latents of the first `size` training clips of `task`, for the ridge baseline."""
    observed_frames = _observed_latent_frames(task.num_frames, future_frames)
    latents = _encode(encoder, [task[i]["images"] for i in range(min(size, len(task)))], image_size)
    return latents[:, :, :observed_frames], latents[:, :, observed_frames:]


def forced_choice_accuracy(predicted: torch.Tensor, candidates: torch.Tensor) -> float:
    """Fraction of rows whose prediction `[N, ...]` is strictly nearer (MSE) to `candidates[:, 0]` than to
    every other candidate `candidates[:, k > 0]` (`[N, K, ...]`). Ties count as wrong."""
    distances = (candidates - predicted.unsqueeze(1)).pow(2).flatten(2).mean(-1)  # [N, K]
    return (distances[:, 0] < distances[:, 1:].min(dim=1).values).float().mean().item()


def latent_mse(predicted: torch.Tensor, target: torch.Tensor) -> float:
    return (predicted - target).pow(2).mean().item()


@dataclass
class RidgePredictor:
    """Closed-form ridge regression from flattened observed latents to flattened future latents."""

    weight: torch.Tensor
    bias: torch.Tensor
    future_shape: tuple[int, ...]

    @classmethod
    def fit(cls, observed: torch.Tensor, future: torch.Tensor, alpha: float = RIDGE_ALPHA) -> "RidgePredictor":
        x = observed.flatten(1).double()
        y = future.flatten(1).double()
        x_mean, y_mean = x.mean(0), y.mean(0)
        xc, yc = x - x_mean, y - y_mean
        gram = xc.T @ xc + alpha * torch.eye(x.shape[1], dtype=x.dtype)
        weight = torch.linalg.solve(gram, xc.T @ yc)
        return cls(weight, y_mean - x_mean @ weight, tuple(future.shape[1:]))

    def __call__(self, observed: torch.Tensor) -> torch.Tensor:
        prediction = observed.flatten(1).double() @ self.weight + self.bias
        return prediction.float().view(-1, *self.future_shape)


def copy_last(observed: torch.Tensor, future_frames: int) -> torch.Tensor:
    """The last observed latent frame, repeated for every future latent frame."""
    return observed[:, :, -1:].expand(-1, -1, future_frames, -1, -1)


def rollout_eval(transformer, counterfactuals: CounterfactualSet, ridge: RidgePredictor,
                 steps: tuple[int, ...] = ROLLOUT_EVAL_STEPS, seed: int = 0, batch_size: int = 64,
                 statistics=None) -> dict:
    """`{"<steps>": {"forced_choice_accuracy", "latent_mse", "linear_mse", "copy_last_mse", "n"}}` for each
    sampling-step count (`theworld.modeling.rollout.sample_world_latents`, seeded noise, in the latent space
    of the transformer's `statistics` when it has them; every MSE in the VAE's normalised latent space)."""
    from theworld.modeling.rollout import sample_world_latents

    observed, truth = counterfactuals.observed, counterfactuals.truth
    future_frames = truth.shape[2]
    linear, copied = ridge(observed), copy_last(observed, future_frames)
    common = {"linear_mse": latent_mse(linear, truth), "copy_last_mse": latent_mse(copied, truth), "n": len(truth)}
    device = next(transformer.parameters()).device
    was_training = transformer.training
    transformer.eval()
    table = {}
    for count in steps:
        generator = torch.Generator(device=device).manual_seed(seed)
        predicted = torch.cat([
            sample_world_latents(transformer, observed[i : i + batch_size].to(device), future_frames, count,
                                 generator=generator, statistics=statistics)[:, :, -future_frames:].float().cpu()
            for i in range(0, len(observed), batch_size)
        ])
        table[str(count)] = {"forced_choice_accuracy": forced_choice_accuracy(predicted, counterfactuals.candidates),
                             "latent_mse": latent_mse(predicted, truth), **common}
    transformer.train(was_training)
    return table


def baseline_forced_choice(counterfactuals: CounterfactualSet, ridge: RidgePredictor) -> dict:
    """The forced-choice accuracy of the two baselines on the same clips (what a rollout must beat)."""
    observed, candidates = counterfactuals.observed, counterfactuals.candidates
    return {"linear": forced_choice_accuracy(ridge(observed), candidates),
            "copy_last": forced_choice_accuracy(copy_last(observed, candidates.shape[3]), candidates)}


def evaluate_world_model(transformer, encoder, task_record: dict, *, eval_size: int = 256, train_size: int = 1024,
                         steps: tuple[int, ...] = ROLLOUT_EVAL_STEPS, statistics=None) -> dict:
    """`{"rollout_eval": rollout_eval(...), "rollout_eval_baselines": baseline_forced_choice(...)}`: the
    counterfactual table of a world model trained on the synthetic motion task of `task_record`
    (`theworld.training.data.task_record`): held-out clips at seed + `EVAL_SEED_OFFSET`, the ridge baseline
    fit on the first `train_size` training clips of the task's own seed; clips reach the VAE at the record's
    `world_image_size` when the model was trained at one (`--world-image-size`), else at the task's size.
    `statistics`: the transformer's `WorldLatentStatistics` (saved with it by `theworld.train_world`), or None."""
    from theworld.data.synthetic import SyntheticMotionTask

    if task_record.get("data") != "synthetic":
        raise ValueError(f"the rollout evaluation renders counterfactual continuations of the synthetic motion "
                         f"task; this model was trained on {task_record.get('data')!r}")
    common = dict(num_frames=task_record["num_frames"], image_size=task_record["image_size"])
    train_task = SyntheticMotionTask(split="train", size=train_size, seed=task_record["seed"], **common)
    heldout = SyntheticMotionTask(split="heldout", size=eval_size, seed=task_record["seed"] + EVAL_SEED_OFFSET,
                                  **common)
    image_size = task_record.get("world_image_size")
    ridge = RidgePredictor.fit(*encode_training_pairs(train_task, encoder, train_size, image_size=image_size))
    counterfactuals = encode_counterfactuals(heldout, encoder, eval_size, image_size=image_size)
    return {"rollout_eval": rollout_eval(transformer, counterfactuals, ridge, steps, seed=task_record["seed"],
                                         statistics=statistics),
            "rollout_eval_baselines": baseline_forced_choice(counterfactuals, ridge)}


def format_rollout_table(table: dict, baselines: dict | None = None) -> str:
    """The table as text, one row per sampling-step count, then the baselines' forced choice."""
    lines = [f"{'steps':>5}  {'forced choice':>13}  {'latent_mse':>10}  {'linear_mse':>10}  {'copy_last_mse':>13}  {'n':>5}"]
    for steps, row in table.items():
        lines.append(f"{steps:>5}  {row['forced_choice_accuracy']:>13.1%}  {row['latent_mse']:>10.4g}  "
                     f"{row['linear_mse']:>10.4g}  {row['copy_last_mse']:>13.4g}  {row['n']:>5}")
    if baselines:
        lines.append(f"forced choice of the baselines: ridge {baselines['linear']:.1%}, "
                     f"copy-last {baselines['copy_last']:.1%} (chance 20%)")
    return "\n".join(lines)
