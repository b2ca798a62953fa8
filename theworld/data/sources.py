"""Where training samples come from: JSONL files, datasets saved with ``datasets``, and the order
in which the trainer reads them.

All sources yield samples in the one format the collator consumes::

    {"id": str, "messages": [...chat messages, images as {"type": "image"}...],
     "images": [np.ndarray uint8 HxWx3, ...]}

JSONL format (one sample per line; image paths relative to the JSONL file's folder or absolute; a
video is a list of frame paths, all frames the same size)::

    {"id": "cat-001", "images": ["images/cat-001-0.png"],
     "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "a cat"}]}]}

``images`` may also name one video file (``.mp4``, ``.webm``, ``.avi``, ``.mov``, ``.mkv``, ``.gif``):
its frames are the clip. A clip has ``1 + 4k`` frames of one size.

A sample that cannot be trained on (a file missing or undecodable, frames of mixed sizes, a wrong
frame count, malformed ``messages``) raises ``BadSample`` with a reason a person understands; the
trainer ledgers it and goes on. A problem with the data as a whole (no such file, not JSONL, an
unknown column) raises ``DataError`` before training starts.
"""
from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mov", ".mkv", ".gif")


class DataError(ValueError):
    """The data as a whole cannot be read (no such file or shard, not JSONL, an unknown column): a
    start-up error, reported as one line before training starts."""


class BadSample(ValueError):
    """One sample cannot be trained on; ``reason`` says why in words a person understands.

    The trainer ledgers it in ``errors.jsonl`` (``"kind": "data"``) and reads on."""

    def __init__(self, reason: str, sample_id: str | None = None):
        super().__init__(reason)
        self.reason, self.sample_id = reason, sample_id


def read_image(source, name: str) -> np.ndarray:
    """An image file (a path, or its encoded bytes) as a uint8 ``HxWx3`` array; ``BadSample`` if it is
    missing or cannot be decoded. ``name`` is what the reason calls it."""
    import io

    try:
        with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as opened:
            return np.asarray(opened.convert("RGB"))
    except FileNotFoundError:
        raise BadSample(f"image file not found: {name}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        detail = "not an image format PIL can read" if isinstance(e, UnidentifiedImageError) else str(e)
        raise BadSample(f"cannot decode image: {name} ({detail})") from None


def read_video(source, name: str) -> list[np.ndarray]:
    """A video file (a path, or its encoded bytes with ``name``'s extension) as uint8 ``HxWx3`` frames."""
    import imageio.v3 as iio

    extension = Path(name).suffix.lower()
    if not isinstance(source, (bytes, bytearray)) and not Path(source).is_file():
        raise BadSample(f"video file not found: {name}")
    try:
        frames = iio.imread(source, extension=extension, plugin=None if extension == ".gif" else "FFMPEG")
    except Exception as e:  # ffmpeg and the gif reader raise several types for a broken file
        raise BadSample(f"cannot decode video: {name} ({type(e).__name__})") from None
    frames = np.asarray(frames)
    if frames.ndim == 3:  # a one-frame gif
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] < 3:
        raise BadSample(f"cannot decode video: {name} (frames of shape {frames.shape[1:]})")
    return [np.ascontiguousarray(frame[..., :3]) for frame in frames]


def is_video_name(name: str) -> bool:
    return Path(str(name)).suffix.lower() in VIDEO_EXTENSIONS


def messages_problem(messages) -> str | None:
    """Why ``messages`` are not chat messages the trainer can use, or None when they are."""
    if isinstance(messages, str):
        return "messages is a string, not a list of chat messages ({\"role\", \"content\"} objects)"
    if not isinstance(messages, list) or not messages:
        return f"messages must be a non-empty list of chat messages, got {type(messages).__name__}"
    images = 0
    for k, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) or "content" not in message:
            return f"message {k} is not a {{\"role\", \"content\"}} object"
        content = message["content"]
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            return f"message {k}: content must be a string or a list of parts, got {type(content).__name__}"
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") not in ("text", "image"):
                return f'message {k}: each content part must be {{"type": "text", "text": ...}} or {{"type": "image"}}'
            if part["type"] == "image":
                images += 1
            elif not isinstance(part.get("text"), str):
                return f"message {k}: a text part without a string \"text\""
    if images != 1:
        return f'the messages need exactly one {{"type": "image"}} (where the clip goes), found {images}'
    if messages[-1]["role"] != "assistant":
        return "the last message must be the assistant's answer (the text trained on)"
    return None


def check_sample(sample: dict) -> dict:
    """``sample`` if the trainer can use it, else ``BadSample``: chat messages with one image slot and a
    final answer, and a clip of ``1 + 4k`` frames of one size."""
    from theworld.configuration_theworld import check_clip_length

    problem = messages_problem(sample["messages"])
    if problem:
        raise BadSample(f"malformed messages: {problem}", sample["id"])
    frames = sample["images"]
    if not frames:
        raise BadSample("the sample has no images", sample["id"])
    sizes = sorted({f"{frame.shape[1]}x{frame.shape[0]}" for frame in frames})
    if len(sizes) > 1:
        raise BadSample(f"frames of mixed sizes in one clip ({', '.join(sizes)}): a clip needs one size", sample["id"])
    try:
        check_clip_length(len(frames))
    except ValueError as e:
        raise BadSample(f"wrong frame count: {e}", sample["id"]) from None
    return sample


def as_rgb_array(image) -> np.ndarray:
    """A PIL image, a path or an ``HxWx3`` array as a C-contiguous uint8 ``HxWx3`` array."""
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as opened:
            return np.asarray(opened.convert("RGB"))
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"images must be uint8 HxWx3 arrays, got dtype {array.dtype} and shape {array.shape}")
    return np.ascontiguousarray(array)


def user_assistant_messages(question: str, answer: str, num_images: int = 1) -> list[dict]:
    """The chat messages of a single-turn sample: images, then the question; the answer as the reply."""
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": question}]
    return [
        {"role": "user", "content": content},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]


def sample_text(sample: Mapping) -> str:
    """All text of a sample (every turn, every role), as the safety guard should see it."""
    parts = []
    for message in sample["messages"]:
        content = message["content"]
        if isinstance(content, str):
            parts.append(content)
            continue
        parts.extend(item["text"] for item in content if item.get("type") == "text")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------- JSONL


def write_jsonl(samples, path: str | os.PathLike, image_dir: str = "images") -> Path:
    """Write samples as JSONL plus one PNG per image under ``image_dir`` (relative to the file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / image_dir).mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        for sample in samples:
            stem = re.sub(r"[^A-Za-z0-9._-]", "_", sample["id"])
            rel_paths = []
            for k, image in enumerate(sample["images"]):
                rel = f"{image_dir}/{stem}-{k}.png"
                Image.fromarray(as_rgb_array(image)).save(path.parent / rel)
                rel_paths.append(rel)
            record = {"id": sample["id"], "images": rel_paths, "messages": sample["messages"]}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """``(line number, record)`` for each non-blank line; a line that is not JSON raises naming it."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e})") from None


def read_clip(images, base: Path) -> list[np.ndarray]:
    """The frames ``images`` names: image paths (one per frame) or one video path, relative to ``base``."""
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not images or not all(isinstance(p, str) for p in images):
        raise BadSample('"images" must be a list of image paths (one per frame) or one video path')
    if len(images) == 1 and is_video_name(images[0]):
        return read_video(base / images[0], images[0])
    if any(is_video_name(p) for p in images):
        raise BadSample('a video must be the only entry of "images" (its frames are the clip)')
    return [read_image(base / p, p) for p in images]


class JsonlDataset:
    """A map-style dataset over a JSONL file read as a stream: an index of line offsets, not a list of
    records. A line is parsed, and its images or video decoded, only when the sample is accessed.

    Raises ``DataError`` at once when the file does not exist or its first line is not a JSON object;
    a bad line later in the file is a ``BadSample`` when accessed (``id`` then ``FILE:LINE`` if it has none).
    """

    def __init__(self, path: str | os.PathLike):
        from array import array

        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: no such file")
        starts, line_numbers = array("q"), array("q")
        offset = 0
        with open(self.path, "rb") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    starts.append(offset)
                    line_numbers.append(line_no)
                offset += len(line)
        self.starts, self.line_numbers = np.frombuffer(starts, np.int64), np.frombuffer(line_numbers, np.int64)
        if not len(self.starts):
            raise DataError(f"{self.path}: the file has no samples (no non-blank line)")
        try:
            first = json.loads(self._line(0))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{self.path} is not JSONL: line {self.line_numbers[0]} is not JSON ({e})") from None
        if not isinstance(first, dict):
            raise DataError(f"{self.path} is not JSONL of samples: line {self.line_numbers[0]} is not a JSON object")

    def _line(self, index: int) -> bytes:
        with open(self.path, "rb") as f:  # one open per sample: safe from any thread
            f.seek(int(self.starts[index]))
            return f.readline()

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> dict:
        where = f"{self.path.name}:{self.line_numbers[index]}"
        try:
            record = json.loads(self._line(index))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadSample(f"line {self.line_numbers[index]} is not valid JSON ({e})", where) from None
        if not isinstance(record, dict):
            raise BadSample(f"line {self.line_numbers[index]} is not a JSON object", where)
        sample_id = str(record["id"]) if record.get("id") is not None else where
        missing = {"messages", "images"} - set(record)
        if missing:
            raise BadSample(f"missing keys {sorted(missing)}: each line needs \"id\", \"images\" (image or frame "
                            "paths, or one video path) and \"messages\"", sample_id)
        try:
            images = read_clip(record["images"], self.path.parent)
        except BadSample as e:
            raise BadSample(e.reason, sample_id) from None
        return check_sample({"id": sample_id, "messages": record["messages"], "images": images})


# ------------------------------------------------------------------------- datasets.load_from_disk

DEFAULT_COLUMNS = {"id": "id", "images": "images", "messages": "messages", "question": "question", "answer": "answer"}


def parse_columns(spec: str | Mapping[str, str] | None) -> dict[str, str]:
    """``"images=img,question=prompt"`` → the default column mapping with those entries replaced."""
    columns = dict(DEFAULT_COLUMNS)
    if not spec:
        return columns
    items = spec.items() if isinstance(spec, Mapping) else (part.split("=", 1) for part in spec.split(",") if part)
    for key, value in items:
        key = key.strip()
        if key not in DEFAULT_COLUMNS:
            raise DataError(f"unknown column role {key!r} in --data-columns (data_columns); the roles are {sorted(DEFAULT_COLUMNS)}")
        columns[key] = value.strip()
    return columns


def check_columns(names, columns: dict[str, str], where: str) -> bool:
    """Whether the mapped columns include ``messages`` (else ``question`` and ``answer``); ``DataError``
    naming the columns that exist when the image column or the text columns are missing."""
    names = set(names)
    if columns["images"] not in names:
        raise DataError(f"{where} has no image column {columns['images']!r} (columns: {sorted(names)}); "
                        "map it with --data-columns (data_columns in a config file), e.g. --data-columns images=image")
    if columns["messages"] in names:
        return True
    if not {columns["question"], columns["answer"]} <= names:
        raise DataError(f"{where} needs a messages column or question and answer columns (columns: {sorted(names)}); "
                        "map them with --data-columns (data_columns in a config file), e.g. --data-columns question=prompt,answer=label")
    return False


def _row_frame(item, base: Path | None) -> list[np.ndarray]:
    """The frames of one entry of an image column: a PIL image, an array, a path, encoded bytes, or
    ``{"bytes", "path"}`` as ``datasets`` stores undecoded images and videos (a video by its extension)."""
    if isinstance(item, Mapping):
        data, name = item.get("bytes"), item.get("path") or "<bytes>"
        if data is None:
            item = name
        elif is_video_name(name):
            return read_video(data, name)
        else:
            return [read_image(data, name)]
    if isinstance(item, (bytes, bytearray)):
        return [read_image(item, "<bytes>")]
    if isinstance(item, (str, os.PathLike)):
        path = Path(item) if base is None or Path(item).is_absolute() else base / item
        return read_video(path, str(item)) if is_video_name(item) else [read_image(path, str(item))]
    try:
        return [as_rgb_array(item)]
    except ValueError as e:
        raise BadSample(f"cannot use image: {e}") from None


def sample_from_row(row: Mapping, columns: dict[str, str], has_messages: bool, default_id: str,
                    base: Path | None = None) -> dict:
    """A table row (``save_to_disk``, parquet) as a checked sample; ``BadSample`` if it is not usable.

    ``messages`` may be chat messages or their JSON text; relative image paths are under ``base``."""
    sample_id = row.get(columns["id"])
    sample_id = default_id if sample_id is None else str(sample_id)
    try:
        raw = row[columns["images"]]
        if raw is None:
            raise BadSample("the sample has no images")
        frames = [frame for item in (raw if isinstance(raw, (list, tuple)) else [raw]) for frame in _row_frame(item, base)]
        if has_messages:
            messages = row[columns["messages"]]
            if isinstance(messages, (str, bytes)):
                try:
                    messages = json.loads(messages)
                except json.JSONDecodeError as e:
                    raise BadSample(f"malformed messages: not valid JSON ({e})") from None
        else:
            messages = user_assistant_messages(str(row[columns["question"]]), str(row[columns["answer"]]))
    except BadSample as e:
        raise BadSample(e.reason, sample_id) from None
    return check_sample({"id": sample_id, "messages": messages, "images": frames})


class DiskDataset:
    """Any Hugging Face dataset saved with ``save_to_disk``, mapped to the sample format.

    Columns (renamed with ``columns``, see ``parse_columns``): ``images`` (an image, or a list of
    frames of one clip: PIL images, paths, encoded bytes or uint8 arrays, or one video); either
    ``messages`` (chat messages in the sample format, or their JSON text) or ``question`` and
    ``answer`` (text); optionally ``id`` (else ``<folder>-<row>``).
    """

    def __init__(self, path: str | os.PathLike, split: str = "train", columns: str | Mapping | None = None):
        import datasets

        self.path = Path(path)
        try:
            loaded = datasets.load_from_disk(str(self.path))
        except FileNotFoundError as e:
            raise DataError(f"{self.path} is not a folder written by datasets' save_to_disk ({e})") from None
        self.split = None  # a plain saved Dataset has no splits
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"{self.path} has splits {list(loaded)}, not {split!r}; set --data-split")
            loaded, self.split = loaded[split], split
        self.dataset = loaded
        self.columns = parse_columns(columns)
        self.has_messages = check_columns(loaded.column_names, self.columns, str(self.path))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        try:
            row = self.dataset[index]
        except Exception as e:  # datasets decodes its Image/Video columns here
            raise BadSample(f"cannot decode row {index}: {type(e).__name__}: {e}", f"{self.path.name}-{index}") from None
        return sample_from_row(row, self.columns, self.has_messages, f"{self.path.name}-{index}")


# -------------------------------------------------------------------------------------- reading order


class SampleStream:
    """An endless, reproducible reading order over a map-style dataset, sharded across ranks.

    Position ``p`` of rank ``r`` is global draw ``p * world_size + r``; each epoch is a fresh
    permutation seeded by ``(seed, epoch)``. The position is the only state: a resumed run that
    starts from the saved position reads exactly the samples the uninterrupted run would have.
    """

    def __init__(self, dataset: Sequence, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if len(dataset) == 0:
            raise ValueError("the training dataset is empty")
        self.dataset, self.seed, self.shuffle = dataset, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self._epoch, self._order = None, None

    def index_at(self, position: int) -> int:
        draw = position * self.world_size + self.rank
        epoch, offset = divmod(draw, len(self.dataset))
        if not self.shuffle:
            return offset
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
        return int(self._order[offset])

    def iter_from(self, position: int = 0) -> Iterator[tuple[int, dict]]:
        while True:
            yield position, self.dataset[self.index_at(position)]
            position += 1

    def iter_loads_from(self, position: int = 0) -> Iterator[tuple[int, Callable[[], dict]]]:
        """``(position, load)``: ``load()`` reads, decodes and checks the sample (``theworld.data.prefetch``
        calls it in its threads)."""
        while True:
            yield position, functools.partial(_load_checked, self.dataset, self.index_at(position))
            position += 1

    def state_dict(self) -> dict:
        return {}  # the position (kept by the consumer) is the whole state

    def load_state_dict(self, state: dict | None):
        pass


def _load_checked(dataset: Sequence, index: int) -> dict:
    return check_sample(dataset[index])
