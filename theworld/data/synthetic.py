"""Deterministic synthetic tasks whose answers can only be read off the pixels.

- ``SyntheticMotionTask`` (the default of ``python -m theworld.train``): a clip of a coloured square
  moving over a static noisy background. Its direction can only be read *across* frames (the last
  frame's position is drawn independently of the direction), its colour from any frame.
- ``SyntheticWorldTask`` (``--data synthetic-arrow``): one image of an arrow.

The arrow task: each image shows one coloured arrow-shaped triangle in one quadrant of a noisy
background. A sample asks one of three questions about it: what colour it is, where it is, or which
way it points.

In both tasks every answer of a question type is equally likely, so no answer can be guessed from the
text alone better than 1 in 4 (the majority-answer baseline).

Samples are a pure function of ``(seed, split, index)``: the same dataset is rebuilt bit for bit on
every machine, which is what lets ``--resume`` reproduce an uninterrupted run exactly and lets the
tests know which samples the safety guard must block. A known, exact set of samples
(``blocked_fraction`` of them) carries ``safety_worker.tiny.BLOCKED_PHRASE`` in the user text.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 230),
    "yellow": (230, 210, 40),
}
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
DIRECTIONS = ("up", "down", "left", "right")
OPPOSITE = {"up": "down", "down": "up", "left": "right", "right": "left"}
# Pixel step per frame of each direction: (rows, columns).
STEPS = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
MOTION_QUESTIONS = {
    "direction": "Which way is the square moving?",
    "colour": "What colour is the square?",
}
QUESTIONS = {
    "colour": "What colour is the arrow?",
    "position": "Where is the arrow?",
    "direction": "Which way does the arrow point?",
}
SPLITS = ("train", "heldout")


def blocked_phrase() -> str:
    """The phrase the tiny guard always blocks; owned by the safety worker, imported only when needed."""
    from safety_worker.tiny import BLOCKED_PHRASE

    return BLOCKED_PHRASE


def draw_arrow(image_size: int, colour: str, position: str, direction: str, rng: np.random.Generator) -> np.ndarray:
    """Render one scene: an isosceles triangle (the arrow) inside the named quadrant."""
    noise = rng.integers(0, 48, size=(image_size, image_size, 3))
    image = noise.astype(np.uint8)
    half = image_size // 2
    size = max(4, int(half * 0.75))
    # Jitter inside the quadrant so position is a region, not a single pixel pattern.
    slack = half - size
    top = (half if position.startswith("bottom") else 0) + int(rng.integers(0, slack + 1))
    left = (half if position.endswith("right") else 0) + int(rng.integers(0, slack + 1))
    ys, xs = np.mgrid[0:size, 0:size]
    u, v = (ys + 0.5) / size, (xs + 0.5) / size  # row and column in [0, 1]
    # Triangle pointing up: the tip at the top row, the base along the bottom row.
    along, across = {"up": (u, v), "down": (1 - u, v), "left": (v, u), "right": (1 - v, u)}[direction]
    mask = np.abs(across - 0.5) <= along / 2
    patch = image[top : top + size, left : left + size]
    patch[mask] = COLOURS[colour]
    return image


def _blocked_ids(task, size: int) -> frozenset[str]:
    count = round(task.blocked_fraction * size)
    chosen = np.random.default_rng([task.seed, SPLITS.index(task.split), 1]).permutation(size)[:count]
    return frozenset(task.sample_id(int(i)) for i in chosen)


def _check_common(task, questions: dict[str, str]) -> None:
    """Checks both tasks share; ``questions`` are the task's question kinds."""
    unknown = set(task.questions) - set(questions)
    if unknown or not task.questions:
        raise ValueError(f"questions must be a non-empty subset of {tuple(questions)}, got {task.questions}")
    if task.split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {task.split!r}")
    if not 0.0 <= task.blocked_fraction <= 1.0:
        raise ValueError(f"blocked_fraction must be in [0, 1], got {task.blocked_fraction}")
    if task.image_size < 16:
        raise ValueError(f"image_size must be at least 16 pixels, got {task.image_size}")


class _BlockedSet:
    """The exact, seeded set of samples whose text carries the tiny guard's blocked phrase."""

    @property
    def blocked_ids(self) -> frozenset[str]:
        """Ids of the samples whose text the tiny guard must block."""
        return _blocked_ids(self, self.size)

    def _blocked_set(self) -> frozenset[str]:
        # Cached per instance: the set is derived from a permutation of `size` indices.
        cache = self.__dict__.get("_blocked_cache")
        if cache is None:
            cache = self.blocked_ids
            object.__setattr__(self, "_blocked_cache", cache)
        return cache

    def __len__(self) -> int:
        return self.size

    def _rng(self, index: int, stream: int) -> np.random.Generator:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} samples")
        return np.random.default_rng([self.seed, SPLITS.index(self.split), stream, index])

    def _sample(self, index: int, question: str, kind: str, answer: str, images: list) -> dict:
        """One sample in the training format; a blocked sample's question carries the guard's phrase."""
        sample_id = self.sample_id(index)
        if sample_id in self._blocked_set():
            question = f"{question} {blocked_phrase()}"
        return {
            "id": sample_id,
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
            ],
            "images": images,
            "question_type": kind,
            "answer": answer,
        }


def draw_motion_clip(image_size: int, num_frames: int, colour: str, direction: str, square: int,
                     rng: np.random.Generator) -> list[np.ndarray]:
    """A square moving one pixel per frame in ``direction`` over a static noisy background.

    The last frame's position is uniform over the positions from which every direction's first frame
    is still inside the image, so the last frame alone says nothing about the direction.
    """
    travel = num_frames - 1
    low, high = travel, image_size - square - travel  # inclusive range of the last frame's top/left
    if high < low:
        raise ValueError(f"a {num_frames}-frame clip of a {square}px square needs images of at least "
                         f"{square + 2 * travel}px, got {image_size}")
    background = rng.integers(0, 48, size=(image_size, image_size, 3)).astype(np.uint8)
    last_top, last_left = (int(v) for v in rng.integers(low, high + 1, size=2))
    step_y, step_x = STEPS[direction]
    frames = []
    for t in range(num_frames):
        back = travel - t  # frames before the last one
        top, left = last_top - step_y * back, last_left - step_x * back
        frame = background.copy()
        frame[top : top + square, left : left + square] = COLOURS[colour]
        frames.append(frame)
    return frames


@dataclass(frozen=True)
class SyntheticMotionTask(_BlockedSet):
    """One split of the synthetic motion task, indexable like a map-style dataset.

    Each sample is a clip of ``num_frames`` frames (oldest first) of a square of one of four colours
    moving up, down, left or right by one pixel per frame over a static noisy background, and one
    question: its direction of motion (answerable only across frames: the last frame's position is
    drawn independently of the direction) or its colour (a control, answerable from the last frame).

    Args:
        split: ``"train"`` or ``"heldout"``; the two splits draw from disjoint random streams.
        size: number of samples.
        seed: the task seed; the same seed rebuilds the same samples everywhere.
        num_frames: frames per clip; the Cosmos VAE takes ``1 + 4k`` (9 gives 3 latent frames).
        image_size: side of the square frames in pixels.
        square: side of the moving square in pixels.
        blocked_fraction: fraction of samples whose user text carries the tiny guard's blocked phrase;
            exactly ``round(blocked_fraction * size)`` samples, listed by ``blocked_ids``.
        questions: which question kinds to ask, a subset of ``MOTION_QUESTIONS``.

    Each sample is ``{"id", "images": [F uint8 HxWx3 frames], "messages", "question_type", "answer"}``.
    """

    split: str = "train"
    size: int = 2048
    seed: int = 0
    num_frames: int = 9
    image_size: int = 32
    square: int = 6
    blocked_fraction: float = 0.0
    questions: tuple[str, ...] = tuple(MOTION_QUESTIONS)

    def __post_init__(self):
        _check_common(self, MOTION_QUESTIONS)
        if self.num_frames < 2:
            raise ValueError(f"num_frames must be at least 2 (motion needs two frames), got {self.num_frames}")
        if self.image_size < self.square + 2 * (self.num_frames - 1):
            raise ValueError(f"image_size {self.image_size} is too small for a {self.num_frames}-frame clip of a "
                             f"{self.square}px square: use at least {self.square + 2 * (self.num_frames - 1)}")

    def sample_id(self, index: int) -> str:
        return f"motion-{self.split}-{index:06d}"

    def __getitem__(self, index: int) -> dict:
        rng = self._rng(index, 2)
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        direction = DIRECTIONS[rng.integers(len(DIRECTIONS))]
        kind = self.questions[rng.integers(len(self.questions))]
        frames = draw_motion_clip(self.image_size, self.num_frames, colour, direction, self.square, rng)
        answer = {"colour": colour, "direction": direction}[kind]
        return self._sample(index, MOTION_QUESTIONS[kind], kind, answer, frames)


@dataclass(frozen=True)
class SyntheticWorldTask(_BlockedSet):
    """One split of the synthetic world task, indexable like a map-style dataset.

    Args:
        split: ``"train"`` or ``"heldout"``; the two splits draw from disjoint random streams.
        size: number of samples.
        seed: the task seed; the same seed rebuilds the same samples everywhere.
        image_size: side of the square images in pixels (a multiple of 16 keeps the Cosmos VAE happy).
        blocked_fraction: fraction of samples whose user text carries the tiny guard's blocked phrase;
            exactly ``round(blocked_fraction * size)`` samples, listed by ``blocked_ids``.
        questions: which question kinds to ask, a subset of ``QUESTIONS``.
    """

    split: str = "train"
    size: int = 2048
    seed: int = 0
    image_size: int = 32
    blocked_fraction: float = 0.0
    questions: tuple[str, ...] = tuple(QUESTIONS)

    def __post_init__(self):
        _check_common(self, QUESTIONS)

    def sample_id(self, index: int) -> str:
        return f"synthetic-{self.split}-{index:06d}"

    def __getitem__(self, index: int) -> dict:
        rng = self._rng(index, 0)
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        position = POSITIONS[rng.integers(len(POSITIONS))]
        direction = DIRECTIONS[rng.integers(len(DIRECTIONS))]
        kind = self.questions[rng.integers(len(self.questions))]
        image = draw_arrow(self.image_size, colour, position, direction, rng)
        answer = {"colour": colour, "position": position, "direction": direction}[kind]
        return self._sample(index, QUESTIONS[kind], kind, answer, [image])
