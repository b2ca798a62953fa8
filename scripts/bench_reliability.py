"""Load, scale-out and cache figures for the safety worker (docs/RELIABILITY.md records the output).

    python scripts/bench_reliability.py                       # everything, full size
    python scripts/bench_reliability.py --only load --endpoint ipc:///run/w.sock --requests 1000

load:     P client processes x N mixed requests (ping, echo of random arrays, safe and blocked texts,
          samples with frames), 8 in flight per process; every reply is checked against what was
          sent (echo bytes, verdict, returned frames), so a lost or misrouted reply is counted.
          Prints p50/p99 latency and throughput.
replicas: the same video-check workload through `serve --replicas R` for each R (cache off).
cache:    one pass of distinct samples, then the same samples again (cache on): the speed-up.
Every figure of one run is measured side by side on the same machine; the ratios are what matter.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from safety_worker import SafetyClient, spawn_worker  # noqa: E402
from safety_worker.tiny import BLOCKED_PHRASE, SAFE_EXAMPLE  # noqa: E402

IN_FLIGHT = 8  # default per process: 8 x 8 = 64 = the worker's default queue, so no `busy` at full load


def _one_client(endpoint: str, n: int, seed: int, in_flight: int, out) -> None:
    """Runs in its own process: n mixed requests, each reply verified; reports latencies and faults."""
    rng = np.random.default_rng(seed)
    latencies, lost, wrong, why = [], 0, 0, {}
    pending = []

    def settle(item):
        nonlocal lost, wrong
        kind, expect, future, start = item
        try:
            value = future.result(timeout=120)
        except Exception as e:
            lost += 1
            name = getattr(e, "code", type(e).__name__)
            why[name] = why.get(name, 0) + 1
            return
        latencies.append(time.perf_counter() - start)
        if kind == "echo":  # raw replies (`SafetyClient.request`) for ping, echo and check_text
            ok = len(value.arrays) == 1 and np.array_equal(value.arrays[0], expect)
        elif kind == "text":
            ok = [v["safe"] for v in value.result["verdicts"]] == [expect]
        elif kind == "sample":
            ok = value.safe and value.frames is not None and np.array_equal(value.frames, expect)
        else:
            ok = isinstance(value.result, dict) and "instance_id" in value.result
        wrong += not ok

    with SafetyClient(endpoint, timeout=120) as client:
        start_all = time.perf_counter()
        for i in range(n):
            kind = ("ping", "echo", "text", "text", "sample")[i % 5]
            start = time.perf_counter()
            if kind == "ping":
                fut, expect = client.request("ping"), None
            elif kind == "echo":
                expect = rng.integers(0, 256, int(rng.integers(1, 4096)), dtype=np.uint8)
                fut = client.request("echo", arrays=[expect])
            elif kind == "text":
                blocked = bool(rng.random() < 0.5)
                text = f"{BLOCKED_PHRASE} {seed}-{i}" if blocked else f"{SAFE_EXAMPLE} {seed}-{i}"
                expect = not blocked
                fut = client.request("check_text", {"texts": [text]})
            else:
                expect = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
                fut = client.submit_sample(f"{SAFE_EXAMPLE} {seed}-{i}", expect)
            pending.append((kind, expect, fut, start))
            if len(pending) >= in_flight:
                settle(pending.pop(0))
        for item in pending:
            settle(item)
        elapsed = time.perf_counter() - start_all
    out.put({"latencies": latencies, "lost": lost, "why": why, "wrong": wrong, "elapsed": elapsed, "n": n})


def load(endpoint: str, processes: int = 8, requests: int = 1000, in_flight: int = IN_FLIGHT) -> dict:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_one_client, args=(endpoint, requests, seed, in_flight, out)) for seed in range(processes)]
    start = time.perf_counter()
    for p in procs:
        p.start()
    results = [out.get(timeout=900) for _ in procs]
    wall = time.perf_counter() - start
    for p in procs:
        p.join()
    lat = np.array([x for r in results for x in r["latencies"]])
    total = processes * requests
    return {"processes": processes, "requests_each": requests, "total": total,
            "answered": int(lat.size), "lost": sum(r["lost"] for r in results),
            "lost_because": {k: sum(r["why"].get(k, 0) for r in results) for r in results for k in r["why"]}, "misrouted_or_wrong": sum(r["wrong"] for r in results),
            "p50_ms": float(np.percentile(lat, 50) * 1e3) if lat.size else None,
            "p99_ms": float(np.percentile(lat, 99) * 1e3) if lat.size else None,
            "throughput_rps": total / max(r["elapsed"] for r in results), "wall_s": wall}


def _videos(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8) for _ in range(n)]


def _timed_pass(endpoint: str, videos: list[np.ndarray]) -> float:
    with SafetyClient(endpoint, timeout=300) as client:
        start = time.perf_counter()
        futures = [client.submit_sample(SAFE_EXAMPLE, v) for v in videos]
        assert all(f.result().safe for f in futures)
        return time.perf_counter() - start


def replicas_and_cache(tiny_dir: str | None, counts=(1, 2), samples: int = 40) -> dict:
    base = ["--tiny-faces", "all"] + (["--tiny-dir", tiny_dir] if tiny_dir else [])
    out = {"samples": samples, "video": [4, 64, 64, 3], "throughput": {}}
    for r in counts:
        with spawn_worker(extra_args=[*base, "--replicas", str(r), "--cache-mb", "0"]) as worker:
            _timed_pass(worker.endpoint, _videos(4, 99))  # warm-up
            seconds = _timed_pass(worker.endpoint, _videos(samples, r))
            out["throughput"][r] = samples / seconds
    with spawn_worker(extra_args=[*base, "--replicas", "1", "--cache-mb", "256"]) as worker:
        videos = _videos(samples, 7)
        first = _timed_pass(worker.endpoint, videos)
        second = _timed_pass(worker.endpoint, videos)
        with SafetyClient(worker.endpoint, timeout=30) as client:
            cache = client.stats()["proxy"]["cache"]
    out.update(cache_miss_s=first, cache_hit_s=second, cache_speedup=first / second, cache=cache)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("load", "replicas"), help="run one part (default: both)")
    ap.add_argument("--endpoint", help="load: use this running worker instead of spawning one")
    ap.add_argument("--processes", type=int, default=8, help="load: client processes (default 8)")
    ap.add_argument("--requests", type=int, default=1000, help="load: requests per process (default 1000)")
    ap.add_argument("--in-flight", type=int, default=IN_FLIGHT,
                    help=f"load: requests in flight per process (default {IN_FLIGHT}; more than queue/processes "
                    "shows the busy answers)")
    ap.add_argument("--replicas", default="1,2", help="replica counts to compare (default 1,2)")
    ap.add_argument("--samples", type=int, default=40, help="replicas/cache: video samples per pass (default 40)")
    ap.add_argument("--tiny-dir", default=None, help="tiny guardrail cache root (default: the worker's default)")
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    args = ap.parse_args(argv)
    result = {"cpus": os.cpu_count()}
    if args.only in (None, "load"):
        if args.endpoint:
            result["load"] = load(args.endpoint, args.processes, args.requests, args.in_flight)
        else:
            extra = ["--tiny-dir", args.tiny_dir] if args.tiny_dir else []
            with spawn_worker(extra_args=extra) as worker:
                result["load"] = load(worker.endpoint, args.processes, args.requests, args.in_flight)
    if args.only in (None, "replicas"):
        counts = tuple(int(x) for x in args.replicas.split(","))
        result["replicas"] = replicas_and_cache(args.tiny_dir, counts, args.samples)
    if args.json:
        print(json.dumps(result))
        return 0
    if "load" in result:
        r = result["load"]
        print(f"load: {r['processes']} processes x {r['requests_each']} mixed requests = {r['total']}: answered {r['answered']}, "
              f"lost {r['lost']}, misrouted/wrong {r['misrouted_or_wrong']}; p50 {r['p50_ms']:.2f} ms, "
              f"p99 {r['p99_ms']:.2f} ms, throughput {r['throughput_rps']:.0f} req/s")
    if "replicas" in result:
        r = result["replicas"]
        base = r["throughput"][min(r["throughput"])]
        for n, tput in r["throughput"].items():
            print(f"replicas {n}: {tput:.1f} video checks/s ({tput / base:.2f}x)  [{r['samples']} x uint8 {r['video']}]")
        print(f"cache: {r['samples']} samples checked in {r['cache_miss_s']:.2f} s, same samples again "
              f"{r['cache_hit_s'] * 1e3:.1f} ms: {r['cache_speedup']:.0f}x faster (hits {r['cache']['hits']})")
    print(f"(machine: {result['cpus']} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
