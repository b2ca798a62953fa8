"""Local parquet and webdataset shards, read as streams with ``datasets`` (never loaded whole).

``--data 'shards/train-*.parquet'`` or ``--data 'shards/train-*.tar'`` (a glob; all shards one kind):

- **parquet**: columns ``id``, ``images`` (one entry or a list of the clip's frames: encoded bytes,
  ``{"bytes", "path"}`` structs as ``datasets`` writes ``Image``/``Video`` columns, or paths relative
  to the shard's folder; a video by its extension) and ``messages`` (chat messages or their JSON text),
  or ``question`` and ``answer``; renamed with ``--data-columns`` as for ``save_to_disk`` folders.
- **webdataset** (``.tar``): ``__key__`` is the id; the clip is the sample's image members in name
  order (``0.png``, ``1.png``, ... or one ``png``) or one video (``mp4``, ...); ``json`` holds
  ``{"messages": [...]}``.

Reading order (``ShardStream``): shards, not rows, are shuffled (per epoch, from the seed); rows are
read in shard order. Rank ``r`` of ``W`` reads the shards at global draws ``r, r + W, r + 2W, ...`` of
the endless sequence *epoch 0's shard order, epoch 1's, ...*: at any time the ranks read different
shards, and when the shards do not divide evenly among the ranks a rank's next shard is simply the
next epoch's (every rank keeps reading, none waits for an epoch to end). The state is the reading
position alone (plus the shard lengths seen, to find it again quickly): no shuffle buffer, whose
content ``datasets`` cannot restore, so ``--resume`` reads exactly what the uninterrupted run would.
"""
from __future__ import annotations

import functools
import glob
import json
import os
import re
import tarfile
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np

from theworld.data.sources import (BadSample, DataError, check_columns, check_sample, parse_columns, read_image,
                                   read_video, sample_from_row)

SHARD_KINDS = {".parquet": "parquet", ".tar": "webdataset"}


def is_shard_spec(spec: str) -> bool:
    return Path(spec).suffix.lower() in SHARD_KINDS or glob.has_magic(spec)


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


class ShardSource:
    """The shards a ``--data`` glob names, checked at start-up (``DataError``: no shard, mixed kinds,
    an unreadable first shard, a column the mapping names that does not exist)."""

    def __init__(self, spec: str, columns: str | Mapping | None = None):
        self.spec = spec
        self.paths = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
        if not self.paths:
            raise DataError(f"{spec}: no such shard (the pattern matches no file)")
        kinds = {SHARD_KINDS.get(Path(p).suffix.lower()) for p in self.paths}
        if len(kinds) != 1 or None in kinds:
            raise DataError(f"{spec}: shards must all be .parquet or all .tar (webdataset), got "
                            f"{sorted({Path(p).suffix or p for p in self.paths})}")
        self.kind = kinds.pop()
        self.columns = parse_columns(columns)
        self._info: dict[str, tuple[int, list[str] | None]] = {}
        self._lock = threading.Lock()
        if self.kind == "parquet":
            import pyarrow.parquet as pq

            try:
                names = pq.read_schema(self.paths[0]).names
            except Exception as e:
                raise DataError(f"{self.paths[0]}: cannot read this parquet shard ({e})") from None
            self.has_messages = check_columns(names, self.columns, self.paths[0])
        elif not tarfile.is_tarfile(self.paths[0]):
            raise DataError(f"{self.paths[0]}: not a tar file (webdataset shards are .tar archives)")

    def __len__(self) -> int:
        return len(self.paths)

    # ---- one shard

    def length(self, path: str) -> int:
        """Samples in a shard, from its footer (parquet) or its member names (tar); nothing is decoded."""
        return self._shard_info(path)[0]

    def _shard_info(self, path: str) -> tuple[int, list[str] | None]:
        with self._lock:
            if path not in self._info:
                self._info[path] = self._scan(path)
            return self._info[path]

    def _scan(self, path: str) -> tuple[int, list[str] | None]:
        if self.kind == "parquet":
            import pyarrow.parquet as pq

            try:
                return pq.ParquetFile(path).metadata.num_rows, None
            except Exception:
                return 1, None  # read as one bad sample that names the shard
        from datasets.packaged_modules.webdataset.webdataset import base_plus_ext

        keys = []
        try:
            with tarfile.open(path) as tar:
                for name in tar.getnames():
                    key, _ = base_plus_ext(name)
                    if key is not None and (not keys or keys[-1] != key):
                        keys.append(key)
        except (tarfile.TarError, OSError):
            pass
        return max(len(keys), 1), keys  # an unreadable shard is one bad sample

    def set_length(self, path: str, length: int):
        with self._lock:
            self._info.setdefault(path, (length, None))

    def rows(self, path: str, skip: int = 0) -> Iterator[tuple[int, Callable[[], dict]]]:
        """``(row index, load)`` for the rows of one shard from ``skip`` on, read with ``datasets``.

        Exactly ``length(path) - skip`` of them: rows the shard fails to give (a truncated file, a
        member ``datasets`` cannot parse) come out as loads that raise ``BadSample`` naming the shard."""
        import datasets

        length, keys = self._shard_info(path)
        index = skip
        try:
            if self.kind == "parquet":
                stream = datasets.load_dataset("parquet", data_files=[path], split="train", streaming=True)
            else:
                stream = datasets.load_dataset("webdataset", data_files=[path], split="train", streaming=True,
                                               features=self._webdataset_features(path))
            stream = stream.decode(False)  # bytes only: decoding is the decoding threads' job
            if skip:
                stream = stream.skip(skip)
            for row in stream:
                if index >= length:
                    break
                yield index, functools.partial(self.decode, path, index, row)
                index += 1
        except Exception as e:
            reason = f"cannot read {Path(path).name} from sample {index} on ({type(e).__name__}: {e})"
            for lost in range(index, length):
                sample_id = keys[lost] if keys and lost < len(keys) else f"{Path(path).stem}-{lost}"
                yield lost, functools.partial(_raise, BadSample(reason, sample_id))
            return
        for lost in range(index, length):  # fewer rows than the footer or the member names said
            yield lost, functools.partial(_raise, BadSample(f"{Path(path).name} ended before sample {lost}",
                                                            f"{Path(path).stem}-{lost}"))

    def _webdataset_features(self, path: str):
        """Features for every member name in the shard, ``json`` kept as text (``datasets`` would infer a
        struct from the first samples and fail on a later sample whose JSON has another shape)."""
        import datasets
        from datasets.packaged_modules.webdataset.webdataset import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, base_plus_ext

        fields = {"__key__": datasets.Value("string"), "__url__": datasets.Value("string")}
        with tarfile.open(path) as tar:
            for name in tar.getnames():
                _, field = base_plus_ext(name)
                if field is None or field in fields:
                    continue
                extension = field.rsplit(".", 1)[-1].lower()
                if extension in IMAGE_EXTENSIONS:
                    fields[field] = datasets.Image()
                elif extension in VIDEO_EXTENSIONS:
                    fields[field] = datasets.Video()
                elif extension in ("txt", "text"):
                    fields[field] = datasets.Value("string")
                else:
                    fields[field] = datasets.Json()
        return datasets.Features(fields)

    def decode(self, path: str, index: int, row: Mapping) -> dict:
        if self.kind == "parquet":
            return sample_from_row(row, self.columns, self.has_messages, f"{Path(path).stem}-{index}",
                                   base=Path(path).parent)
        return decode_webdataset_row(row)


def _raise(error: Exception):
    raise error


def decode_webdataset_row(row: Mapping) -> dict:
    """A webdataset sample (``__key__``, image members or one video, ``json`` with ``messages``) as a
    checked sample."""
    from datasets.packaged_modules.webdataset.webdataset import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

    key = row["__key__"]
    media = sorted(((field, value) for field, value in row.items()
                    if value is not None and field.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS),
                   key=lambda item: _natural_key(item[0]))
    try:
        if not media:
            raise BadSample("the sample has no image or video member")
        videos = [field for field, _ in media if field.rsplit(".", 1)[-1].lower() in VIDEO_EXTENSIONS]
        if videos and len(media) > 1:
            raise BadSample(f"a clip is one video or image frames, not both ({', '.join(f for f, _ in media)})")
        if videos:
            frames = read_video(media[0][1]["bytes"], f"{key}.{media[0][0]}")
        else:
            frames = [read_image(value["bytes"], f"{key}.{field}") for field, value in media]
        text = row.get("json")
        if text is None:
            raise BadSample("the sample has no json member with its messages")
        try:
            meta = json.loads(text) if isinstance(text, (str, bytes)) else text
        except json.JSONDecodeError as e:
            raise BadSample(f"malformed messages: {key}.json is not valid JSON ({e})") from None
        if not isinstance(meta, dict) or "messages" not in meta:
            raise BadSample(f'malformed messages: {key}.json needs {{"messages": [...]}}')
    except BadSample as e:
        raise BadSample(e.reason, key) from None
    return check_sample({"id": key, "messages": meta["messages"], "images": frames})


class ShardStream:
    """An endless, reproducible reading order over shards for one rank (see the module docstring).

    ``iter_loads_from(position)`` yields ``(position, load)``; the position is the rank's count of
    samples read, the only state needed to resume. ``max_epochs`` ends the stream (the held-out set).
    """

    def __init__(self, source: ShardSource, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 max_epochs: int | None = None):
        self.source, self.seed, self.shuffle = source, seed, shuffle
        self.rank, self.world_size, self.max_epochs = rank, world_size, max_epochs
        self._lengths: dict[str, int] = {}

    def shard_at(self, j: int) -> tuple[int, str]:
        """``(epoch, path)`` of this rank's ``j``-th shard."""
        epoch, k = divmod(j * self.world_size + self.rank, len(self.source))
        if self.shuffle:
            k = int(np.random.default_rng([self.seed, epoch]).permutation(len(self.source))[k])
        return epoch, self.source.paths[k]

    def _length(self, path: str) -> int:
        if path not in self._lengths:
            self._lengths[path] = self.source.length(path)
        return self._lengths[path]

    def iter_loads_from(self, position: int = 0) -> Iterator[tuple[int, Callable[[], dict]]]:
        j = start = 0
        while position > start:  # find the shard that holds `position`
            n = self._length(self.shard_at(j)[1])
            if start + n > position:
                break
            start, j = start + n, j + 1
        offset, empty = position - start, 0
        while True:
            epoch, path = self.shard_at(j)
            if self.max_epochs is not None and epoch >= self.max_epochs:
                return
            for _, load in self.source.rows(path, skip=offset):
                yield position, load
                position += 1
            empty = empty + 1 if self._length(path) == 0 else 0
            if empty >= len(self.source):
                raise DataError(f"{self.source.spec}: every shard is empty")
            j, offset = j + 1, 0

    def state_dict(self) -> dict:
        return {"shard_lengths": dict(self._lengths)}

    def load_state_dict(self, state: dict | None):
        for path, n in (state or {}).get("shard_lengths", {}).items():
            self._lengths[path] = n
            self.source.set_length(path, n)
