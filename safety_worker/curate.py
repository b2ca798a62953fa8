"""`python -m safety_worker curate INPUT OUTPUT`: a dataset checked once by the guard, on Ray Data.

The job, stage by stage (docs/scale.md):

1. **Plan** (driver): the input is cut into *units* of rows: one per parquet/webdataset shard, and
   `--shard-size` rows at a time of a JSONL file or a `save_to_disk` folder. Only lengths are read
   (shard footers, member names, line offsets). Each unit becomes one output shard.
2. **Read** (Ray tasks, `flat_map`): each unit's rows through the trainer's own readers
   (`theworld.data.sources` / `theworld.data.shards`, with `--data-columns`), one row at a time. A
   sample the trainer could not load (`BadSample`) travels on as an error row with its reason. Read
   tasks import theworld's data modules (its import guard keeps the checker out of them) and never
   load the guard: Ray tasks reuse worker processes, so a guard loaded in one would switch autograd
   off for every later task there.
3. **Check** (a pool of Ray *actors*, `map_batches` with the callable class `GuardActor`): each actor is
   a process of its own holding `cosmos_guardrail.CosmosSafetyChecker` through the worker's
   `GuardedChecker`, and checks a batch of samples exactly as the worker does (`server.check_requests`
   in batches cut by the worker's `Batching` limits; a failing batch is checked item by item so each
   verdict still fails closed on its own). A sample is sent as the trainer's `SafetyFilter` sends it
   (`check_sample` of its whole text and its frames), so its verdict and sanitized frames are the
   ones a worker gives and its key in the verdict store is the one a worker's cache uses. Verdicts
   come from the store when it has them; new ones go in (never faults).
4. **Write** (driver): rows arrive in input order (`preserve_order`); each unit's rows go into
   `shards/part-NNNNN.parquet` (kept samples: `id`, `images` as lossless PNG of the sanitized frames,
   `messages` as JSON text: the trainer reads it as a parquet shard), and its blocked and error
   records into per-unit ledger parts. A unit is *committed* when its marker `parts/part-NNNNN.json`
   (its counts) is renamed into place, after its shard and ledger parts. The driver holds only the
   rows of the units in progress, never the dataset.
5. **Finish**: `blocked.jsonl`, `errors.jsonl` (the parts, in unit order) and `manifest.json` last.

Resuming: `curate` run again on the same OUTPUT reads `run.json` (the input's fingerprints, the plan,
the checker identity: a different input or checker is refused), skips committed units and redoes the
others from the start; the verdicts of samples checked before the kill come from the store, so no
committed verdict is computed twice and the output equals an uninterrupted run's (the manifest's
`"run"` section, which says what this invocation did, aside).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import msgpack
import numpy as np

logger = logging.getLogger("safety_worker.curate")

MANIFEST = "manifest.json"
RUN_FILE = "run.json"
MANIFEST_FORMAT = "theworld-curated/1"
DEFAULT_SHARD_SIZE = 1000
DEFAULT_STORE_MB = 10 * 1024
GUARD_ACTOR_ENV = "SAFETY_WORKER_GUARD_ACTOR"  # a runtime_env of their own: actors never share a process with tasks


class CurateError(RuntimeError):
    """The job cannot start or go on (bad input, an OUTPUT of another input or checker); one line."""


# ------------------------------------------------------------------------------------------- plan

@dataclass(frozen=True)
class Unit:
    """Rows `[start, stop)` of one input (a JSONL file, a save_to_disk folder, or one shard)."""

    unit: int
    kind: str  # "jsonl", "disk", "parquet", "webdataset"
    path: str
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"part-{self.unit:05d}"


def plan_units(spec: str, *, columns: str | None, split: str, shard_size: int) -> tuple[list[Unit], list[str]]:
    """The units of input `spec` (see the module docstring) and the files that make the input."""
    from theworld.data.shards import ShardSource, is_shard_spec
    from theworld.data.sources import DataError, DiskDataset, JsonlDataset

    def chunks(kind: str, path: str, n: int) -> list[tuple[str, str, int, int]]:
        return [(kind, path, s, min(s + shard_size, n)) for s in range(0, n, shard_size)]

    try:
        if spec.endswith(".jsonl"):
            raw = chunks("jsonl", spec, len(JsonlDataset(spec)))
            files = [spec]
        elif Path(spec).is_dir():
            raw = chunks("disk", spec, len(DiskDataset(spec, split=split, columns=columns)))
            files = sorted(str(p) for p in Path(spec).rglob("*") if p.is_file())
        elif is_shard_spec(spec):
            source = ShardSource(spec, columns=columns)
            raw = [(source.kind, p, 0, source.length(p)) for p in source.paths]
            files = list(source.paths)
        else:
            raise DataError(f"{spec}: not a .jsonl file, a save_to_disk folder or a glob of .parquet/.tar shards"
                            if Path(spec).exists() else f"{spec}: no such file or directory")
    except DataError as e:
        raise CurateError(str(e)) from None
    return [Unit(k, *r) for k, r in enumerate(raw)], files


def fingerprint(files: list[str]) -> list[dict]:
    """Each input file's path, size and SHA-256 (what a resumed run and a reader of the manifest check)."""
    out = []
    for path in files:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        out.append({"path": str(Path(path).resolve()), "bytes": os.path.getsize(path), "sha256": h.hexdigest()})
    return out


# ------------------------------------------------------------------------------------------- read

def _open_reader(kind: str, path: str, columns: str | None, split: str):
    from theworld.data.shards import ShardSource
    from theworld.data.sources import DiskDataset, JsonlDataset

    if kind == "jsonl":
        return JsonlDataset(path)
    if kind == "disk":
        return DiskDataset(path, split=split, columns=columns)
    return ShardSource(path, columns=columns)


def _frame_groups(images: list[np.ndarray]) -> list[np.ndarray]:
    from theworld.data.safety_filter import _frame_groups as groups  # exactly the trainer's grouping

    return groups(images)


def read_unit(unit: dict, columns: str | None, split: str) -> Iterator[dict]:
    """The rows of one unit as check rows (`flat_map`; runs in Ray tasks): each sample's id, the text
    the guard sees, its messages (JSON) and its frame groups, or the reason it cannot be loaded."""
    from theworld.data.sources import BadSample, check_sample, sample_text

    reader = _open_reader(unit["kind"], unit["path"], columns, split)
    stem = Path(unit["path"]).stem
    if unit["kind"] in ("parquet", "webdataset"):
        loads = ((i, load) for i, load in reader.rows(unit["path"], skip=unit["start"]))
    else:
        loads = ((i, lambda i=i: check_sample(reader[i])) for i in range(unit["start"], unit["stop"]))
    for index, load in loads:
        if index >= unit["stop"]:
            break
        row = {"unit": unit["unit"], "index": index, "id": f"{stem}-{index}", "text": "", "messages": "",
               "groups": b"", "error": ""}
        try:
            sample = load()
            row["id"] = str(sample["id"])
            row["text"] = sample_text(sample)
            row["messages"] = json.dumps(sample["messages"], ensure_ascii=False)
            groups = _frame_groups([np.ascontiguousarray(image, dtype=np.uint8) for image in sample["images"]])
            row["groups"] = msgpack.packb([[list(g.shape), g.tobytes()] for g in groups], use_bin_type=True)
        except BadSample as e:
            row["id"] = e.sample_id if e.sample_id is not None else row["id"]
            row["error"] = e.reason
        except Exception as e:  # a malformed sample: ledgered with its reason, never dropped
            row["error"] = f"{type(e).__name__}: {e}"
        yield row  # one row at a time: a unit is never whole in memory


def _groups(blob: bytes) -> list[np.ndarray]:
    return [np.frombuffer(buf, np.uint8).reshape(shape) for shape, buf in msgpack.unpackb(blob, raw=False)]


# ------------------------------------------------------------------------------------------ check

def _png(frame: np.ndarray) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(frame).save(out, format="PNG")  # lossless: the trainer decodes the very same pixels
    return out.getvalue()


class ActorRoll:
    """The job's roll call, itself a small Ray actor (no CPU, no guard): every `GuardActor` enrols its report
    when it has loaded the guard, so the manifest lists every actor the pool started, also one that got no
    rows (a pool's second actor can start after the first has taken a small dataset whole)."""

    def __init__(self):
        self._reports: dict[int, dict] = {}

    def enrol(self, report: dict) -> None:
        self._reports[report["pid"]] = report

    def reports(self) -> list[dict]:
        return list(self._reports.values())


class GuardActor:
    """The checker in a Ray actor (`map_batches(GuardActor, ...)`): one per process, for its lifetime.

    Loads the preset's checker as `serve` does and wraps it in the worker's `GuardedChecker` with the
    worker's batching; `__call__` checks a batch of read rows and returns, per row, its decision
    (`kept`, `blocked`, `error`), reason and the sanitized frames as PNG."""

    def __init__(self, preset: dict, controversial: str, max_batch: int, max_batch_frames: int, device: str,
                 torch_threads: int, identity: str, store: str | None, store_bytes: int, roll: str | None = None):
        from .presets import use_preset
        from .proxy import checker_identity
        from .server import Batching, checker_description, guarded_checker, load_checker

        models = use_preset(**preset)
        self.identity = checker_identity(checker_description(models, controversial))
        if self.identity != identity:
            raise CurateError(f"this actor's checker ({self.identity[:12]}) is not the driver's ({identity[:12]}): "
                              "its models or package versions differ; install the same versions on every node")
        self.batching = Batching(max_batch, max_batch_frames)
        checker = load_checker(device, preset.get("guardrail_repo", "nvidia/Cosmos-1.0-Guardrail"), torch_threads)
        self.guard = guarded_checker(checker, controversial, self.batching, device)
        import torch

        from .verdict_store import VerdictStore

        self.store = VerdictStore(store, store_bytes) if store else None
        # What the grad-isolation test reads: the guard is loaded here and autograd is off here.
        self.report = {"pid": os.getpid(), "grad_enabled": torch.is_grad_enabled(),
                       "guard_loaded": "cosmos_guardrail" in sys.modules, "theworld_loaded": "theworld" in sys.modules,
                       "device": device, "ready_at": time.time()}
        if roll is not None:  # the driver's roll call (`ActorRoll`), by name: answered before any row is checked
            import ray

            ray.get(ray.get_actor(roll).enrol.remote(self.report))
        # Where an actor's time goes (the bench reads them from the manifest's run.actors): rows and calls
        # done, seconds inside calls (`busy_s`) and in the guard itself (`guard_s`); the rest of its life
        # since `ready_at` it waited for rows.
        self.work = {"rows": 0, "calls": 0, "busy_s": 0.0, "guard_s": 0.0}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        started = time.time()
        out = self._call(batch)
        done = time.time()
        w = self.work
        w.update(rows=w["rows"] + len(batch["id"]), calls=w["calls"] + 1, busy_s=w["busy_s"] + done - started)
        out["actor"] = [json.dumps({**self.report, **w, "last_done": done})] * len(batch["id"])
        out["done_at"] = [done] * len(batch["id"])  # the bench's checking rate: from the actors' start-up to the last batch
        return out

    def _call(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        import torch

        from . import protocol as P
        from .proxy import content_key

        torch.set_grad_enabled(False)  # grad mode is per thread; Ray may call us on another thread
        n = len(batch["id"])
        out = {k: list(batch[k]) for k in ("unit", "index", "id", "messages")}
        out.update(status=[""] * n, reason=[""] * n, stage=[""] * n, kind=[""] * n, images=[b""] * n,
                   checked=[0] * n, reused=[0] * n)
        verdicts: dict[tuple[int, int], Any] = {}  # (row, group) -> Verdict
        n_groups = [0] * n
        reqs, keys = [], {}
        for r in range(n):
            if batch["error"][r]:
                out["status"][r], out["kind"][r], out["reason"][r] = "error", "data", str(batch["error"][r])
                continue
            groups = _groups(batch["groups"][r])
            n_groups[r] = len(groups)
            for g, frames in enumerate(groups):
                args = {"text": str(batch["text"][r])}
                key = content_key(self.identity, "check_sample", args, [frames])
                stored = self.store.get(key) if self.store is not None else None
                if stored is not None:
                    result, arrays = stored
                    verdicts[r, g] = P.Verdict.from_wire(result, arrays[0] if arrays else None)
                    out["reused"][r] += 1
                    continue
                req = P.Request(id=len(reqs), op="check_sample", args=args, arrays=[frames])
                reqs.append(req)
                keys[req.id] = (r, g, key)
        guard_started = time.time()
        replies = self._check(reqs)
        self.work["guard_s"] += time.time() - guard_started
        for req, reply in zip(reqs, replies):
            r, g, key = keys[req.id]
            verdict = P.Verdict.from_wire(reply.result, reply.arrays[0] if reply.arrays else None)
            verdicts[r, g] = verdict
            out["checked"][r] += 1
            if self.store is not None:
                self.store.put(key, reply.result, reply.arrays)  # refuses faults
        for r in range(n):
            if out["status"][r]:
                continue
            self._decide(out, r, [verdicts[r, g] for g in range(n_groups[r])])
        return out

    def _check(self, reqs: list) -> list:
        """Replies in order, batched by the worker's limits; a failing batch checked item by item."""
        from .server import SafetyWorker, check_request, check_requests

        replies = []
        for group in self.batching.split(reqs):
            try:
                replies += check_requests(self.guard, group) if self.batching.max_batch > 1 else [check_request(self.guard, group[0])]
                continue
            except Exception:
                logger.exception("a batch of %d checks failed; checking each alone", len(group))
            for req in group:
                try:
                    replies.append(check_request(self.guard, req))
                except Exception as e:  # GuardedChecker catches the checker's errors: this is ours
                    replies.append(SafetyWorker._blocked_reply(
                        req, f"worker error, blocked (fail closed): {type(e).__name__}: {e}", stage="error"))
        return replies

    @staticmethod
    def _decide(out: dict, r: int, verdicts: list) -> None:
        """A sample sent as several videos is safe only if all are; the first blocked one decides (as
        the trainer's SafetyFilter). A fault says nothing about the content: an error, not blocked."""
        for v in verdicts:
            if not v.safe:
                status = "error" if v.fault else "blocked"
                out["status"][r], out["reason"][r], out["stage"][r] = status, v.reason, v.stage or ""
                out["kind"][r] = "safety" if v.fault else ""
                return
        frames = [frame for v in verdicts for frame in v.frames]
        out["status"][r] = "kept"
        out["images"][r] = msgpack.packb([_png(np.ascontiguousarray(f)) for f in frames], use_bin_type=True)


# ------------------------------------------------------------------------------------------ write

class _UnitWriter:
    """One unit's output in progress: its shard (streamed row group by row group) and ledger records."""

    _ROW_GROUP = 64

    def __init__(self, out: Path, unit: Unit):
        self.out, self.unit = out, unit
        self.shard_tmp = out / "shards" / f"{unit.name}.parquet.tmp"
        self.counts = {"read": 0, "kept": 0, "blocked": 0, "errors": 0}
        self.checked = self.reused = 0
        self.blocked: list[dict] = []
        self.errors: list[dict] = []
        self._rows: list[dict] = []
        self._writer = None

    def add(self, row: dict) -> None:
        self.counts["read"] += 1
        self.checked += int(row["checked"])
        self.reused += int(row["reused"])
        position = int(row["index"])
        if row["status"] == "kept":
            self.counts["kept"] += 1
            images = [{"bytes": png, "path": None} for png in msgpack.unpackb(row["images"], raw=False)]
            self._rows.append({"id": row["id"], "images": images, "messages": row["messages"]})
            if len(self._rows) >= self._ROW_GROUP:
                self._flush()
        elif row["status"] == "blocked":
            self.counts["blocked"] += 1
            self.blocked.append({"id": row["id"], "position": position, "shard": self.unit.name,
                                 "reason": row["reason"], "stage": row["stage"] or None})
        else:
            self.counts["errors"] += 1
            self.errors.append({"id": row["id"], "position": position, "shard": self.unit.name,
                                "kind": row["kind"] or "safety", "error": row["reason"]})

    @property
    def done(self) -> bool:
        return self.counts["read"] == self.unit.stop - self.unit.start

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(self._rows, schema=_SHARD_SCHEMA())
        if self._writer is None:
            self._writer = pq.ParquetWriter(str(self.shard_tmp), _SHARD_SCHEMA())
        self._writer.write_table(table)
        self._rows = []

    def commit(self) -> dict:
        """Shard and ledger parts into place, then the marker: the unit is committed when it exists."""
        self._flush()
        self._writer.close()
        shard = self.out / "shards" / f"{self.unit.name}.parquet"
        os.replace(self.shard_tmp, shard)
        parts = self.out / "parts"
        for name, records in (("blocked", self.blocked), ("errors", self.errors)):
            _write_atomic(parts / f"{self.unit.name}.{name}.jsonl",
                          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        marker = {"unit": self.unit.unit, "shard": f"shards/{shard.name}", "source": self.unit.path,
                  "kind": self.unit.kind, "rows": [self.unit.start, self.unit.stop], "counts": self.counts}
        _write_atomic(parts / f"{self.unit.name}.json", json.dumps(marker, indent=1))
        return marker


def _SHARD_SCHEMA():
    import pyarrow as pa

    # As `datasets` writes an Image column (a struct of bytes and path): the trainer's parquet reader
    # takes it as is.
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    return pa.schema([("id", pa.string()), ("images", pa.list_(image)), ("messages", pa.string())])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------- the job

def parse_actors(spec: str) -> int | tuple[int, int]:
    """`--actors N` (a fixed pool) or `MIN,MAX` (Ray Data scales the pool between them)."""
    try:
        parts = [int(p) for p in str(spec).split(",")]
        if len(parts) == 1 and parts[0] >= 1:
            return parts[0]
        if len(parts) == 2 and 1 <= parts[0] <= parts[1]:
            return parts[0], parts[1]
    except ValueError:
        pass
    raise CurateError(f"--actors must be N or MIN,MAX with 1 <= MIN <= MAX, got {spec!r}")


def curate(input_spec: str, output: str | os.PathLike, *, preset: dict, controversial: str = "block",
           actors: int | tuple[int, int] = 1, actor_gpus: float = 0, actor_cpus: float = 1, batch_size: int = 16,
           max_batch: int = 32, max_batch_frames: int = 64, torch_threads: int = 1,
           data_columns: str | None = None, data_split: str = "train", shard_size: int = DEFAULT_SHARD_SIZE,
           verdict_store: str | None = None, store_mb: float = DEFAULT_STORE_MB, ray_address: str | None = None,
           num_cpus: int | None = None) -> dict:
    """Run the job (module docstring); returns the manifest. `preset`: `presets.use_preset`'s arguments."""
    from .proxy import checker_identity
    from .server import checker_description

    out = Path(output)
    models = describe_preset(preset)
    description = checker_description(models, controversial)
    identity = checker_identity(description)
    units, files = plan_units(input_spec, columns=data_columns, split=data_split, shard_size=shard_size)
    inputs = fingerprint(files)
    plan = {"format": MANIFEST_FORMAT, "input": input_spec, "data_columns": data_columns, "data_split": data_split,
            "shard_size": shard_size, "identity": identity, "inputs": inputs,
            "units": [[u.kind, u.path, u.start, u.stop] for u in units]}
    (out / "shards").mkdir(parents=True, exist_ok=True)
    (out / "parts").mkdir(exist_ok=True)
    previous = out / RUN_FILE
    if previous.exists():
        if json.loads(previous.read_text()) != plan:
            raise CurateError(f"{out} holds a curate run of other input, options or checker ({previous} differs); "
                              "give another OUTPUT, or delete this one to start over")
    else:
        _write_atomic(previous, json.dumps(plan, indent=1))
    store_path = verdict_store or str(out / "verdicts.sqlite")

    committed = {}
    for u in units:
        marker = out / "parts" / f"{u.name}.json"
        if marker.exists():
            committed[u.unit] = json.loads(marker.read_text())
        else:  # redo it from its start: remove what a killed run left
            for stale in (out / "shards" / f"{u.name}.parquet.tmp", out / "shards" / f"{u.name}.parquet"):
                stale.unlink(missing_ok=True)
    todo = [u for u in units if u.unit not in committed]
    started = time.time()
    run = {"units_committed_before": len(committed), "units_done": 0, "checked": 0, "from_store": 0, "actors": []}
    if todo:
        run.update(_run_ray(out, todo, committed, run, preset=preset, controversial=controversial, actors=actors,
                            actor_gpus=actor_gpus, actor_cpus=actor_cpus, batch_size=batch_size, max_batch=max_batch,
                            max_batch_frames=max_batch_frames, torch_threads=torch_threads, identity=identity,
                            store_path=store_path, store_bytes=int(store_mb * 2**20), data_columns=data_columns,
                            data_split=data_split, ray_address=ray_address, num_cpus=num_cpus))
    run["seconds"] = round(time.time() - started, 3)
    return _finish(out, units, committed, description, identity, plan, run, store_path)


def describe_preset(preset: dict) -> dict:
    """The `models` a checker of `preset` reports, without leaving the preset's environment (HF_HOME)
    in the driver: the driver loads no model, and may be a trainer's process."""
    from .presets import use_preset

    saved = dict(os.environ)
    try:
        return use_preset(**preset)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _run_ray(out: Path, todo: list[Unit], committed: dict, run: dict, *, preset, controversial, actors, actor_gpus,
             actor_cpus, batch_size, max_batch, max_batch_frames, torch_threads, identity, store_path, store_bytes,
             data_columns, data_split, ray_address, num_cpus) -> dict:
    import ray

    from .fleet import FleetError, join_ray

    try:
        join_ray(ray_address, num_cpus)  # with no address, the embedded default: a local Ray for this job
    except FleetError as e:
        raise CurateError(f"--ray-address {ray_address or '(local)'}: {e}") from None
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # units finish in order: the driver holds few at a time
    ctx.enable_progress_bars = False
    device = "cuda" if actor_gpus else "cpu"
    items = [{"unit": u.unit, "kind": u.kind, "path": u.path, "start": u.start, "stop": u.stop} for u in todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    pool = actors if isinstance(actors, int) else actors[1]
    roll_name = f"curate-roll-{os.getpid()}-{time.time_ns()}"
    roll = ray.remote(num_cpus=0)(ActorRoll).options(name=roll_name).remote()
    # Reads reserve no CPU: every logical CPU can go to a checker actor, and a pool that took them all
    # would otherwise starve the reads it waits on (2 actors on 2 CPUs hung). Decoding is light next
    # to the guard; at most one read task per actor (plus one) runs at a time.
    ds = ds.flat_map(read_unit, fn_kwargs={"columns": data_columns, "split": data_split}, num_cpus=0,
                     compute=ray.data.TaskPoolStrategy(size=pool + 1))
    ds = ds.map_batches(
        GuardActor, batch_size=batch_size, batch_format="numpy", num_gpus=actor_gpus or None,
        compute=(ray.data.ActorPoolStrategy(size=actors) if isinstance(actors, int)
                 else ray.data.ActorPoolStrategy(min_size=actors[0], max_size=actors[1])),
        num_cpus=actor_cpus,
        fn_constructor_kwargs={"preset": preset, "controversial": controversial, "max_batch": max_batch,
                               "max_batch_frames": max_batch_frames, "device": device, "torch_threads": torch_threads,
                               "identity": identity, "store": store_path, "store_bytes": store_bytes,
                               "roll": roll_name},
        # Workers of their own: a process that ran read tasks (theworld imported) never hosts the guard.
        runtime_env={"env_vars": {GUARD_ACTOR_ENV: "1"}},
    )
    by_unit = {u.unit: u for u in todo}
    open_units: dict[int, _UnitWriter] = {}
    actors_seen: dict[int, dict] = {}  # each actor's latest work totals, from the rows it returned
    for u in todo:
        if u.stop == u.start:  # an empty shard: committed at once
            committed[u.unit] = _UnitWriter(out, u).commit()
    t0, first, last_done = time.monotonic(), None, 0.0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        if first is None:  # actors started and warm from here on: what the bench's steady rate counts from
            first = time.monotonic() - t0
            run["first_result_seconds"], run["rows_in_first_result"] = round(first, 3), len(batch["id"])
        for r in range(len(batch["id"])):
            row = {k: batch[k][r] for k in batch}
            report = json.loads(row["actor"])
            if report["rows"] >= actors_seen.get(report["pid"], {}).get("rows", 0):  # its latest totals
                actors_seen[report["pid"]] = report
            last_done = max(last_done, float(row["done_at"]))
            u = int(row["unit"])
            writer = open_units.get(u) or open_units.setdefault(u, _UnitWriter(out, by_unit[u]))
            writer.add(row)
            if writer.done:
                committed[u] = writer.commit()
                run["units_done"] += 1
                run["checked"] += writer.checked
                run["from_store"] += writer.reused
                del open_units[u]
    if open_units:
        raise CurateError(f"units {sorted(open_units)} ended short of their rows; run curate again to redo them")
    idle = {"rows": 0, "calls": 0, "busy_s": 0.0, "guard_s": 0.0}
    enrolled = {a["pid"]: a for a in ray.get(roll.reports.remote())}
    ray.kill(roll)
    run["actors"] = sorted(({**enrolled.get(pid, {}), **idle, **actors_seen.get(pid, {})}
                            for pid in enrolled.keys() | actors_seen.keys()), key=lambda a: a["pid"])
    run["job_seconds"] = round(time.monotonic() - t0, 3)
    if actors_seen:  # checking time: from the first actor ready (guard loaded) to the last batch checked
        run["check_seconds"] = round(last_done - min(a["ready_at"] for a in actors_seen.values()), 3)
    return run


def _finish(out: Path, units: list[Unit], committed: dict, description: dict, identity: str, plan: dict,
            run: dict, store_path: str) -> dict:
    for name in ("blocked", "errors"):
        text = "".join((out / "parts" / f"{u.name}.{name}.jsonl").read_text(encoding="utf-8") for u in units)
        _write_atomic(out / f"{name}.jsonl", text)
    counts = {k: sum(committed[u.unit]["counts"][k] for u in units) for k in ("read", "kept", "blocked", "errors")}
    assert counts["read"] == counts["kept"] + counts["blocked"] + counts["errors"], counts
    manifest = {
        "format": MANIFEST_FORMAT,
        "checker": {"identity": identity, **{k: description[k] for k in ("models", "policy", "versions", "protocol")}},
        "counts": counts,
        "input": plan["input"],
        "data_columns": plan["data_columns"],
        "data_split": plan["data_split"],
        "inputs": plan["inputs"],
        "shards": [{"path": committed[u.unit]["shard"], "source": u.path, "rows": [u.start, u.stop],
                    "counts": committed[u.unit]["counts"]} for u in units],
        "verdict_store": str(Path(store_path).resolve()),
        "run": run,
    }
    _write_atomic(out / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def read_manifest(path: str | os.PathLike) -> dict | None:
    """The manifest of a curate OUTPUT folder (None when `path` is not one)."""
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        return None
    data = json.loads(manifest.read_text())
    if data.get("format") != MANIFEST_FORMAT:
        raise CurateError(f"{manifest}: format {data.get('format')!r}, expected {MANIFEST_FORMAT!r}; curate it again")
    return data


# ------------------------------------------------------------------------------------------ command

def add_arguments(p: argparse.ArgumentParser) -> None:
    """`curate`'s options (its model options are `serve`'s, added by the caller)."""
    p.add_argument("input", metavar="INPUT", help="what the trainer reads as --data: a .jsonl file, a save_to_disk folder, or a quoted "
                                 "glob of .parquet or webdataset .tar shards")
    p.add_argument("output", metavar="OUTPUT", help="folder for the curated dataset (created; run again on the same folder to resume)")
    p.add_argument("--data-columns", default=None,
                   help="column roles as for the trainer's --data-columns, e.g. images=image,question=prompt")
    p.add_argument("--data-split", default="train", help="split of a save_to_disk DatasetDict (default train)")
    p.add_argument("--actors", default="1",
                   help="checker actors: N (a fixed pool) or MIN,MAX (Ray Data scales the pool); each is a process "
                        "holding one checker (default 1)")
    p.add_argument("--actor-gpus", type=float, default=0,
                   help="GPUs per actor (e.g. 1, or 0.5 to share one); the guard then runs on cuda (default 0: CPU)")
    p.add_argument("--actor-cpus", type=float, default=1, help="CPUs Ray reserves per actor (default 1)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="samples per call to an actor (its checks are then batched by --max-batch/--max-batch-frames)")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                   help="rows per unit (one output shard, the unit of resume) of a .jsonl file or save_to_disk "
                        f"folder; a parquet/tar input keeps one output shard per input shard (default {DEFAULT_SHARD_SIZE})")
    p.add_argument("--verdict-store", default=None,
                   help="the shared verdict store (SQLite) to reuse and fill (default OUTPUT/verdicts.sqlite); "
                        "give every curate job and worker the same path to check no content twice")
    p.add_argument("--verdict-store-mb", type=float, default=DEFAULT_STORE_MB,
                   help=f"bound of the verdict store in MiB; least recently used verdicts go first (default {DEFAULT_STORE_MB})")
    p.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (e.g. auto, or HEAD:6379 from `ray start --head`); default: start a "
                        "local Ray on this machine for the job")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray started without --ray-address")


def main(args) -> int:
    """`python -m safety_worker curate` (called by `cli.main` with parsed arguments)."""
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from .server import Batching

    try:
        Batching(args.max_batch, args.max_batch_frames)
        manifest = curate(
            args.input, args.output, actors=parse_actors(args.actors), actor_gpus=args.actor_gpus,
            actor_cpus=args.actor_cpus, batch_size=args.batch_size, max_batch=args.max_batch,
            max_batch_frames=args.max_batch_frames, torch_threads=args.torch_threads,
            preset=preset_arguments(args), controversial=args.controversial, data_columns=args.data_columns,
            data_split=args.data_split, shard_size=args.shard_size, verdict_store=args.verdict_store,
            store_mb=args.verdict_store_mb, ray_address=args.ray_address, num_cpus=args.num_cpus)
    except (CurateError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"output": str(args.output), "counts": manifest["counts"],
                      "checker": manifest["checker"]["identity"], "run": {k: v for k, v in manifest["run"].items()
                                                                            if k != "actors"}}))
    return 0


def preset_arguments(args) -> dict:
    """`presets.use_preset`'s keyword arguments from `serve`-style options."""
    return {"preset": args.preset, "tiny_dir": args.tiny_dir, "tiny_faces": args.tiny_faces, "hf_home": args.hf_home,
            "guardrail_repo": args.guardrail_repo, "guardrail_dir": args.guardrail_dir,
            "text_guard_dir": args.text_guard_dir}
