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
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image


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


class JsonlDataset:
    """A map-style dataset over a JSONL file; images are read from disk when a sample is accessed."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.records = []
        for line_no, record in iter_jsonl(self.path):
            missing = {"id", "messages", "images"} - set(record)
            if missing:
                raise ValueError(
                    f"{self.path}:{line_no}: missing keys {sorted(missing)}; each line needs "
                    '"id", "images" (a list of image or frame paths) and "messages"'
                )
            self.records.append(record)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        images = [as_rgb_array(self.path.parent / p) for p in record["images"]]
        return {"id": str(record["id"]), "messages": record["messages"], "images": images}


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
            raise ValueError(f"unknown column role {key!r} in data_columns; the roles are {sorted(DEFAULT_COLUMNS)}")
        columns[key] = value.strip()
    return columns


class DiskDataset:
    """Any Hugging Face dataset saved with ``save_to_disk``, mapped to the sample format.

    Columns (renamed with ``columns``, see ``parse_columns``): ``images`` (an image, or a list of
    images or frames: PIL images, paths or uint8 arrays); either ``messages`` (chat messages in the
    sample format) or ``question`` and ``answer`` (text); optionally ``id`` (else ``<folder>-<row>``).
    """

    def __init__(self, path: str | os.PathLike, split: str = "train", columns: str | Mapping | None = None):
        import datasets

        self.path = Path(path)
        loaded = datasets.load_from_disk(str(self.path))
        self.split = None  # a plain saved Dataset has no splits
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{self.path} has splits {list(loaded)}, not {split!r}; set data_split")
            loaded, self.split = loaded[split], split
        self.dataset = loaded
        self.columns = parse_columns(columns)
        names = set(loaded.column_names)
        if self.columns["images"] not in names:
            raise ValueError(
                f"{self.path} has no image column {self.columns['images']!r} (columns: {sorted(names)}); "
                "map it with data_columns, e.g. --data-columns images=image"
            )
        self.has_messages = self.columns["messages"] in names
        if not self.has_messages and not {self.columns["question"], self.columns["answer"]} <= names:
            raise ValueError(
                f"{self.path} needs a messages column or question and answer columns (columns: {sorted(names)}); "
                "map them with data_columns, e.g. --data-columns question=prompt,answer=label"
            )

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        row = self.dataset[index]
        raw = row[self.columns["images"]]
        raw = raw if isinstance(raw, (list, tuple)) else [raw]
        images = [as_rgb_array(image) for image in raw]
        if self.has_messages:
            messages = row[self.columns["messages"]]
        else:
            messages = user_assistant_messages(str(row[self.columns["question"]]), str(row[self.columns["answer"]]), len(images))
        sample_id = row.get(self.columns["id"])
        if sample_id is None:
            sample_id = f"{self.path.name}-{index}"
        return {"id": str(sample_id), "messages": messages, "images": images}


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
