"""Benchmark the safety worker against bare pyzmq and against the in-process checker, in one run.

    python scripts/bench_worker.py            # ~2-3 minutes on 2 CPU cores
    python scripts/bench_worker.py --quick    # fewer repetitions

Prints, side by side from the same run:
1. small-message round trip p50/p99: worker `ping` and `check_text` vs a bare DEALER/ROUTER echo;
2. a 16x480x640x3 uint8 clip through the worker's transport (`echo`, no checking) vs a bare pyzmq
   zero-copy echo of the same bytes (target <= 1.5x);
3. remote vs in-process for the same real checker calls on the tiny checkpoint, text and a clip
   (target <= 1.10x for the clip);
4. check_sample requests/s with 1, 2 and 4 client processes;
5. dynamic batching: two workers side by side, batching on (the `serve` defaults) and `--max-batch 1`
   (one request at a time): single-client p50 latency of check_sample (text + one 32x32 frame;
   target <= 1.2x), and check_sample requests/s with 1 and 8 client processes for one 32x32 frame
   (target: 8 clients batched >= 3x one client unbatched), 9-frame 32x32 clips and one 240x320 frame.
6. a guard fleet on Ray Serve (`serve --ray --replicas N`, a local Ray of 2 CPUs, verdict cache off so every
   request is checked): check_sample (text + one 32x32 frame) requests/s from 8 client processes with 2
   replicas vs 1 (target >= 1.7x at 4 requests in flight per client; also printed at 16), beside the single
   worker, each with its checkers' mean batch and busy ms per check; and the Ray hop's added latency at one
   client, one request in flight: p50 of the 1-replica fleet vs the single worker (target <= 1.5x).
This process imports cosmos_guardrail for part 3 (it is a benchmark, not a trainer).

    python scripts/bench_worker.py --batching-only   # part 5 alone (~2 minutes on 2 CPU cores)
    python scripts/bench_worker.py --fleet-only      # part 6 alone (~2 minutes on 2 idle CPU cores: two Ray starts)
    python scripts/bench_worker.py --batching-only --device cuda   # the same with the guard models on a GPU
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from safety_worker import SafetyClient, spawn_worker  # noqa: E402
from safety_worker.presets import use_preset  # noqa: E402
from safety_worker.tiny import SAFE_EXAMPLE, default_tiny_dir  # noqa: E402

BARE_ECHO = textwrap.dedent("""
    import sys, zmq
    ctx = zmq.Context(); s = ctx.socket(zmq.ROUTER); s.bind(sys.argv[1])
    print("ready", flush=True)
    while True:
        s.send_multipart(s.recv_multipart(copy=False), copy=False)
""")


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def timed_pair(fa, fb, n, warmup=2):
    """Time fa and fb alternately, so load from other processes hits both alike."""
    ta, tb = [], []
    for i in range(n + warmup):
        for fn, out in ((fa, ta), (fb, tb)):
            t = time.perf_counter()
            fn()
            if i >= warmup:
                out.append(time.perf_counter() - t)
    return ta, tb


def bare_echo(endpoint):
    proc = subprocess.Popen([sys.executable, "-c", BARE_ECHO, endpoint], stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(endpoint)

    def roundtrip(frames):
        sock.send_multipart(frames, copy=False)
        return sock.recv_multipart(copy=False)

    def close():
        sock.close(linger=0)
        ctx.term()
        proc.kill()
        proc.wait()

    return roundtrip, close


WINDOW = 8  # requests in flight per client (4 clients x 8 stay below the worker's queue of 64)


def client_proc(endpoint, n, queue, start, shape=(1, 32, 32, 3), window=WINDOW, seed=0, distinct=False):
    frames = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    with SafetyClient(endpoint, timeout=300) as c:
        c.check_sample(SAFE_EXAMPLE, frames)
        queue.put("ready")
        start.wait()  # all clients begin together: process start-up is not part of the measurement
        in_flight = []
        for i in range(n):
            if len(in_flight) == window:
                in_flight.pop(0).result()
            if distinct:  # a front that forwards computes identical checks in flight once: make each one new
                frames = frames.copy()
                frames[0, 0, 0, :2] = (i % 256, i // 256 % 256)
            in_flight.append(c.submit_sample(SAFE_EXAMPLE, frames))
        for f in in_flight:
            f.result()
        queue.put(time.monotonic())  # CLOCK_MONOTONIC: one clock for all processes of the machine


def throughput(endpoint, clients, n_per_client, shape=(1, 32, 32, 3), window=WINDOW, on_start=None, distinct=False):
    """Requests/s of `clients` processes, each keeping `window` check_sample requests in flight,
    from the moment all of them start sending to the moment the last one has all its verdicts.
    `on_start` is called once all clients are connected and warmed up, just before they start.
    `distinct`: every request's frames differ (else each client sends the same one again and again)."""
    ctx = mp.get_context("spawn")
    q, start = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=client_proc, args=(endpoint, n_per_client, q, start, shape, window, k, distinct))
             for k in range(clients)]
    for p in procs:
        p.start()
    assert [q.get() for _ in procs] == ["ready"] * clients
    if on_start is not None:
        on_start()
    t0 = time.monotonic()
    start.set()
    finished = [q.get() for _ in procs]
    for p in procs:
        p.join()
    return clients * n_per_client / (max(finished) - t0), time.monotonic() - t0


def ms(x):
    return f"{x * 1e3:8.3f} ms"


BATCH_WORKLOADS = (  # (name, frames shape, requests in flight per client, requests per client with 1 / 8 clients)
    ("text + 1x32x32", (1, 32, 32, 3), 1, 60, 30),
    ("text + 1x32x32", (1, 32, 32, 3), 4, 80, 40),
    ("text + 9x32x32 clip", (9, 32, 32, 3), 4, 12, 6),
    ("text + 1x240x320", (1, 240, 320, 3), 4, 8, 4),
)


def batching_section(tiny_root, quick: bool, device: str = "cpu") -> None:
    """Part 5: the same requests to a batching worker and a --max-batch 1 worker, side by side."""
    scale = 0.5 if quick else 1.0
    extra = ["--tiny-dir", str(tiny_root), "--tiny-faces", "all"]
    with spawn_worker(preset="tiny", device=device, extra_args=extra) as on, \
            spawn_worker(preset="tiny", device=device, extra_args=[*extra, "--max-batch", "1"]) as off, \
            SafetyClient(on.endpoint, timeout=300) as c_on, SafetyClient(off.endpoint, timeout=300) as c_off:
        b = on.hello["batching"]
        print(f"\n## 5. dynamic batching: batching on (--max-batch {b['max_batch']} --max-batch-frames "
              f"{b['max_batch_frames']} --batch-wait-ms {b['wait_ms']:g}) vs off (--max-batch 1), tiny checkpoint, "
              f"faces all, guard models on {on.hello.get('device', device)}")
        frame = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
        t_off, t_on = timed_pair(lambda: c_off.check_sample(SAFE_EXAMPLE, frame),
                                 lambda: c_on.check_sample(SAFE_EXAMPLE, frame), int(100 * scale), warmup=5)
        r_lat = statistics.median(t_on) / statistics.median(t_off)
        print(f"single client, one request in flight, check_sample text + 1x32x32: p50 {ms(statistics.median(t_off))} off"
              f"  {ms(statistics.median(t_on))} on  ratio {r_lat:.2f}x (target <= 1.2x: {'met' if r_lat <= 1.2 else 'MISSED'})")
        print("check_sample requests/s from client processes that each keep `window` requests in flight "
              "(window 1: each waits for its verdict; the trainer's SafetyFilter keeps 64). mean batch: "
              "texts-or-samples per checker batch; ms: checker time per batch; checker busy: share of the run the checker "
              "spent computing (near 100 %: compute-bound, more clients cannot go faster). x: 8 clients with batching on / "
              "1 client with batching off.")
        for name, shape, window, n1, n8 in BATCH_WORKLOADS:
            rates = {}
            for clients, n in ((1, n1), (8, n8)):
                for label, worker, client in (("off", off, c_off), ("on", on, c_on)):
                    before, per_client = {}, max(2, int(n * scale))
                    requests = clients * per_client
                    rates[label, clients], _ = throughput(worker.endpoint, clients, per_client, shape, window,
                                                          on_start=lambda: before.update(client.stats()))
                    after = client.stats()
                    batches = after["batching"]["batches"] - before["batching"]["batches"]
                    busy = after["check_seconds"] - before["check_seconds"]
                    rates[label, clients, "mean"] = (after["batching"]["units"] - before["batching"]["units"]) / batches if batches else 0.0
                    rates[label, clients, "ms"] = 1e3 * busy / batches if batches else 0.0
                    rates[label, clients, "busy"] = busy * rates[label, clients] / requests  # share of the measured time
            r8 = rates["on", 8] / rates["off", 1]
            target = f" (target >= 3x: {'met' if r8 >= 3 else 'MISSED'})" if shape == (1, 32, 32, 3) else ""
            print(f"{name:20s} window {window}: 1 client {rates['off', 1]:6.1f} off {rates['on', 1]:6.1f} on (mean batch "
                  f"{rates['on', 1, 'mean']:4.1f}) | 8 clients {rates['off', 8]:6.1f} off {rates['on', 8]:6.1f} on (mean batch "
                  f"{rates['on', 8, 'mean']:4.1f}, {rates['on', 8, 'ms']:.0f} ms, checker busy {rates['on', 8, 'busy']:.0%}) "
                  f"| x {r8:.2f}{target}")


def _checker_totals(client, fleet: bool) -> tuple[float, float, float]:
    """(batches, checked units, checker-busy seconds) of a single worker, or summed over a fleet's live
    replicas (as their last heartbeat, at most `_HEARTBEAT_S` old, reported them)."""
    stats = client.stats()
    if fleet:
        loads = [r["load"] for r in stats["fleet"]["roster"]]
        return tuple(sum(load[k] or 0 for load in loads) for k in ("batches", "batch_units", "check_seconds"))
    return stats["batching"]["batches"], stats["batching"]["units"], stats["check_seconds"]


def _fleet_rate(endpoint, client, fleet: bool, per_client: int, shape, window: int) -> dict:
    """8 clients' requests/s, and what the checker(s) did for them: mean batch, busy ms per check."""
    settle = 2.5 if fleet else 0.0  # replicas report their load every second
    time.sleep(settle)
    before = _checker_totals(client, fleet)
    rate, _ = throughput(endpoint, 8, per_client, shape, window, distinct=True)
    time.sleep(settle)
    after = _checker_totals(client, fleet)
    batches, units, busy = (a - b for a, b in zip(after, before))
    return {"rate": rate, "batch": units / batches if batches else 0.0, "busy_ms": 1e3 * busy / units if units else 0.0}


def fleet_section(tiny_root, quick: bool) -> None:
    """Part 6: the single worker, a 1-replica fleet and a 2-replica fleet on the same requests.

    Throughput is measured at window 4 (the target's workload) and at window 16 per client: a fleet splits
    the requests in flight among its replicas, so each replica's batches shrink, and on a CPU a batch of the
    tiny checker costs nearly the same whatever its size; the mean batch and the checker's busy ms per check
    printed beside each rate show that split."""
    scale = 0.5 if quick else 1.0
    extra = ["--tiny-dir", str(tiny_root), "--tiny-faces", "all"]
    # Every request new (`distinct`) and no verdict cache: a verdict from the cache, or shared with an
    # identical request in flight, is no check.
    fleet = [*extra, "--ray", "--num-cpus", "2", "--cache-mb", "0"]
    shape, per_client = (1, 32, 32, 3), max(8, int(100 * scale))
    windows = (4, 16)
    load_before = os.getloadavg()
    frame = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    res = {}
    with spawn_worker(preset="tiny", extra_args=extra) as single, SafetyClient(single.endpoint, timeout=300) as c_single:
        with spawn_worker(preset="tiny", extra_args=[*fleet, "--replicas", "1"], startup_timeout=600) as one, \
                SafetyClient(one.endpoint, timeout=300) as c_one:
            t_single, t_fleet = timed_pair(lambda: c_single.check_sample(SAFE_EXAMPLE, frame),
                                           lambda: c_one.check_sample(SAFE_EXAMPLE, frame), int(100 * scale), warmup=5)
            for w in windows:
                res["single", w] = _fleet_rate(single.endpoint, c_single, False, per_client, shape, w)
                res[1, w] = _fleet_rate(one.endpoint, c_one, True, per_client, shape, w)
        with spawn_worker(preset="tiny", extra_args=[*fleet, "--replicas", "2"], startup_timeout=600) as two, \
                SafetyClient(two.endpoint, timeout=300) as c_two:
            for w in windows:
                res[2, w] = _fleet_rate(two.endpoint, c_two, True, per_client, shape, w)
            roster = c_two.stats()["fleet"]["roster"]
    load_after = os.getloadavg()
    r_lat = statistics.median(t_fleet) / statistics.median(t_single)
    print("\n## 6. guard fleet on Ray Serve (serve --ray --replicas N, local Ray of 2 CPUs, --cache-mb 0), tiny "
          f"checkpoint, faces all; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after")
    print(f"one client, one request in flight, check_sample text + 1x32x32: p50 {ms(statistics.median(t_single))} single "
          f"worker  {ms(statistics.median(t_fleet))} fleet of 1  p99 {ms(pct(t_single, 99))} / {ms(pct(t_fleet, 99))}  "
          f"ratio {r_lat:.2f}x (target <= 1.5x: {'met' if r_lat <= 1.5 else 'MISSED'})")
    print("8 clients x window W, check_sample text + 1x32x32, requests/s (mean checker batch, checker busy ms per "
          "check, summed over replicas):")
    for w in windows:
        r_tp = res[2, w]["rate"] / res[1, w]["rate"]
        target = f" (target >= 1.7x: {'met' if r_tp >= 1.7 else 'MISSED'})" if w == 4 else ""
        print(f"  window {w:2d}: " + "  ".join(f"{name} {res[k, w]['rate']:6.1f} ({res[k, w]['batch']:4.1f}, "
                                                f"{res[k, w]['busy_ms']:4.1f} ms)"
                                                for name, k in (("single worker", "single"), ("fleet of 1", 1),
                                                                ("fleet of 2", 2)))
              + f"  2 / 1 replicas {r_tp:.2f}x{target}")
    print(f"checks per replica of 2 (warm-up included): {[r['load']['checks'] for r in roster]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--batching-only", action="store_true", help="run part 5 (batching on vs --max-batch 1) alone")
    ap.add_argument("--fleet-only", action="store_true", help="run part 6 (a Ray Serve fleet of 1 and 2 replicas) alone")
    ap.add_argument("--device", default="cpu", help="the workers' (and part 3's in-process checker's) torch device: "
                                                    "cpu (default) or cuda[:N]")
    args = ap.parse_args()
    n_small, n_clip, n_check, n_tp = (200, 10, 3, 20) if args.quick else (1000, 30, 5, 40)
    tiny_root = default_tiny_dir()
    rundir = tempfile.mkdtemp(prefix="bench-worker-")

    print(f"# bench_worker: {os.cpu_count()} CPUs, python {sys.version.split()[0]}, zmq {zmq.zmq_version()}")
    if args.batching_only:
        batching_section(tiny_root, args.quick, args.device)
        return
    if args.fleet_only:
        fleet_section(tiny_root, args.quick)
        return
    with spawn_worker(preset="tiny", device=args.device,
                      extra_args=["--tiny-dir", str(tiny_root), "--tiny-faces", "all"]) as worker, \
            SafetyClient(worker.endpoint, timeout=300) as client:
        bare, close_bare = bare_echo(f"ipc://{rundir}/bare.sock")
        try:
            # 1. small round trips
            small = [b"SWKR\x01", b"\x83\xa2id\x01\xa2op\xa4ping\xa4args\x80"]
            t_bare, t_ping = timed_pair(lambda: bare(small), client.ping, n_small)
            print("\n## 1. small-message round trip (ipc)")
            print(f"bare pyzmq echo      p50 {ms(pct(t_bare, 50))}  p99 {ms(pct(t_bare, 99))}")
            print(f"worker ping          p50 {ms(pct(t_ping, 50))}  p99 {ms(pct(t_ping, 99))}   ratio p50 {pct(t_ping, 50) / pct(t_bare, 50):.2f}x")

            # 2. clip transport
            clip = np.random.default_rng(0).integers(0, 256, (16, 480, 640, 3), dtype=np.uint8)
            t_bare_clip, t_echo_clip = timed_pair(lambda: bare([small[0], small[1], clip]), lambda: client.echo(clip), n_clip)
            r2 = statistics.median(t_echo_clip) / statistics.median(t_bare_clip)
            print(f"\n## 2. 16x480x640x3 uint8 clip ({clip.nbytes / 1e6:.1f} MB) round trip")
            print(f"bare pyzmq zero-copy p50 {ms(statistics.median(t_bare_clip))}")
            print(f"worker echo          p50 {ms(statistics.median(t_echo_clip))}   ratio {r2:.2f}x (target <= 1.5x: {'met' if r2 <= 1.5 else 'MISSED'})")
        finally:
            close_bare()

        # 3. remote vs in-process, same checker on the same tiny checkpoint
        use_preset("tiny", tiny_dir=tiny_root, tiny_faces="all")  # what the worker loads
        import torch
        from cosmos_guardrail import CosmosSafetyChecker

        torch.set_num_threads(1)
        checker = CosmosSafetyChecker()
        if args.device != "cpu":
            checker.to(args.device)  # as the worker's load_checker
        small_clip = np.random.default_rng(1).integers(0, 256, (4, 240, 320, 3), dtype=np.uint8)
        t_in_text, t_text = timed_pair(lambda: checker.check_text_safety(SAFE_EXAMPLE),
                                       lambda: client.check_text(SAFE_EXAMPLE), n_small // 4)
        t_in_clip, t_re_clip = timed_pair(lambda: checker.check_video_safety(small_clip.copy()),
                                          lambda: client.check_video(small_clip), n_check, warmup=1)
        r_text = statistics.median(t_text) / statistics.median(t_in_text)
        r_clip = statistics.median(t_re_clip) / statistics.median(t_in_clip)
        print("\n## 3. remote (worker) vs in-process, real CosmosSafetyChecker on the tiny checkpoint")
        print(f"text  in-process p50 {ms(statistics.median(t_in_text))}  remote p50 {ms(statistics.median(t_text))}  "
              f"p99 {ms(pct(t_text, 99))}  ratio {r_text:.2f}x")
        print(f"clip 4x240x320 in-process p50 {ms(statistics.median(t_in_clip))}  remote p50 {ms(statistics.median(t_re_clip))}  "
              f"ratio {r_clip:.2f}x (target <= 1.10x: {'met' if r_clip <= 1.10 else 'MISSED'})")
        del checker

        # 4. throughput
        print("\n## 4. check_sample (text + 1x32x32x3 frame) requests/s")
        base = None
        for k in (1, 2, 4):
            rps, _ = throughput(worker.endpoint, k, n_tp)
            base = base or rps
            print(f"{k} client(s): {rps:7.1f} req/s   ({rps / base:.2f}x of 1 client)")

    batching_section(tiny_root, args.quick, args.device)
    fleet_section(tiny_root, args.quick)


if __name__ == "__main__":
    main()
