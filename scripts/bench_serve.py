"""Benchmark `python -m theworld.serve` on the tiny models: warm latency and throughput at 1 / 4 / 8
concurrent clients, batching on (`--max-batch 8`) against off (`--max-batch 1`), the per-call time
of `python -m theworld.generate` for the same question, and the added latency of Ray Serve (`--ray`, one
model replica on a local Ray of 2 CPUs) at one client against the plain server, all in one run (the
machine is noisy: compare the ratios, not the absolute numbers).

    python scripts/bench_serve.py [--requests 48] [--max-tokens 16] [--json out.json] [--ray-only]

One tiny safety worker is spawned and shared by every server and by the attached `generate` calls;
`generate` is also timed as a new user runs it (spawning its own worker). `--ray-only` runs the Ray part
alone: the two servers are asked in alternating rounds, so that the machine's load moves both alike.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
CONCURRENCY = (1, 4, 8)


CONCURRENCY = (1, 4, 8)
RAY_FLAGS = ("--ray", "--num-cpus", "2", "--model-replicas", "1")
RAY_ROUNDS = 4  # alternating rounds of the plain and the Ray-served server at one client


def start_server(endpoint: str, max_batch: int, *extra: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "theworld.serve", "--port", "0", "--no-demo", "--safety-endpoint",
                             endpoint, "--max-batch", str(max_batch), *extra], cwd=REPO_ROOT, env=env or ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith("theworld-serve ready "):
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, line.split()[2]
    raise RuntimeError(f"the server (--max-batch {max_batch} {' '.join(extra)}) exited before it was ready")


def request_body(seed: int, max_tokens: int) -> dict:
    image = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "What is here?"}]}],
            "max_tokens": max_tokens, "temperature": 0}


def load(url: str, clients: int, requests: int, max_tokens: int, latencies: list[float] | None = None) -> dict:
    """`requests` requests from `clients` concurrent clients: latency percentiles and throughput (each
    latency is also appended to `latencies`, when given)."""
    bodies = [request_body(i, max_tokens) for i in range(requests)]
    latencies = [] if latencies is None else latencies
    mine_from = len(latencies)

    def client(share: list[dict]):
        with httpx.Client(base_url=url, timeout=300) as http:
            for body in share:
                started = time.perf_counter()
                response = http.post("/v1/chat/completions", json=body)
                response.raise_for_status()
                latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, [bodies[i::clients] for i in range(clients)]))
    wall = time.perf_counter() - started
    return dict(percentiles(latencies[mine_from:]), throughput_rps=requests / wall, requests=requests)


def percentiles(latencies: list[float]) -> dict:
    ordered = sorted(latencies)
    return {"p50_s": statistics.median(ordered), "p99_s": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]}


def ray_hop(endpoint: str, requests: int, max_tokens: int) -> dict:
    """p50 at one client, the plain server against the same model served through Ray Serve (one replica):
    asked in alternating rounds (`RAY_ROUNDS`), `requests` requests each in all."""
    # One torch thread in both: Ray gives a replica of one CPU OMP_NUM_THREADS=1, and a plain server with the
    # machine's threads would compare thread counts, not the Ray hop.
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    servers = {"plain": start_server(endpoint, 8, env=env)}
    started = time.perf_counter()
    servers["ray"] = start_server(endpoint, 8, *RAY_FLAGS, env=env)
    start_s = time.perf_counter() - started
    latencies: dict[str, list[float]] = {name: [] for name in servers}
    try:
        for _, url in servers.values():
            load(url, 1, 4, max_tokens)  # warm-up
        for _ in range(RAY_ROUNDS):
            for name, (_, url) in servers.items():
                load(url, 1, max(1, requests // RAY_ROUNDS), max_tokens, latencies[name])
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(60)
    out = {name: percentiles(values) for name, values in latencies.items()}
    out["p50_ratio_ray_over_plain"] = out["ray"]["p50_s"] / out["plain"]["p50_s"]
    out["ray_start_s"] = start_s
    return out


def print_ray_hop(hop: dict) -> None:
    print(f"one client, p50 / p99: plain {1000 * hop['plain']['p50_s']:.1f} / {1000 * hop['plain']['p99_s']:.1f} ms, "
          f"Ray Serve (1 model replica) {1000 * hop['ray']['p50_s']:.1f} / {1000 * hop['ray']['p99_s']:.1f} ms: "
          f"p50 {hop['p50_ratio_ray_over_plain']:.2f}x (Ray and the replica ready in {hop['ray_start_s']:.0f} s)")


def time_generate(image: Path, endpoint: str | None) -> float:
    cmd = [sys.executable, "-m", "theworld.generate", "--image", str(image), "--prompt", "What is here?",
           "--max-new-tokens", "16"] + (["--safety-endpoint", endpoint] if endpoint else [])
    started = time.perf_counter()
    subprocess.run(cmd, cwd=REPO_ROOT, env=ENV, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=48, help="requests per concurrency level and server")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--ray-only", action="store_true", help="only the added latency of Ray Serve at one client")
    args = parser.parse_args()

    from safety_worker import spawn_worker
    from theworld.tiny import build_tiny_models, default_tiny_dir

    build_tiny_models(default_tiny_dir())  # built once, outside the timings
    results: dict = {"concurrency": {}, "generate": {}}
    with spawn_worker(preset="tiny") as worker, tempfile.TemporaryDirectory() as tmp:
        results["ray_serve"] = ray_hop(worker.endpoint, args.requests, args.max_tokens)
        if args.ray_only:
            print_ray_hop(results["ray_serve"])
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=2))
            return 0
        image = Path(tmp) / "scene.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(image)
        servers = {"batched": start_server(worker.endpoint, 8), "unbatched": start_server(worker.endpoint, 1)}
        try:
            for _, url in servers.values():
                load(url, 4, 8, args.max_tokens)  # warm-up
            for clients in CONCURRENCY:
                row = results["concurrency"][clients] = {}
                for name, (_, url) in servers.items():  # side by side, level by level
                    row[name] = load(url, clients, args.requests, args.max_tokens)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(60)
        results["generate"]["attached_s"] = statistics.median(time_generate(image, worker.endpoint) for _ in range(2))
        results["generate"]["spawning_s"] = time_generate(image, None)

    print(f"{'clients':>7} {'server':>10} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>7}")
    for clients, row in results["concurrency"].items():
        for name, r in row.items():
            print(f"{clients:>7} {name:>10} {1000 * r['p50_s']:>8.1f} {1000 * r['p99_s']:>8.1f} {r['throughput_rps']:>7.2f}")
    one = results["concurrency"][1]["batched"]["p50_s"]
    gen = results["generate"]
    gain = {c: row["batched"]["throughput_rps"] / row["unbatched"]["throughput_rps"]
            for c, row in results["concurrency"].items()}
    results["ratios"] = {"generate_attached_over_serve_p50": gen["attached_s"] / one,
                         "generate_spawning_over_serve_p50": gen["spawning_s"] / one,
                         "batching_throughput_gain": gain}
    print(f"python -m theworld.generate per call: {gen['attached_s']:.2f} s attached to the worker, "
          f"{gen['spawning_s']:.2f} s spawning its own (as a new user runs it)")
    print(f"a warm served request (1 client, p50): {1000 * one:.1f} ms = "
          f"{results['ratios']['generate_attached_over_serve_p50']:.0f}x / "
          f"{results['ratios']['generate_spawning_over_serve_p50']:.0f}x faster")
    print("throughput, batching on / off: " + ", ".join(f"{c} clients {g:.2f}x" for c, g in gain.items()))
    print_ray_hop(results["ray_serve"])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
