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

    if data_args.question_types is not None and data_args.data not in SYNTHETIC_TASKS:
        raise DataError(f"--question-types chooses the questions of the synthetic tasks ({', '.join(SYNTHETIC_TASKS)}); "
                        f"{data_args.data} brings its own questions: leave --question-types out")

    def open_one(spec: str, split: str):
        if spec in SYNTHETIC_TASKS:
            size = data_args.synthetic_size if split == "train" else data_args.synthetic_eval_size
            fraction = data_args.blocked_fraction if split == "train" else 0.0
            try:
                return synthetic_task({**task_record(data_args, seed), "data": spec}, split, size, fraction)
            except ValueError as e:  # e.g. an unknown question type: a start-up error naming the flag
                raise DataError(f"--question-types {data_args.question_types}: {e}" if data_args.question_types
                                else str(e)) from None
        if spec.endswith(".jsonl"):
            return JsonlDataset(spec)
        if is_curated(spec):
            return open_curated(spec)
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

    # A record without "questions" (the default, and every record older than --question-types) asks the
    # task's default questions.
    questions = {"questions": tuple(record["questions"])} if "questions" in record else {}
    if record["data"] == "synthetic-arrow":
        return SyntheticWorldTask(split=split, size=size, seed=record["seed"], image_size=record["image_size"],
                                  blocked_fraction=blocked_fraction, **questions)
    if record["data"] == "synthetic":
        return SyntheticMotionTask(split=split, size=size, seed=record["seed"], num_frames=record["num_frames"],
                                   image_size=record["image_size"], blocked_fraction=blocked_fraction,
                                   oracle_frames=record.get("oracle_frames", 0), **questions)
    raise ValueError(f"{record['data']!r} is not a synthetic task ({', '.join(SYNTHETIC_TASKS)})")


def task_record(data_args: DataArguments, seed: int) -> dict:
    """What a saved model was trained on, for `scripts/eval_world.py` to rebuild the held-out task."""
    record = {"data": data_args.data, "seed": seed}
    if data_args.data in SYNTHETIC_TASKS:
        record.update(image_size=data_args.synthetic_image_size, eval_size=data_args.synthetic_eval_size,
                      num_frames=data_args.synthetic_frames if data_args.data == "synthetic" else 1)
        if data_args.question_types is not None:
            record["questions"] = parse_question_types(data_args.question_types)
        if data_args.synthetic_oracle_frames:  # only when set: older records and default runs stay as they were
            record["oracle_frames"] = data_args.synthetic_oracle_frames
    return record


def parse_question_types(value: str) -> list[str]:
    """``--question-types 'direction,colour,future'`` -> the names in order (the task checks them)."""
    return [name.strip() for name in value.split(",") if name.strip()]


def is_curated(spec: str) -> bool:
    """Whether ``spec`` is a folder written by ``python -m safety_worker curate`` (finished or not)."""
    from safety_worker.curate import MANIFEST, RUN_FILE

    return Path(spec).is_dir() and ((Path(spec) / MANIFEST).is_file() or (Path(spec) / RUN_FILE).is_file())


def open_curated(spec: str):
    """A curate output as its parquet shards (``ShardSource``), with its manifest as ``.curated``."""
    from safety_worker.curate import CurateError, read_manifest
    from theworld.data.shards import ShardSource
    from theworld.data.sources import DataError

    try:
        manifest = read_manifest(spec)
    except (CurateError, ValueError) as e:
        raise DataError(str(e)) from None
    if manifest is None:
        raise DataError(f"{spec} is an unfinished curate output (no manifest.json): run the same "
                        "`python -m safety_worker curate` command again to finish it")
    shards = [str(Path(spec) / s["path"]) for s in manifest["shards"]]
    missing = [p for p in shards if not Path(p).is_file()]
    if missing:
        raise DataError(f"{spec}: shards the manifest lists are missing ({missing[:3]}); curate it again")
    source = ShardSource(str(Path(spec) / "shards" / "part-*.parquet"))
    if source.paths != sorted(shards):
        raise DataError(f"{spec}/shards holds other files than the manifest's shards; curate it again into a new folder")
    source.curated = manifest
    return source


def check_curated_identity(data, worker_hello: dict, accept: bool) -> None:
    """``DataError`` (exit 2) when curated ``data`` was checked by another checker than the worker's.

    The identity is the verdict cache key's (models, policy, versions): curated samples are trained on
    unchecked, so they must have been checked by the checker this run would have used."""
    from safety_worker.proxy import checker_identity
    from theworld.data.sources import DataError

    manifest = getattr(data, "curated", None)
    if manifest is None or accept:
        return
    worker = checker_identity(worker_hello)
    curated = manifest["checker"]["identity"]
    if worker != curated:
        differ = [k for k in ("models", "policy") if manifest["checker"].get(k) != worker_hello.get(k)]
        versions = {k: (manifest["checker"]["versions"].get(k), (worker_hello.get("versions") or {}).get(k))
                    for k in ("worker", "cosmos-guardrail", "transformers")}
        differ += [f"{k} version {a} vs {b}" for k, (a, b) in versions.items() if a != b]
        raise DataError(
            f"{data.spec.rsplit('/shards/', 1)[0]} was curated by checker {curated[:12]}, but the safety worker is "
            f"checker {worker[:12]} ({', '.join(differ) or 'protocol differs'}): its verdicts may not hold for this "
            "worker. Curate the data again with the worker's options (same --preset and model flags, "
            "--controversial), or pass --accept-curated-identity to train on it anyway")
