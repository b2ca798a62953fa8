"""A deterministic synthetic "world" task whose answers can only be read off the image.

Each image shows one coloured arrow-shaped triangle in one quadrant of a noisy background. A sample
asks one of three questions about it: what colour it is, where it is, or which way it points. The
answer vocabulary is tiny (12 short answers), so a tiny model learns the task in a few hundred CPU
steps, yet no answer can be guessed from the text alone better than 1 in 4.

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


@dataclass(frozen=True)
class SyntheticWorldTask:
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
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if not 0.0 <= self.blocked_fraction <= 1.0:
            raise ValueError(f"blocked_fraction must be in [0, 1], got {self.blocked_fraction}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be at least 16 pixels, got {self.image_size}")
        unknown = set(self.questions) - set(QUESTIONS)
        if unknown or not self.questions:
            raise ValueError(f"questions must be a non-empty subset of {tuple(QUESTIONS)}, got {self.questions}")

    def __len__(self) -> int:
        return self.size

    @property
    def blocked_ids(self) -> frozenset[str]:
        """Ids of the samples whose text the tiny guard must block."""
        count = round(self.blocked_fraction * self.size)
        chosen = np.random.default_rng([self.seed, SPLITS.index(self.split), 1]).permutation(self.size)[:count]
        return frozenset(self.sample_id(int(i)) for i in chosen)

    def sample_id(self, index: int) -> str:
        return f"synthetic-{self.split}-{index:06d}"

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} samples")
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), 0, index])
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        position = POSITIONS[rng.integers(len(POSITIONS))]
        direction = DIRECTIONS[rng.integers(len(DIRECTIONS))]
        kind = self.questions[rng.integers(len(self.questions))]
        image = draw_arrow(self.image_size, colour, position, direction, rng)
        answer = {"colour": colour, "position": position, "direction": direction}[kind]
        sample_id = self.sample_id(index)
        question = QUESTIONS[kind]
        if sample_id in self._blocked_set():
            question = f"{question} {blocked_phrase()}"
        return {
            "id": sample_id,
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
            ],
            "images": [image],
        }

    def _blocked_set(self) -> frozenset[str]:
        # Cached per instance: the set is derived from a permutation of `size` indices.
        cache = self.__dict__.get("_blocked_cache")
        if cache is None:
            cache = self.blocked_ids
            object.__setattr__(self, "_blocked_cache", cache)
        return cache
