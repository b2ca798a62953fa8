"""Held-out evaluation that cannot fool us: exact answers per question type, read against the
majority-answer baseline with a Wilson interval, and content ablations of the world path.

- **Exact answer match**: a sample is right when every answer token is the argmax under teacher
  forcing, which is exactly when greedy decoding reproduces the answer.
- **Majority baseline**: the accuracy of always giving the question type's most common held-out
  answer. An accuracy inside that is not evidence of anything.
- **Shuffled world** (world models): every sample's world latents are replaced by another sample's
  (a seeded derangement among clips of the same length); positions, token count and format are
  unchanged, only the content moves. A model that uses its world tokens loses accuracy here.
- **Reversed flips** (direction questions): the clip played backwards; the fraction of samples whose
  greedy answer becomes the opposite direction. Only a model that reads time answers the reverse.

Used by `python -m theworld.train` (the `eval_by_question` summary) and `scripts/eval_world.py`.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict

import torch

OPPOSITE_DIRECTION = {"up": "down", "down": "up", "left": "right", "right": "left"}
# Two-sided 95 % normal quantile for the Wilson score interval.
Z_95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95 % by default)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # The bounds are exactly 0 and 1 at the extremes; say so rather than leave rounding residue.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def reference_answer(sample: dict) -> str:
    """The sample's answer: its `answer` key, else the text of its final assistant message."""
    if "answer" in sample:
        return str(sample["answer"])
    return "".join(item["text"] for item in sample["messages"][-1]["content"] if item["type"] == "text")


def question_type(sample: dict) -> str:
    return str(sample.get("question_type", "all"))


def with_answer(sample: dict, answer: str) -> dict:
    """The same sample with another reference answer (the prompt is unchanged)."""
    messages = [*sample["messages"][:-1], {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    return {**sample, "messages": messages, "answer": answer}


def time_reversed(sample: dict) -> dict:
    """The sample with its clip played backwards and, for a direction question, the opposite answer."""
    reversed_sample = {**sample, "images": list(sample["images"])[::-1]}
    answer = reference_answer(sample)
    return with_answer(reversed_sample, OPPOSITE_DIRECTION.get(answer, answer))


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def answer_scores(model, batch: dict, autocast=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample: `(correct, loss_sum, answer_tokens)`; `correct` is the exact answer match."""
    with autocast() if autocast is not None else torch.autocast("cpu", enabled=False):
        out = model(**batch)
    labels = batch["labels"]
    shift_logits, shift_labels = out.logits[:, :-1].float(), labels[:, 1:]
    mask = shift_labels != -100
    losses = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100, reduction="none"
    ).view_as(shift_labels)
    correct = ((shift_logits.argmax(-1) == shift_labels) | ~mask).all(dim=1)
    return correct.cpu(), (losses * mask).sum(dim=1).cpu(), mask.sum(dim=1).cpu()


def _derangement(groups: dict[int, list[int]], seed: int) -> dict[int, int]:
    """Source sample for every sample: another one of the same group (a seeded shuffle, shifted by one)."""
    generator = torch.Generator().manual_seed(seed)
    source = {}
    for members in groups.values():
        order = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
        for k, index in enumerate(order):
            source[index] = order[(k + 1) % len(order)]
    return source


@torch.no_grad()
def evaluate_by_question(model, samples: list[dict], *, batch_size: int = 8, world: bool | None = None,
                         ablations: bool = True, seed: int = 0, autocast=None) -> dict:
    """Accuracy per question type with its Wilson interval and majority baseline, and (world models,
    `ablations`) the shuffled-world accuracy and, for direction questions, the reversed-clip flips.

    Returns `{question_type: {"accuracy", "ci_low", "ci_high", "majority", "n", ["shuffled_world"],
    ["reversed_flips"]}}`.
    """
    from theworld.data.collator import TheWorldCollator

    was_training = model.training
    model.eval()
    world = model.config.enable_world if world is None else world
    collate = TheWorldCollator(model, world=world)
    collate_for_latents = TheWorldCollator(model, world=world, world_pixels=False)  # latents come from the first pass
    types = [question_type(s) for s in samples]

    def correctness(batch_samples: list[dict], latents_for=None) -> list[bool]:
        flags = []
        for start in range(0, len(batch_samples), batch_size):
            chunk = batch_samples[start : start + batch_size]
            batch = _to_device((collate if latents_for is None else collate_for_latents)(chunk), model.device)
            if latents_for is not None:
                batch["world_latents"] = latents_for(start, len(chunk))
            flags += answer_scores(model, batch, autocast)[0].tolist()
        return flags

    if world and ablations:
        # Encode every clip once; the plain pass and the shuffled pass then differ only in which
        # sample's latents fill the world positions.
        latents = []
        for start in range(0, len(samples), batch_size):
            batch = _to_device(collate(samples[start : start + batch_size]), model.device)
            encoded = model.encode_world(batch["world_pixel_values"], batch["world_num_frames"])
            latents += [encoded[i] for i in range(encoded.shape[0])]
        groups = defaultdict(list)
        for i, s in enumerate(samples):
            groups[len(s["images"])].append(i)
        source = _derangement(groups, seed)

        def stacked(order):
            def pick(start, count):
                rows = [latents[order[start + k]] for k in range(count)]
                width = max(r.shape[1] for r in rows)
                return torch.stack([torch.nn.functional.pad(r, (0, 0, 0, 0, 0, width - r.shape[1])) for r in rows])
            return pick

        correct = correctness(samples, stacked(list(range(len(samples)))))
        shuffled = correctness(samples, stacked([source[i] for i in range(len(samples))]))
    else:
        correct, shuffled = correctness(samples), None

    by_type = defaultdict(list)
    for i, kind in enumerate(types):
        by_type[kind].append(i)
    result = accuracy_by_question(samples, correct)
    for kind, indices in by_type.items():
        if shuffled is not None:
            result[kind]["shuffled_world"] = sum(shuffled[i] for i in indices) / len(indices)
    if world and ablations and "direction" in by_type:
        direction = [samples[i] for i in by_type["direction"] if reference_answer(samples[i]) in OPPOSITE_DIRECTION]
        flips = correctness([time_reversed(s) for s in direction])
        result["direction"]["reversed_flips"] = sum(flips) / max(len(flips), 1)
    model.train(was_training)
    return result


def accuracy_by_question(samples: list[dict], correct: list[bool]) -> dict:
    """`{question_type: {"accuracy", "ci_low", "ci_high", "majority", "n"}}` of per-sample exact matches."""
    by_type = defaultdict(list)
    for i, sample in enumerate(samples):
        by_type[question_type(sample)].append(i)
    result = {}
    for kind, indices in sorted(by_type.items()):
        hits = sum(correct[i] for i in indices)
        low, high = wilson_interval(hits, len(indices))
        answers = Counter(reference_answer(samples[i]) for i in indices)
        result[kind] = {"accuracy": hits / len(indices), "ci_low": low, "ci_high": high,
                        "majority": answers.most_common(1)[0][1] / len(indices), "n": len(indices)}
    return result


@torch.no_grad()
def evaluate_with_world_latents(model, samples: list[dict], world_latents: list[torch.Tensor], *,
                                batch_size: int = 8, autocast=None) -> dict:
    """`accuracy_by_question` of `model` answering each sample with the given world latents (one `[C, T, h, w]`
    tensor per sample, e.g. from `model.encode_world`, rollout frames included, or with parts of them swapped
    for an ablation) in place of its clip's: the content changes, positions and token count do not."""
    from theworld.data.collator import TheWorldCollator

    was_training = model.training
    model.eval()
    collate = TheWorldCollator(model, world=True, world_pixels=False)
    correct = []
    for start in range(0, len(samples), batch_size):
        batch = _to_device(collate(samples[start : start + batch_size]), model.device)
        rows = world_latents[start : start + batch_size]
        width = max(r.shape[1] for r in rows)
        batch["world_latents"] = torch.stack(
            [torch.nn.functional.pad(r, (0, 0, 0, 0, 0, width - r.shape[1])) for r in rows]).to(model.device)
        correct += answer_scores(model, batch, autocast)[0].tolist()
    model.train(was_training)
    return accuracy_by_question(samples, correct)


def format_table(rows: list[tuple[str, dict]]) -> str:
    """`eval_by_question` results of one or more models as a text table."""
    lines = [f"{'model':<28} {'question':<10} {'n':>5} {'accuracy':>8} {'95% CI':>15} {'majority':>8} "
             f"{'shuffled':>8} {'reversed':>8}"]
    for name, by_question in rows:
        for kind, e in by_question.items():
            shuffled = f"{e['shuffled_world']:.3f}" if "shuffled_world" in e else "-"
            flips = f"{e['reversed_flips']:.3f}" if "reversed_flips" in e else "-"
            lines.append(f"{name[-28:]:<28} {kind:<10} {e['n']:>5} {e['accuracy']:>8.3f} "
                         f"{'[' + format(e['ci_low'], '.3f') + ', ' + format(e['ci_high'], '.3f') + ']':>15} "
                         f"{e['majority']:>8.3f} {shuffled:>8} {flips:>8}")
    return "\n".join(lines)


__all__ = ["evaluate_by_question", "evaluate_with_world_latents", "accuracy_by_question", "wilson_interval",
           "answer_scores", "format_table", "time_reversed", "reference_answer", "OPPOSITE_DIRECTION"]
