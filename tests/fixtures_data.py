"""Small datasets with every kind of bad sample, as JSONL, parquet shards and webdataset shards.

Each builder returns ``{id: reason fragment}`` for the bad samples (``None`` for the good ones); the
good samples are the arrow task's (one 32x32 frame) plus one 5-frame clip.
"""
import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from theworld.data.synthetic import SyntheticWorldTask

GOOD = 6  # good samples in each dataset, before the bad ones are mixed in


def png_bytes(frame: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(frame).save(out, format="PNG")
    return out.getvalue()


def good_samples(count: int = GOOD, seed: int = 0) -> list[dict]:
    task = SyntheticWorldTask(size=count, seed=seed)
    samples = [task[i] for i in range(count)]
    clip = samples[-1]
    clip["images"] = [np.roll(clip["images"][0], k, axis=1) for k in range(5)]  # a 5-frame clip
    return samples


def frames_of(sample, sizes=None, count=None) -> list[np.ndarray]:
    frames = list(sample["images"]) * (count or 1)
    frames = frames[: count or len(frames)]
    if sizes == "mixed":
        frames = [frames[0]] * 4 + [frames[0][:16, :16].copy()]
    return frames


def interleave(good: list, bad: list) -> list:
    """Bad items spread among the good ones (one after each good one, the rest at the end)."""
    out = []
    for k in range(max(len(good), len(bad))):
        out += good[k : k + 1] + bad[k : k + 1]
    return out


def write_bad_jsonl(folder: Path, seed: int = 0) -> tuple[Path, dict]:
    """A JSONL file with good lines and one line of each bad kind; ``(path, {id: reason or None})``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    good = good_samples(seed=seed)
    template = good[0]

    def write_frames(stem, frames):
        paths = []
        for k, frame in enumerate(frames):
            paths.append(f"images/{stem}-{k}.png")
            Image.fromarray(frame).save(folder / paths[-1])
        return paths

    lines, expected = [], {}
    for sample in good:
        lines.append(json.dumps({"id": sample["id"], "images": write_frames(sample["id"], sample["images"]),
                                 "messages": sample["messages"]}))
        expected[sample["id"]] = None
    (folder / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (folder / "images" / "corrupt.mp4").write_bytes(b"not a video at all")
    messages = template["messages"]
    bad = {
        "missing-image": ({"images": ["images/missing.png"], "messages": messages}, "image file not found: images/missing.png"),
        "corrupt-image": ({"images": ["images/corrupt.png"], "messages": messages}, "cannot decode image: images/corrupt.png"),
        "missing-video": ({"images": ["clips/missing.mp4"], "messages": messages}, "video file not found: clips/missing.mp4"),
        "corrupt-video": ({"images": ["images/corrupt.mp4"], "messages": messages}, "cannot decode video: images/corrupt.mp4"),
        "mixed-sizes": ({"images": write_frames("mixed", frames_of(template, sizes="mixed")), "messages": messages},
                        "frames of mixed sizes"),
        "two-frames": ({"images": write_frames("two", frames_of(template, count=2)), "messages": messages},
                       "wrong frame count"),
        "string-messages": ({"images": [f"images/{template['id']}-0.png"], "messages": "What colour is it? red"},
                            "malformed messages: messages is a string"),
        "no-images": ({"messages": messages}, "missing keys ['images']"),
    }
    bad_lines = []
    for sample_id, (record, reason) in bad.items():
        bad_lines.append(json.dumps({"id": sample_id, **record}))
        expected[sample_id] = reason
    bad_lines.append('{"id": "not-json", "images": [')  # cut short: not JSON, so its id is FILE:LINE
    lines = interleave(lines, bad_lines)
    expected[f"train.jsonl:{lines.index(bad_lines[-1]) + 1}"] = "is not valid JSON"
    path = folder / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, expected


def write_bad_parquet(folder: Path, shards: int = 2, seed: int = 0) -> tuple[str, dict]:
    """Parquet shards (``images`` as ``{bytes, path}`` structs, ``messages`` as JSON text) with every bad kind."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    good = good_samples(seed=seed)
    template = good[0]
    text = json.dumps(template["messages"])

    def encoded(frames):
        return [{"bytes": png_bytes(f), "path": None} for f in frames]

    rows, expected = [], {}
    for sample in good:
        rows.append({"id": sample["id"], "images": encoded(sample["images"]), "messages": json.dumps(sample["messages"])})
        expected[sample["id"]] = None
    bad = {
        "missing-image": ([{"bytes": None, "path": "images/missing.png"}], text, "image file not found: images/missing.png"),
        "corrupt-image": ([{"bytes": b"not a png", "path": "corrupt.png"}], text, "cannot decode image: corrupt.png"),
        "corrupt-video": ([{"bytes": b"not a video", "path": "clip.mp4"}], text, "cannot decode video: clip.mp4"),
        "mixed-sizes": (encoded(frames_of(template, sizes="mixed")), text, "frames of mixed sizes"),
        "two-frames": (encoded(frames_of(template, count=2)), text, "wrong frame count"),
        "string-messages": (encoded(template["images"]), json.dumps("What colour is it? red"),
                            "malformed messages: messages is a string"),
        "messages-not-json": (encoded(template["images"]), "[{'role': 'user'", "malformed messages: not valid JSON"),
    }
    bad_rows = []
    for sample_id, (images, messages, reason) in bad.items():
        bad_rows.append({"id": sample_id, "images": images, "messages": messages})
        expected[sample_id] = reason
    rows = interleave(rows, bad_rows)
    schema = pa.schema([("id", pa.string()), ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
                        ("messages", pa.string())])
    per_shard = -(-len(rows) // shards)
    for k in range(shards):
        pq.write_table(pa.Table.from_pylist(rows[k * per_shard : (k + 1) * per_shard], schema=schema),
                       folder / f"train-{k:05d}.parquet")
    return str(folder / "train-*.parquet"), expected


def add_member(tar: tarfile.TarFile, name: str, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_bad_webdataset(folder: Path, shards: int = 2, seed: int = 0) -> tuple[str, dict]:
    """Webdataset ``.tar`` shards (frames ``KEY.0.png``..., ``KEY.json`` with messages) with every bad kind."""
    folder.mkdir(parents=True, exist_ok=True)
    good = good_samples(seed=seed)
    template = good[0]
    text = json.dumps({"messages": template["messages"]}).encode()

    def members(frames, meta=text):
        return [(f"{k}.png", png_bytes(f)) for k, f in enumerate(frames)] + [("json", meta)]

    samples, expected = [], {}
    for sample in good:
        samples.append((sample["id"], members(sample["images"], json.dumps({"messages": sample["messages"]}).encode())))
        expected[sample["id"]] = None
    bad = {
        "corrupt-image": ([("0.png", b"not a png"), ("json", text)], "cannot decode image: corrupt-image.0.png"),
        "no-image": ([("json", text)], "no image or video member"),
        "corrupt-video": ([("mp4", b"not a video"), ("json", text)], "cannot decode video: corrupt-video.mp4"),
        "mixed-sizes": (members(frames_of(template, sizes="mixed")), "frames of mixed sizes"),
        "two-frames": (members(frames_of(template, count=2)), "wrong frame count"),
        "string-messages": (members(template["images"], json.dumps({"messages": "What colour? red"}).encode()),
                            "malformed messages: messages is a string"),
    }
    bad_samples = []
    for key, (parts, reason) in bad.items():
        bad_samples.append((key, parts))
        expected[key] = reason
    samples = interleave(samples, bad_samples)
    per_shard = -(-len(samples) // shards)
    for k in range(shards):
        with tarfile.open(folder / f"train-{k:05d}.tar", "w") as tar:
            for key, parts in samples[k * per_shard : (k + 1) * per_shard]:
                for field, data in parts:
                    add_member(tar, f"{key}.{field}", data)
    return str(folder / "train-*.tar"), expected
