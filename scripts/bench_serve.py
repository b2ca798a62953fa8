"""Benchmark `python -m theworld.serve` on the tiny models: warm latency and throughput at 1 / 4 / 8
concurrent clients, batching on (`--max-batch 8`) against off (`--max-batch 1`), the per-call time
of `python -m theworld.generate` for the same question, the added latency of Ray Serve (`--ray`, one
model replica on a local Ray of 2 CPUs) at one client against the plain server, and the Ray-served
model's throughput from 8 clients with 2 model replicas against 1, all in one run (the machine is noisy:
compare the ratios, not the absolute numbers).

    python scripts/bench_serve.py [--requests 48] [--max-tokens 16] [--json out.json] [--ray-only]

One tiny safety worker is spawned and shared by every server and by the attached `generate` calls;
`generate` is also timed as a new user runs it (spawning its own worker). `--ray-only` runs the Ray part
alone: first the two servers at one client; then two Ray-served servers, with 1 and with 2 model replicas
(`--model-replicas`, each replica one torch thread, each server on a local Ray of its own), 8 client threads
asking 8x `--requests` questions of each. Both comparisons are asked in alternating rounds, so that the
machine's load moves both sides alike. The throughput comes with what explains its ratio: the cores and
CPU milliseconds per request of each part (the model replicas, the ingress, Serve's HTTP proxy, the safety
worker, the clients, Ray's own processes; the idle server; the rest of the machine, whose other sessions
share these cores), read from /proc before and after every round, and the replicas' mean batch from the
ingress's `/metrics`.
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
RAY_FLAGS = ("--ray", "--num-cpus", "2")  # a local Ray of 2 CPUs: room for 2 one-CPU model replicas
RAY_ROUNDS = 4  # alternating rounds of the plain and the Ray-served server at one client
SCALE_CLIENTS = 8  # concurrent clients of the throughput rounds (issue 25's workload)
SCALE_REPLICAS = (1, 2)  # model replicas of the two Ray-served servers compared
SCALE_TARGET = 1.7  # requests/s with 2 model replicas over 1 (issue 25)
SCALE_REQUESTS = 8  # x --requests per server in all, asked in SCALE_ROUNDS alternating rounds: ~10-30 s per server
SCALE_ROUNDS = 4
# Which part of the Ray-served model a process is, by its command line: Ray titles an actor's process
# `ray::ServeReplica:<application>:<deployment>...` and Serve's proxy `ray::ProxyActor...`; first match wins.
# The rest of the asked server's tree (GCS, raylet, Serve's controller, the roll call, the server itself, which is
# Ray's driver) is "Ray's own"; this process (the client threads) is "clients"; its `-m safety_worker` child is the
# "safety worker"; the server not asked in a round, with its own Ray, is "the idle server".
PROCESS_ROLES = (("ModelReplica", "model replicas"), ("ModelIngress", "ingress"), ("ProxyActor", "HTTP proxy"))
CPU_ROLES = ("model replicas", "ingress", "HTTP proxy", "safety worker", "clients", "Ray's own")


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
        for body in share:
            started = time.perf_counter()
            response = http.post("/v1/chat/completions", json=body)
            response.raise_for_status()
            latencies.append(time.perf_counter() - started)

    # One httpx client (thread-safe, a connection each) for all: building one costs ~35 ms of CPU (its TLS context),
    # which the clients would take from the server on these 2 cores at every call.
    with httpx.Client(base_url=url, timeout=300) as http:
        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(client, [bodies[i::clients] for i in range(clients)]))
        wall = time.perf_counter() - started
    return dict(percentiles(latencies[mine_from:]), throughput_rps=requests / wall, requests=requests)


def percentiles(latencies: list[float]) -> dict:
    ordered = sorted(latencies)
    return {"p50_s": statistics.median(ordered), "p99_s": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]}


def stop(*servers: tuple[subprocess.Popen, str]) -> None:
    for proc, _ in servers:
        proc.terminate()
        proc.wait(60)


def ray_part(endpoint: str, requests: int, max_tokens: int) -> dict:
    """The Ray part: p50 at one client, the plain server against the same model served through Ray Serve (one
    replica), asked in alternating rounds (`RAY_ROUNDS`), `requests` requests each in all; then `SCALE_CLIENTS`
    clients' throughput at the Ray-served model with 1 and with 2 model replicas (`scale_rounds`)."""
    # One torch thread in both: Ray gives a replica of one CPU OMP_NUM_THREADS=1, and a plain server with the
    # machine's threads would compare thread counts, not the Ray hop.
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    servers = {"plain": start_server(endpoint, 8, env=env)}
    ready_s = {}
    for replicas in SCALE_REPLICAS[:1]:
        started = time.perf_counter()
        servers[replicas] = start_server(endpoint, 8, *RAY_FLAGS, "--model-replicas", str(replicas), env=env)
        ready_s[replicas] = time.perf_counter() - started
    latencies: dict = {name: [] for name in servers}
    try:
        for _, url in servers.values():
            load(url, 1, 4, max_tokens)  # warm-up
        for _ in range(RAY_ROUNDS):
            for name, (_, url) in servers.items():
                load(url, 1, max(1, requests // RAY_ROUNDS), max_tokens, latencies[name])
        stop(servers.pop("plain"))  # idle, it would still take some CPU from the throughput rounds
        for replicas in SCALE_REPLICAS[1:]:
            started = time.perf_counter()
            servers[replicas] = start_server(endpoint, 8, *RAY_FLAGS, "--model-replicas", str(replicas), env=env)
            ready_s[replicas] = time.perf_counter() - started
        scaling = scale_rounds(servers, SCALE_REQUESTS * requests, max_tokens)
    finally:
        stop(*servers.values())
    out = {"plain": percentiles(latencies["plain"]), "ray": percentiles(latencies[SCALE_REPLICAS[0]])}
    out["p50_ratio_ray_over_plain"] = out["ray"]["p50_s"] / out["plain"]["p50_s"]
    out["ray_start_s"] = ready_s[SCALE_REPLICAS[0]]
    for replicas, phase in scaling["replicas"].items():
        phase["ready_s"] = ready_s[replicas]
    out["scaling"] = scaling
    return out


def scale_rounds(servers: dict[int, tuple[subprocess.Popen, str]], requests: int, max_tokens: int) -> dict:
    """`requests` requests from `SCALE_CLIENTS` clients at each Ray-served server (`{model replicas: server}`), asked
    in `SCALE_ROUNDS` alternating rounds so that the machine's load moves both alike, and what explains their rates:
    each part's cores and CPU ms per request (`cpu_spent`, around every round), and the mean batch the replicas
    generated (the ingress's `/metrics`)."""
    for _, url in servers.values():
        load(url, SCALE_CLIENTS, 2 * SCALE_CLIENTS, max_tokens)  # warm-up: every replica's first batches
    per_round = max(SCALE_CLIENTS, requests // SCALE_ROUNDS)
    latencies: dict = {n: [] for n in servers}
    walls, batches, spent = dict.fromkeys(servers, 0.0), {n: [0.0, 0.0] for n in servers}, {}
    load_before = os.getloadavg()[0]
    for _ in range(SCALE_ROUNDS):
        for n, (proc, url) in servers.items():
            batches_before = batch_totals(metrics_text(url))
            before = cpu_snapshot(proc.pid)
            walls[n] += per_round / load(url, SCALE_CLIENTS, per_round, max_tokens, latencies[n])["throughput_rps"]
            spent[n] = add_spent(spent.get(n), cpu_spent(before, cpu_snapshot(proc.pid)))
            batches[n] = [total + b - a for total, a, b in zip(batches[n], batches_before, batch_totals(metrics_text(url)))]
    phases = {n: {**percentiles(latencies[n]), "requests": SCALE_ROUNDS * per_round,
                  "throughput_rps": SCALE_ROUNDS * per_round / walls[n],
                  **cpu_shares(spent[n], SCALE_ROUNDS * per_round),
                  "mean_batch": batches[n][0] / batches[n][1] if batches[n][1] else 0.0} for n in servers}
    first, last = phases[SCALE_REPLICAS[0]], phases[SCALE_REPLICAS[-1]]
    return {"clients": SCALE_CLIENTS, "rounds": SCALE_ROUNDS, "replicas": phases,
            "throughput_ratio": last["throughput_rps"] / first["throughput_rps"],
            "load_average": [load_before, os.getloadavg()[0]]}


def process_role(proc, clients_pid: int, serving: set[int]) -> str:
    if proc.pid == clients_pid:
        return "clients"
    title = " ".join(proc.cmdline())
    if "-m safety_worker" in title:
        return "safety worker"
    if proc.pid not in serving:
        return "the idle server"
    return next((role for needle, role in PROCESS_ROLES if needle in title), "Ray's own")


def cpu_snapshot(server_pid: int) -> dict:
    """CPU seconds so far of this process (the client threads) and of its descendants (the safety worker, the server
    `server_pid` and its local Ray's processes, another server), by pid with their role; the whole machine's (busy,
    idle, stolen: every session's); and the time."""
    import psutil

    from bench_curate import machine_cpu

    me, server = psutil.Process(), psutil.Process(server_pid)
    serving = {server_pid, *(proc.pid for proc in server.children(recursive=True))}
    cpu = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()  # /proc/PID/stat's utime and stime
            cpu[proc.pid] = (process_role(proc, me.pid, serving), times.user + times.system)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return {"time": time.perf_counter(), "cpu": cpu, "machine": machine_cpu()}


def cpu_spent(before: dict, after: dict) -> dict:
    """CPU seconds each part (`CPU_ROLES`, the idle server, the rest of the machine) and each model replica (by pid)
    used between two `cpu_snapshot`s, the machine's idle and stolen seconds, and the wall seconds."""
    used: dict[str, float] = dict.fromkeys((*CPU_ROLES, "the idle server"), 0.0)
    replicas: dict[int, float] = {}
    for pid, (role, cpu) in after["cpu"].items():
        spent = cpu - before["cpu"].get(pid, (role, 0.0))[1]  # started in between: all its CPU counts
        used[role] += spent
        if role == "model replicas":
            replicas[pid] = spent
    busy, idle, steal = (b - a for a, b in zip(before["machine"], after["machine"]))
    used["rest of the machine"] = busy - sum(used.values())  # other sessions' processes share these cores
    return {"wall": after["time"] - before["time"], "used": used, "replicas": replicas, "idle": idle, "steal": steal}


def add_spent(total: dict | None, more: dict) -> dict:
    if total is None:
        return more
    return {"wall": total["wall"] + more["wall"], "idle": total["idle"] + more["idle"],
            "steal": total["steal"] + more["steal"],
            "used": {role: total["used"][role] + more["used"][role] for role in total["used"]},
            "replicas": {pid: total["replicas"].get(pid, 0.0) + more["replicas"].get(pid, 0.0)
                         for pid in {*total["replicas"], *more["replicas"]}}}


def cpu_shares(spent: dict, requests: int) -> dict:
    """`cpu_spent`'s seconds as cores (over its wall time) and as CPU ms per request of the `requests` served; "all of
    these" is the served model's parts together (`CPU_ROLES`)."""
    used = {role: spent["used"][role] for role in CPU_ROLES}
    used["all of these"] = sum(used.values())  # the served model, its guard, its clients and its Ray
    used.update({role: spent["used"][role] for role in ("the idle server", "rest of the machine")})
    wall = spent["wall"]
    return {"cores": {role: seconds / wall for role, seconds in used.items()},
            "cpu_ms_per_request": {role: 1000 * seconds / requests for role, seconds in used.items()},
            "replica_cores": sorted((seconds / wall for seconds in spent["replicas"].values()), reverse=True),
            "idle_cores": spent["idle"] / wall, "steal_cores": spent["steal"] / wall}


def metrics_text(url: str) -> str:
    response = httpx.get(f"{url}/metrics", timeout=60)
    response.raise_for_status()
    return response.text


def batch_totals(exposition: str) -> tuple[float, float]:
    """(requests, batches) the model generated so far, from a server's `/metrics` (`theworld_serve_batch_size`)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(exposition):
        if family.name == "theworld_serve_batch_size":
            totals = {sample.name: sample.value for sample in family.samples}
            return totals["theworld_serve_batch_size_sum"], totals["theworld_serve_batch_size_count"]
    raise RuntimeError("the server's /metrics has no theworld_serve_batch_size")


def print_ray_hop(hop: dict) -> None:
    print(f"one client, p50 / p99: plain {1000 * hop['plain']['p50_s']:.1f} / {1000 * hop['plain']['p99_s']:.1f} ms, "
          f"Ray Serve (1 model replica) {1000 * hop['ray']['p50_s']:.1f} / {1000 * hop['ray']['p99_s']:.1f} ms: "
          f"p50 {hop['p50_ratio_ray_over_plain']:.2f}x (Ray and the replica ready in {hop['ray_start_s']:.0f} s)")


def print_ray_scaling(scaling: dict) -> None:
    phases = scaling["replicas"]
    first, last = phases[SCALE_REPLICAS[0]], phases[SCALE_REPLICAS[-1]]
    ratio = scaling["throughput_ratio"]
    print(f"{scaling['clients']} clients, Ray Serve, {first['requests']} requests per server in {scaling['rounds']} "
          "alternating rounds: "
          + ", ".join(f"{n} model replica{'s' * (n > 1)} {phase['throughput_rps']:.2f} req/s" for n, phase in phases.items())
          + f": {SCALE_REPLICAS[-1]} / {SCALE_REPLICAS[0]} {ratio:.2f}x "
          f"(target >= {SCALE_TARGET}x: {'met' if ratio >= SCALE_TARGET else 'MISSED'}); load average "
          + " -> ".join(f"{x:.1f}" for x in scaling["load_average"]))
    print("  where the cores went while each server was asked: cores (CPU ms per request)")
    print(f"  {'':22}" + "".join(f"{f'{n} replica' + 's' * (n > 1):>20}" for n in phases))
    for role in first["cores"]:
        print(f"  {role:22}" + "".join(f"{phase['cores'][role]:>12.2f} ({phase['cpu_ms_per_request'][role]:5.1f})"
                                       for phase in phases.values()))
    for name, key in (("idle", "idle_cores"), ("steal", "steal_cores")):
        print(f"  {name:22}" + "".join(f"{phase[key]:>12.2f}{'':8}" for phase in phases.values()))
    rows = {"each model replica": lambda phase: " + ".join(f"{c:.2f}" for c in phase["replica_cores"]),
            "mean model batch": lambda phase: f"{phase['mean_batch']:.1f}",
            "replicas' ms per batch": lambda phase: f"{phase['cpu_ms_per_request']['model replicas'] * phase['mean_batch']:.1f}",
            "p50 / p99 ms": lambda phase: f"{1000 * phase['p50_s']:.0f} / {1000 * phase['p99_s']:.0f}",
            "ready in s": lambda phase: f"{phase['ready_s']:.0f}"}
    for name, row in rows.items():
        print(f"  {name:22}" + "".join(f"{row(phase):>20}" for phase in phases.values()))
    # requests/s = replica cores / replica CPU seconds per request, so the ratio splits into the cores the replicas
    # got and what a request cost them, to within the few milliseconds between the snapshots and the clients' own
    # clock; a request's cost is its batch's (CPU ms per batch, above) over the batch's size.
    cores = last["cores"]["model replicas"] / first["cores"]["model replicas"]
    cost = first["cpu_ms_per_request"]["model replicas"] / last["cpu_ms_per_request"]["model replicas"]
    print(f"  {SCALE_REPLICAS[-1]} / {SCALE_REPLICAS[0]} replicas = their cores, {SCALE_REPLICAS[-1]} over "
          f"{SCALE_REPLICAS[0]}, x{cores:.2f} times their CPU per request, {SCALE_REPLICAS[0]} over "
          f"{SCALE_REPLICAS[-1]}, x{cost:.2f} = {cores * cost:.2f}x")


def time_generate(image: Path, endpoint: str | None) -> float:
    cmd = [sys.executable, "-m", "theworld.generate", "--image", str(image), "--prompt", "What is here?",
           "--max-new-tokens", "16"] + (["--safety-endpoint", endpoint] if endpoint else [])
    started = time.perf_counter()
    subprocess.run(cmd, cwd=REPO_ROOT, env=ENV, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=48, help="requests per concurrency level and server (the Ray "
                        f"throughput phases: {SCALE_REQUESTS}x this)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--ray-only", action="store_true", help="only the Ray part: the added latency of Ray Serve at "
                        f"one client, then {SCALE_CLIENTS} clients' throughput with 2 model replicas against 1")
    args = parser.parse_args()

    from safety_worker import spawn_worker
    from theworld.tiny import build_tiny_models, default_tiny_dir

    build_tiny_models(default_tiny_dir())  # built once, outside the timings
    results: dict = {"concurrency": {}, "generate": {}}
    with spawn_worker(preset="tiny") as worker, tempfile.TemporaryDirectory() as tmp:
        results["ray_serve"] = ray_part(worker.endpoint, args.requests, args.max_tokens)
        if args.ray_only:
            print_ray_hop(results["ray_serve"])
            print_ray_scaling(results["ray_serve"]["scaling"])
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
            stop(*servers.values())
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
    print_ray_scaling(results["ray_serve"]["scaling"])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
