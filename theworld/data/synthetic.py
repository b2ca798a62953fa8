"""Deterministic synthetic tasks whose answers can only be read off the pixels.

- ``SyntheticMotionTask`` (the default of ``python -m theworld.train``): a clip of a coloured square
  moving over a static noisy background. Its direction can only be read *across* frames (the last
  frame's position is drawn independently of the direction), its colour from any frame; the forecast
  question ("future", not asked by default) needs the last position *and* the motion.
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
    "future": "Where will the square be {frames} frames after the last one?",
}
# What SyntheticMotionTask asks unless told otherwise: the forecast question is opt-in, so the default
# task (and every run, cache and result built on it) stays what it was before "future" existed.
DEFAULT_MOTION_QUESTIONS = ("direction", "colour")
# The forecast question's answers name a point of the half-cell grid, like a chessboard square: a column
# letter (left to right) and a row number (top to bottom), e.g. "C5" (see `forecast_cell`).
FORECAST_COLUMNS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
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
                     rng: np.random.Generator, cell: int = 8, background: int = 4) -> list[np.ndarray]:
    """A square moving one pixel per frame in ``direction`` over a static noisy background, on a torus.

    The scene wraps around: a square that leaves one edge re-enters at the opposite one. The last frame's
    top/left is drawn uniformly from a lattice of ``cell``-pixel steps (the square centred in its cell),
    whatever the direction, so the last frame alone says nothing about the direction; on a torus the
    first frame's position is uniform over the same lattice too when the clip travels a multiple of
    ``cell`` pixels, and a time-reversed clip is then exactly a clip of the opposite direction that the
    task draws as well. Background pixels are uniform in ``[0, background)``.
    """
    return _motion_clip(image_size, num_frames, colour, direction, square, rng, cell, background)[0]


def _motion_clip(image_size: int, num_frames: int, colour: str, direction: str, square: int,
                 rng: np.random.Generator, cell: int, background: int,
                 future_frames: int = 0) -> tuple[list[np.ndarray], tuple[int, int]]:
    """``draw_motion_clip``'s frames and the last frame's top/left (the forecast question's start), followed by
    ``future_frames`` frames of the motion continued (drawn from the same random draws)."""
    background_pixels, last = _motion_scene(image_size, square, rng, cell, background)
    step = STEPS[direction]
    path = _straight_path(last, step, num_frames)
    path += [(last[0] + step[0] * k, last[1] + step[1] * k) for k in range(1, future_frames + 1)]
    return _draw_square_path(background_pixels, colour, square, path), last


def _motion_scene(image_size: int, square: int, rng: np.random.Generator, cell: int,
                  background: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The static background and the last frame's top/left of one motion clip, drawn from ``rng``."""
    background_pixels = rng.integers(0, background, size=(image_size, image_size, 3)).astype(np.uint8)
    offset = (cell - square) // 2
    last_top, last_left = (int(v) * cell + offset for v in rng.integers(0, image_size // cell, size=2))
    return background_pixels, (last_top, last_left)


def _straight_path(last: tuple[int, int], step: tuple[int, int], num_frames: int) -> list[tuple[int, int]]:
    """Top/left of each of ``num_frames`` frames moving by ``step`` per frame and ending at ``last``."""
    travel = num_frames - 1
    return [(last[0] - step[0] * (travel - t), last[1] - step[1] * (travel - t)) for t in range(num_frames)]


def _draw_square_path(background_pixels: np.ndarray, colour: str, square: int,
                      path: list[tuple[int, int]]) -> list[np.ndarray]:
    """One frame per top/left of ``path``: the square over the background, wrapped around the edges."""
    image_size = background_pixels.shape[0]
    span = np.arange(square)
    frames = []
    for top, left in path:
        frame = background_pixels.copy()
        frame[np.ix_((top + span) % image_size, (left + span) % image_size)] = COLOURS[colour]
        frames.append(frame)
    return frames


def forecast_cell(top: int, left: int, image_size: int, square: int, cell: int = 8) -> str:
    """Where a square at ``top``/``left``, half a cell off the lattice along one axis, is: the forecast
    question's answer (its square is there ``cell // 2`` frames after the last one).

    Its centre then lies on the midpoint of an edge of the ``cell``-pixel grid. The answer names that point
    on the grid of half cells: ``a``, the centre's column in half cells, as a letter (``A`` the scene's left
    edge) and ``b``, its row, as a number (``1`` the top edge): ``"C5"`` is ``a = 2``, ``b = 4``. From a last
    cell the four directions lead to four different points, so the last frame alone narrows the answer to 4
    of the 32 points of a 32-px scene (1 in 4) and the motion alone to the 16 points on grid lines of one
    orientation; both together give it. The answer is the future position itself, each coordinate a monotone
    function of the square's: a model that sees the future frame (or a correct rollout of it) reads it off.

    An earlier answer set (zones A-D with the four moves from every cell in four different zones) kept
    every single-frame probe at 1 in 4, but a zone is a pattern of the position that repeats every cell or
    two, and even the oracle arm, which sees the future frame, reached only 36.0 % on it in 1200 steps of
    4096 labelled samples (majority 28.0 %; docs/imagination.md).
    """
    half = cell // 2
    offset = (cell - square) // 2
    a, b = ((left - offset) % image_size) // half, ((top - offset) % image_size) // half
    return f"{FORECAST_COLUMNS[a]}{b + 1}"


# What the square does after the observed frames in the counterfactual rollout evaluation: its step per
# frame as a function of its step so far (rows, columns; rows grow downwards). "continues" is the truth.
CONTINUATIONS = {
    "continues": lambda dy, dx: (dy, dx),
    "stops": lambda dy, dx: (0, 0),
    "reverses": lambda dy, dx: (-dy, -dx),
    "turns left": lambda dy, dx: (-dx, dy),
    "turns right": lambda dy, dx: (dx, -dy),
}


@dataclass(frozen=True)
class SyntheticMotionTask(_BlockedSet):
    """One split of the synthetic motion task, indexable like a map-style dataset.

    Each sample is a clip of ``num_frames`` frames (oldest first) of a square of one of four colours
    moving up, down, left or right by one pixel per frame over a static noisy background, and one
    question: its direction of motion (answerable only across frames: the last frame's position is
    drawn independently of the direction), its colour (a control, answerable from the last frame) or,
    when ``questions`` includes ``"future"``, the forecast: where (a point of the half-cell grid such as
    ``"C5"``, see ``forecast_cell``) the square will be ``forecast_frames`` (half a cell: 4) frames after the
    last one, were it to move on. Every answer is equally likely; the last position alone leaves 4 of them
    (one per direction), the direction alone 16, both together give it, and 4 frames are one Cosmos
    latent frame, so a correct one-step rollout shows it.

    The scene is a torus (the square leaving one edge re-enters at the other) and the last frame's
    top/left lies on a lattice of ``cell`` pixels, uniform over it. With the default 9 frames the square
    travels 8 px, one cell, so the first frame is uniform over the same lattice and a time-reversed clip
    is exactly a clip this task draws (the opposite direction, ending where the original started):
    neither the first nor the last frame alone says anything about the direction (a middle frame's
    offset from the lattice does; docs/imagination.md), and reading a reversed clip needs nothing the
    model was not trained on. Why a lattice of 8 px and a faint background (pixels in ``[0, 4)``; was
    ``[0, 48)``): the tiny Cosmos VAE downsamples by 8 and mixes every pixel into every latent cell (a
    square in one cell changes all 16 cells' latents), so motion at arbitrary sub-cell positions, or a
    per-clip background at the square's scale, make the latents of one motion unlike each other.
    Measured with a readout like the projector's on cached latents (whitened, 400 steps of 16 direction
    samples, 512 held-out clips): torus with positions anywhere 22 %, lattice with background
    ``[0, 48)`` 38 %, ``[0, 16)`` 86 %, ``[0, 8)`` 98 %, none 99.8 %. The previous task (no wrap, last
    position in ``[8, 18]``) leaked the direction through the *first* frame: a ridge probe on the first
    latent frame alone read it 82 % of the time, and reversed clips, whose first frame is the original's
    last, flipped 24 %.

    Args:
        split: ``"train"`` or ``"heldout"``; the two splits draw from disjoint random streams.
        size: number of samples.
        seed: the task seed; the same seed rebuilds the same samples everywhere.
        num_frames: frames per clip; the Cosmos VAE takes ``1 + 4k`` (9 gives 3 latent frames).
        image_size: side of the square frames in pixels, a multiple of ``cell``.
        square: side of the moving square in pixels, at most ``cell``.
        cell: spacing of the lattice the last frame's top/left is drawn from (the VAE's 8 px latent cell).
        background: background pixels are uniform in ``[0, background)``, static over the clip.
        blocked_fraction: fraction of samples whose user text carries the tiny guard's blocked phrase;
            exactly ``round(blocked_fraction * size)`` samples, listed by ``blocked_ids``.
        questions: which question kinds to ask, a subset of ``MOTION_QUESTIONS``; default
            ``DEFAULT_MOTION_QUESTIONS`` (direction and colour: the samples are those of the task before
            the forecast question existed, bit for bit). ``"future"`` needs an even ``cell - square`` and
            at most 26 half cells per side (one letter per column of its answers).
        oracle_frames: append this many frames of the motion continued (the true future) to every clip, the
            question and answer unchanged (those of the ``num_frames`` observed frames): the *oracle* arm of
            ``scripts/eval_imagination.py``, whose world tokens see the future a one-step rollout predicts.
            Gemma still sees the last observed frame (the sample's ``gemma_frame``), as in the other arms.
            Default 0: the clip as observed.
        question_weights: how often each of ``questions`` is asked, relative to the others. Default: the
            held-out split asks each equally often (each type is measured on as many samples as the
            other); the training split asks the direction three times as often as the colour
            (``TRAIN_QUESTION_WEIGHTS``): the direction is the hard question and the colour is learnt
            from the image anyway. Measured with an ad-hoc in-process loop at the trainer's defaults (1200 steps of 16, seeds 1-3):
            direction 77 / 62 / 87 % with equal shares, 96 / 98 / 98 % with 3 : 1; colour 100 % in both
            (seeds 0-6 with 3 : 1 in docs/training.md: five of seven learn the direction). The forecast
            question, when asked, gets the direction's weight, 3 (by analogy, not measured yet).

    Each sample is ``{"id", "images": [F uint8 HxWx3 frames], "messages", "question_type", "answer"}``.
    """

    TRAIN_QUESTION_WEIGHTS = {"direction": 3.0, "colour": 1.0, "future": 3.0}

    split: str = "train"
    size: int = 2048
    seed: int = 0
    num_frames: int = 9
    image_size: int = 32
    square: int = 6
    blocked_fraction: float = 0.0
    questions: tuple[str, ...] = DEFAULT_MOTION_QUESTIONS
    cell: int = 8
    background: int = 4
    question_weights: tuple[float, ...] | None = None
    oracle_frames: int = 0

    def __post_init__(self):
        _check_common(self, MOTION_QUESTIONS)
        if len(set(self.questions)) != len(self.questions):
            raise ValueError(f"questions must be distinct (weight them with question_weights), got {self.questions}")
        weights = self.question_weights
        if weights is not None and (len(weights) != len(self.questions) or min(weights) < 0 or sum(weights) <= 0):
            raise ValueError(f"question_weights must be one weight >= 0 per question of {self.questions} with a "
                             f"positive sum, got {weights}")
        if self.num_frames < 2:
            raise ValueError(f"num_frames must be at least 2 (motion needs two frames), got {self.num_frames}")
        if not 1 <= self.square <= self.cell:
            raise ValueError(f"square must be between 1 and cell={self.cell} pixels, got {self.square}")
        if self.image_size % self.cell:
            raise ValueError(f"image_size must be a multiple of cell={self.cell}, got {self.image_size}")
        if not 1 <= self.background <= 256:
            raise ValueError(f"background must be between 1 and 256, got {self.background}")
        if "future" in self.questions and (2 * self.image_size // self.cell > len(FORECAST_COLUMNS)
                                           or (self.cell - self.square) % 2):
            raise ValueError(f"the 'future' question needs at most {len(FORECAST_COLUMNS)} half cells per side "
                             f"(image_size <= {len(FORECAST_COLUMNS) * self.cell // 2}) and an even cell - square "
                             f"(its answers are points of the half-cell grid, one letter per column), got "
                             f"image_size={self.image_size}, cell={self.cell}, square={self.square}")
        # On a torus a clip must travel less than half way round: otherwise the shorter way from its first
        # position to its last is not its direction of motion.
        if 2 * (self.num_frames - 1) >= self.image_size:
            raise ValueError(f"image_size {self.image_size} is too small for a {self.num_frames}-frame clip: the "
                             f"square would travel half way round the wrapped scene or more; use at least "
                             f"{2 * (self.num_frames - 1) + self.cell - (2 * (self.num_frames - 1)) % self.cell}")

    @property
    def reversal_in_distribution(self) -> bool:
        """Whether every time-reversed clip is exactly a clip the task draws (travel a multiple of ``cell``)."""
        return (self.num_frames - 1) % self.cell == 0

    @property
    def question_shares(self) -> dict[str, float]:
        """The probability of each question kind in this split (see ``question_weights``)."""
        if self.question_weights is not None:
            weights = self.question_weights
        elif self.split == "train":
            weights = [self.TRAIN_QUESTION_WEIGHTS[q] for q in self.questions]
        else:
            weights = [1.0] * len(self.questions)
        return {q: w / sum(weights) for q, w in zip(self.questions, weights)}

    @property
    def forecast_frames(self) -> int:
        """How many frames after the last one the forecast question asks about: half a cell, so the square
        is then off the lattice along its axis of motion, centred on a cell edge (see ``forecast_cell``)."""
        return self.cell // 2

    def sample_id(self, index: int) -> str:
        return f"motion-{self.split}-{index:06d}"

    def __getitem__(self, index: int) -> dict:
        rng = self._rng(index, 2)
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        direction = DIRECTIONS[rng.integers(len(DIRECTIONS))]
        kind = self.questions[rng.choice(len(self.questions), p=list(self.question_shares.values()))]
        frames, last = _motion_clip(self.image_size, self.num_frames, colour, direction, self.square, rng,
                                    self.cell, self.background, self.oracle_frames)
        if kind == "future":
            step = STEPS[direction]
            ahead = self.forecast_frames
            answer = forecast_cell(last[0] + step[0] * ahead, last[1] + step[1] * ahead, self.image_size,
                                   self.square, self.cell)
        else:
            answer = {"colour": colour, "direction": direction}[kind]
        question = MOTION_QUESTIONS[kind].format(frames=self.forecast_frames)
        sample = self._sample(index, question, kind, answer, frames)
        if self.oracle_frames:  # the future is the world path's; Gemma keeps the last observed frame
            sample["gemma_frame"] = self.num_frames - 1
        return sample

    def counterfactual_clips(self, index: int, future_frames: int = 4) -> dict[str, list[np.ndarray]]:
        """Sample ``index``'s clip and its alternatives: ``{continuation: frames}`` for every key of
        ``CONTINUATIONS``, each ``num_frames`` frames long. The first ``num_frames - future_frames`` frames are
        the sample's own in every clip; after them the square continues (exactly the sample's clip), stops,
        reverses, turns left or turns right, over the same background. With the default 9 frames and 4
        future frames the observed part is 2 Cosmos latent frames and the future 1 (the Wan VAE is causal,
        so the observed latents are the same in all five clips)."""
        if not 1 <= future_frames < self.num_frames:
            raise ValueError(f"future_frames must be between 1 and num_frames - 1 = {self.num_frames - 1}, "
                             f"got {future_frames}")
        rng = self._rng(index, 2)  # replays __getitem__'s draws in the same order
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        direction = DIRECTIONS[rng.integers(len(DIRECTIONS))]
        rng.choice(len(self.questions), p=list(self.question_shares.values()))
        background_pixels, last = _motion_scene(self.image_size, self.square, rng, self.cell, self.background)
        step = STEPS[direction]
        observed = _straight_path(last, step, self.num_frames)[: self.num_frames - future_frames]
        clips = {}
        for name, turn in CONTINUATIONS.items():
            dy, dx = turn(*step)
            top, left = observed[-1]
            future = [(top + dy * k, left + dx * k) for k in range(1, future_frames + 1)]
            clips[name] = _draw_square_path(background_pixels, colour, self.square, observed + future)
        return clips


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
