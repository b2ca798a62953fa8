"""Benchmark the training data path against the trainer, side by side in one run.

1. Decode vs training throughput (samples/s). The data path alone (``Prefetcher`` with the default
   ``--data-workers``, reading and decoding and checking every sample) over the motion task's clips
   (9 frames of 32x32) as the built-in synthetic task, a JSONL file of PNG frames, parquet shards and
   webdataset shards; against the tiny default trainer's samples/s (forward, backward, optimizer step
   on already-decoded samples). Target: every data form faster than the trainer.
2. Peak RSS of the data path alone (a fresh process reading a whole JSONL stream through the
   prefetcher) for a 10,000- and a 100,000-sample stream. Target: within 10 %.
3. The share of the training loop's time the trainer waits on data: short runs of the real trainer
   (``theworld.train``, tiny default models, a spawned tiny safety worker) on the synthetic task and on
   the same task as JSONL; ``data_wait_fraction`` from their summaries.

Usage: ``python scripts/bench_data.py [--samples 400] [--steps 30]`` (a few minutes on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

RSS_SIDE = """
import json, resource, sys, time
from theworld.data.prefetch import Prefetcher
from theworld.data.sources import JsonlDataset, SampleStream
def vm_rss_mb():  # the resident set now (ru_maxrss is the peak, which the imports may set)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
import_rss, import_now = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, vm_rss_mb()
dataset = JsonlDataset(sys.argv[1])
t0 = time.perf_counter()
reader = Prefetcher(SampleStream(dataset, seed=0).iter_loads_from(0), workers=int(sys.argv[2]))
bad, grown = 0, 0.0
for k, (_, sample) in zip(range(len(dataset)), reader):
    bad += isinstance(sample, Exception)
    if k % 1000 == 999:
        grown = max(grown, vm_rss_mb() - import_now)
reader.close()
print(json.dumps({"samples": len(dataset), "bad": bad, "seconds": time.perf_counter() - t0, "import_rss_mb": import_rss,
                  "max_growth_mb": grown, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_forms(task, folder: Path) -> dict[str, str]:
    """The task's samples as JSONL (PNG frames), parquet shards and webdataset shards."""
    import io
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from theworld.data.sources import write_jsonl

    def png_bytes(frame) -> bytes:
        out = io.BytesIO()
        Image.fromarray(frame).save(out, format="PNG")
        return out.getvalue()

    def add_member(tar, name: str, data: bytes):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    samples = [task[i] for i in range(len(task))]
    forms = {"jsonl": str(write_jsonl(samples, folder / "jsonl" / "train.jsonl"))}
    (folder / "parquet").mkdir()
    (folder / "webdataset").mkdir()
    half = len(samples) // 2
    for k, part in enumerate((samples[:half], samples[half:])):
        rows = [{"id": s["id"], "images": [{"bytes": png_bytes(f), "path": None} for f in s["images"]],
                 "messages": json.dumps(s["messages"])} for s in part]
        pq.write_table(pa.Table.from_pylist(rows), folder / "parquet" / f"train-{k:05d}.parquet")
        with tarfile.open(folder / "webdataset" / f"train-{k:05d}.tar", "w") as tar:
            for s in part:
                for j, frame in enumerate(s["images"]):
                    add_member(tar, f"{s['id']}.{j}.png", png_bytes(frame))
                add_member(tar, f"{s['id']}.json", json.dumps({"messages": s["messages"]}).encode())
    forms["parquet"] = str(folder / "parquet" / "train-*.parquet")
    forms["webdataset"] = str(folder / "webdataset" / "train-*.tar")
    return forms


def decode_rate(data, count: int, workers: int) -> float:
    """Samples/s of the data path alone: read, decode and check ``count`` samples in stream order."""
    from theworld.data.prefetch import Prefetcher
    from theworld.data.shards import ShardSource, ShardStream
    from theworld.data.sources import BadSample, SampleStream

    stream = ShardStream(data) if isinstance(data, ShardSource) else SampleStream(data, seed=0)
    reader = Prefetcher(stream.iter_loads_from(0), workers=workers)
    start = time.perf_counter()
    for _ in range(count):
        _, sample = next(reader)
        assert not isinstance(sample, BadSample), sample
    seconds = time.perf_counter() - start
    reader.close()
    return count / seconds


def train_rate(task, steps: int, batch_size: int) -> float:
    """Samples/s of the tiny default trainer's steps on already-decoded samples."""
    import torch

    from theworld.data.collator import TheWorldCollator
    from theworld.train import ModelArguments, TrainArguments, build_model

    model = build_model(ModelArguments(), seed=0)
    collate = TheWorldCollator(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=TrainArguments.learning_rate)
    samples = [task[i] for i in range(steps * batch_size)]
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        batch = collate(samples[step * batch_size : (step + 1) * batch_size])
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return steps * batch_size / (time.perf_counter() - start)


def rss(jsonl: Path, workers: int) -> dict:
    out = subprocess.run([sys.executable, "-c", RSS_SIDE, str(jsonl), str(workers)], cwd=REPO_ROOT, capture_output=True,
                         text=True, check=True, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    return json.loads(out.stdout.strip().splitlines()[-1])


def long_jsonl(path: Path, lines: int, template: dict, frame_paths: list[str]):
    """``lines`` samples pointing at the same few frames (the index, not the images, is what grows)."""
    with open(path, "w") as f:
        for i in range(lines):
            f.write(json.dumps({"id": f"s{i}", "images": frame_paths, "messages": template["messages"]}) + "\n")


def wait_share(workdir: Path, jsonl: str, heldout: str, steps: int) -> dict:
    from safety_worker import spawn_worker
    from theworld.train import parse_args, train

    results = {}
    with spawn_worker(preset="tiny") as worker:
        for name, data in (("synthetic", []), ("jsonl", ["--data", jsonl, "--eval-data", heldout])):
            summary = train(*parse_args([*data, "--output-dir", str(workdir / f"run-{name}"), "--safety-endpoint",
                                         worker.endpoint, "--max-steps", str(steps), "--eval-every", str(10 * steps),
                                         "--save-every", str(10 * steps), "--eval-size", "8", "--synthetic-eval-size", "8",
                                         "--report-to", "none"]))
            results[name] = {k: summary[k] for k in ("steps_per_second", "data_wait_fraction", "safety_wait_fraction",
                                                     "bad_samples")}
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=400, help="samples per decode measurement")
    parser.add_argument("--steps", type=int, default=30, help="trainer steps per measurement")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=None, help="--data-workers (default: the trainer's default)")
    parser.add_argument("--rss-lines", type=int, nargs=2, default=[10_000, 100_000])
    args = parser.parse_args()

    import torch

    from theworld.data.shards import ShardSource
    from theworld.data.sources import JsonlDataset
    from theworld.data.synthetic import SyntheticMotionTask
    from theworld.train import DataArguments

    torch.manual_seed(0)
    workers = DataArguments.data_workers if args.workers is None else args.workers
    task = SyntheticMotionTask(size=args.samples, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        forms = write_forms(task, tmp)
        trainer = train_rate(task, args.steps, args.batch_size)
        print(f"trainer (tiny default, batch {args.batch_size}): {trainer:.1f} samples/s")
        print(f"data path ({workers} decoding threads), 9-frame 32x32 clips:")
        for name, data in (("synthetic", task), ("jsonl", JsonlDataset(forms["jsonl"])),
                           ("parquet", ShardSource(forms["parquet"])), ("webdataset", ShardSource(forms["webdataset"]))):
            rate = decode_rate(data, args.samples, workers)
            print(f"  {name:<11} {rate:8.1f} samples/s = {rate / trainer:5.1f}x the trainer")

        frames = json.loads(Path(forms["jsonl"]).read_text().splitlines()[0])["images"]
        small, large = args.rss_lines
        results = []
        for lines in (small, large):
            path = Path(forms["jsonl"]).parent / f"stream-{lines}.jsonl"
            long_jsonl(path, lines, task[0], frames)
            results.append(rss(path, workers))
        for r in results:
            print(f"data path alone, {r['samples']:>7} samples streamed: peak RSS {r['peak_rss_mb']:.0f} MiB, "
                  f"resident set at most {r['max_growth_mb']:.1f} MiB above its size after the imports, "
                  f"{r['samples'] / r['seconds']:.0f} samples/s")
        print(f"peak RSS ratio {large // 1000}k / {small // 1000}k: {results[1]['peak_rss_mb'] / results[0]['peak_rss_mb']:.3f}")

        heldout = write_forms(SyntheticMotionTask(split="heldout", size=8, seed=0), tmp / "heldout")["jsonl"]
        for name, r in wait_share(tmp, forms["jsonl"], heldout, args.steps).items():
            print(f"trainer on {name:<9}: {r['steps_per_second']:.2f} steps/s, waited on data "
                  f"{r['data_wait_fraction']:.1%} and on the safety worker {r['safety_wait_fraction']:.1%} of the loop")


if __name__ == "__main__":
    main()
