"""The run's data: training and held-out sources, this rank's reading order, the task record."""
from __future__ import annotations

from pathlib import Path

from theworld.training.arguments import DataArguments


SYNTHETIC_TASKS = ("synthetic", "synthetic-arrow")


# Written next to the trained model: which data it was trained on, so evaluations rebuild the task.
TASK_FILE = "theworld_task.json"


def open_datasets(data_args: DataArguments, seed: int):
    """``(train, heldout)``: map-style datasets in the sample format, or ``ShardSource``s of shards.

    Raises ``DataError`` (one line, exit code 2 from ``main``) when the data cannot be opened at all."""
    from theworld.data.shards import ShardSource, is_shard_spec
    from theworld.data.sources import DataError, DiskDataset, JsonlDataset

    def open_one(spec: str, split: str):
        if spec in SYNTHETIC_TASKS:
            size = data_args.synthetic_size if split == "train" else data_args.synthetic_eval_size
            fraction = data_args.blocked_fraction if split == "train" else 0.0
            return synthetic_task({**task_record(data_args, seed), "data": spec}, split, size, fraction)
        if spec.endswith(".jsonl"):
            return JsonlDataset(spec)
        if Path(spec).is_dir():
            return DiskDataset(spec, split=data_args.data_split if split == "train" else "test", columns=data_args.data_columns)
        if is_shard_spec(spec):
            return ShardSource(spec, columns=data_args.data_columns)
        if not Path(spec).exists():
            raise DataError(f"{spec}: no such file or directory")
        raise DataError(f"data {spec!r} is neither one of {SYNTHETIC_TASKS}, a .jsonl file, a glob of .parquet or .tar "
                        "shards nor a save_to_disk directory")

    train = open_one(data_args.data, "train")
    if data_args.eval_data is None and (data_args.data.endswith(".jsonl") or isinstance(train, ShardSource)):
        raise DataError(f"set --eval-data to held-out data: {data_args.data} has no held-out split")
    heldout = open_one(data_args.eval_data or data_args.data, "heldout")
    if data_args.eval_data is None and isinstance(heldout, DiskDataset) and heldout.split != "test":
        # A plain saved Dataset has no splits: evaluating on it would score the training rows.
        raise DataError(f"set --eval-data: {data_args.data} is not a DatasetDict with a 'test' split, so it has no "
                        "held-out rows of its own")
    return train, heldout


def training_stream(train_data, seed: int, rank: int, world_size: int):
    """This rank's endless reading order over the training data (``iter_loads_from(position)``)."""
    from theworld.data.shards import ShardSource, ShardStream
    from theworld.data.sources import SampleStream

    if isinstance(train_data, ShardSource):
        return ShardStream(train_data, seed=seed, rank=rank, world_size=world_size)
    return SampleStream(train_data, seed=seed, rank=rank, world_size=world_size)


def heldout_loads(heldout_data, size: int):
    """``(position, load)`` of the first ``size`` held-out samples, in file order (every rank the same)."""
    from itertools import islice

    from theworld.data.shards import ShardSource, ShardStream
    from theworld.data.sources import SampleStream

    if isinstance(heldout_data, ShardSource):
        return islice(ShardStream(heldout_data, shuffle=False, max_epochs=1).iter_loads_from(0), size)
    return islice(SampleStream(heldout_data, shuffle=False).iter_loads_from(0), min(len(heldout_data), size))


def synthetic_task(record: dict, split: str, size: int, blocked_fraction: float = 0.0):
    """The synthetic task of a `task_record` (``data`` "synthetic" or "synthetic-arrow"), one split of it."""
    from theworld.data.synthetic import SyntheticMotionTask, SyntheticWorldTask

    if record["data"] == "synthetic-arrow":
        return SyntheticWorldTask(split=split, size=size, seed=record["seed"], image_size=record["image_size"],
                                  blocked_fraction=blocked_fraction)
    if record["data"] == "synthetic":
        return SyntheticMotionTask(split=split, size=size, seed=record["seed"], num_frames=record["num_frames"],
                                   image_size=record["image_size"], blocked_fraction=blocked_fraction)
    raise ValueError(f"{record['data']!r} is not a synthetic task ({', '.join(SYNTHETIC_TASKS)})")


def task_record(data_args: DataArguments, seed: int) -> dict:
    """What a saved model was trained on, for `scripts/eval_world.py` to rebuild the held-out task."""
    record = {"data": data_args.data, "seed": seed}
    if data_args.data in SYNTHETIC_TASKS:
        record.update(image_size=data_args.synthetic_image_size, eval_size=data_args.synthetic_eval_size,
                      num_frames=data_args.synthetic_frames if data_args.data == "synthetic" else 1)
    return record
