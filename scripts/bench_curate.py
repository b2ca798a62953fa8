"""Benchmark `python -m safety_worker curate` against one worker fed by one client, in one run.

    python scripts/bench_curate.py                 # ~5-10 minutes on 2 CPU cores
    python scripts/bench_curate.py --clips 32      # quicker
    python scripts/bench_curate.py --actor-gpus 1  # the actors' guard models on a GPU
    python scripts/bench_curate.py --ceiling       # also the checker alone in 1 vs 2 plain processes

Prints, from the same run and the same clips (synthetic motion clips, 9 frames of 32x32, a quarter
of them with the tiny guard's blocked phrase; the tiny checkpoint, faces pixelated):

1. one worker (`serve` defaults) fed by one client keeping W checks in flight (the trainer's
   `SafetyFilter`, W in --windows; the best W is the baseline): clips/s;
2. curate with 1 and with 2 actors on one local Ray (--num-cpus, 2 by default): clips/s while checking
   (all clips over the time from the first actor ready, its guard loaded, to the last batch checked:
   actor start-up, ~10-30 s of importing and loading the guard, is paid once per job and reported
   apart), and end to end; target 2 actors >= 1.7x 1;
3. the same at 4x the clips (1x checks for a few seconds only, about the second actor's start-up lag), each
   actor's share (start-up lag, clips, busy and idle seconds, its rate while busy) and the actors' summed
   rate while busy, 2 actors / 1 (start-up lag and waiting excluded: what is left is the cores they got);
4. at 4x the clips, the cores each part of the job used while the actors checked (the guard actors, the read and
   write tasks, the driver, Ray's own processes), sampled from /proc: what a second actor can get;
5. the curate driver's peak RSS at 1x and 4x the clips (target <= 1.2x: it holds no dataset);
6. with --ceiling, first: the checker alone (no Ray, no ZeroMQ) in 1 and then 2 plain processes at once,
   each checking the same clips as the actors do (`check_requests`, batches of --batch-size), timed after a
   barrier: clips/s, 2 / 1, CPU milliseconds per clip and threads per process. What two processes of the guard
   get from this machine's cores, beside the same figures for the actors (guard actors' CPU per clip at 4x).

CPU per clip separates cost from contention: a machine shared with other work (and Linux's autogroup
scheduling, which shares the cores between sessions, not processes) moves clips/s, while a cost that a second
guard process adds (a thread pool, a copy, a lock) shows as more CPU per clip.

Each curate job runs as its own driver process (`curate()` in a fresh Python), with a verdict store
of its own, so none reuses another's verdicts.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DRIVER = textwrap.dedent("""
    import json, resource, sys
    from safety_worker.curate import curate
    args = json.loads(sys.argv[1])
    manifest = curate(args["input"], args["output"], preset=args["preset"], actors=args["actors"],
                      actor_gpus=args["actor_gpus"], num_cpus=args["num_cpus"], shard_size=args["shard_size"],
                      batch_size=args["batch_size"], ray_address=args.get("ray_address"))
    print(json.dumps({"run": manifest["run"], "counts": manifest["counts"],
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")


def write_clips(folder: Path, n: int, frames: int, size: int) -> Path:
    from theworld.data.sources import write_jsonl
    from theworld.data.synthetic import SyntheticMotionTask

    task = SyntheticMotionTask(split="train", size=n, seed=0, num_frames=frames, image_size=size, blocked_fraction=0.25)
    return write_jsonl((task[i] for i in range(n)), folder / f"clips-{n}.jsonl")


def worker_rate(path: Path, windows: list[int], tiny_dir: str) -> dict:
    """clips/s of one worker fed by one client keeping `window` checks in flight, per window."""
    from safety_worker import SafetyClient, spawn_worker
    from theworld.data.safety_filter import _frame_groups
    from theworld.data.sources import JsonlDataset, sample_text

    dataset = JsonlDataset(path)
    samples = [(sample_text(s), _frame_groups(s["images"])[0]) for s in (dataset[i] for i in range(len(dataset)))]
    out = {}
    with spawn_worker(extra_args=["--tiny-dir", tiny_dir, "--tiny-faces", "all"]) as worker, \
            SafetyClient(worker.endpoint, timeout=600) as client:
        client.check_sample(*samples[0])  # warm
        for window in windows:
            start, pending = time.perf_counter(), []
            for text, frames in samples:
                pending.append(client.submit_sample(text, frames))
                if len(pending) >= window:
                    pending.pop(0).result()
            for future in pending:
                future.result()
            out[window] = len(samples) / (time.perf_counter() - start)
    return out


def machine_cpu() -> tuple[float, float, float]:
    """The whole machine's CPU seconds so far (all processes, every session): busy, idle, and stolen by the
    hypervisor, from /proc/stat. Against a job's own CPU it says what the rest of the machine used meanwhile."""
    fields = [int(x) / os.sysconf("SC_CLK_TCK") for x in open("/proc/stat").readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    return user + nice + system + irq + softirq, idle + iowait, steal


def _plain_checker(path: str, batch_size: int, batches: int, tiny_dir: str, results, barrier) -> None:
    """One plain process of `plain_ceiling`: imports only safety_worker (theworld's import guard refuses
    cosmos_guardrail beside it), loads the checker as a curate actor does, warms up, waits at the barrier,
    then checks `batches` batches of the clips in `path` (rendered by the parent)."""
    try:
        import numpy as np

        from safety_worker import protocol as P
        from safety_worker.presets import use_preset
        from safety_worker.server import Batching, check_requests, guarded_checker, load_checker

        data = np.load(path)
        frames, texts = data["frames"], json.loads(str(data["texts"]))
        use_preset(preset="tiny", tiny_dir=tiny_dir, tiny_faces="all")
        batching = Batching()  # curate's defaults (max_batch 32, max_batch_frames 64)
        guard = guarded_checker(load_checker("cpu", torch_threads=1), "block", batching, "cpu")

        def batch(b: int) -> list:
            rows = [(b * batch_size + j) % len(texts) for j in range(batch_size)]
            return [P.Request(id=j, op="check_sample", args={"text": texts[r]}, arrays=[frames[r]]) for j, r in enumerate(rows)]

        check_requests(guard, batch(0))  # warm
        barrier.wait()
        wall, cpu = time.perf_counter(), time.process_time()
        for b in range(batches):
            check_requests(guard, batch(b))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        results.put({"clips": batches * batch_size, "wall_s": wall, "cpu_s": cpu,
                     "threads": len(os.listdir(f"/proc/{os.getpid()}/task"))})
    except BaseException as e:  # noqa: BLE001 - the parent waits for every child: say why this one stopped
        barrier.abort()
        results.put({"error": f"{type(e).__name__}: {e}"})
        raise


def plain_ceiling(path: Path, batch_size: int, clips: int, tiny_dir: str, processes: int) -> dict:
    """The checker alone in `processes` plain processes at once (spawned: nothing inherited), each checking
    `clips` clips of the JSONL `path`: summed clips/s, CPU ms per clip and threads of each process."""
    import multiprocessing
    import numpy as np

    from theworld.data.safety_filter import _frame_groups
    from theworld.data.sources import JsonlDataset, sample_text

    dataset = JsonlDataset(path)
    samples = [dataset[i] for i in range(len(dataset))]
    rendered = path.with_suffix(".npz")
    if not rendered.exists():
        np.savez(rendered, frames=np.stack([_frame_groups(s["images"])[0] for s in samples]),
                 texts=json.dumps([sample_text(s) for s in samples]))
    ctx = multiprocessing.get_context("spawn")
    results, barrier = ctx.Queue(), ctx.Barrier(processes + 1)  # + this process: it reads the machine's CPU
    procs = [ctx.Process(target=_plain_checker, args=(str(rendered), batch_size, max(1, clips // batch_size),
                                                      tiny_dir, results, barrier)) for _ in range(processes)]
    for proc in procs:
        proc.start()
    try:
        barrier.wait(timeout=600)
    except Exception:  # noqa: BLE001 - a child aborted the barrier: its error is in `results`
        pass
    start, machine = time.perf_counter(), machine_cpu()
    got = [results.get(timeout=600) for _ in procs]
    wall, machine = time.perf_counter() - start, [b - a for a, b in zip(machine, machine_cpu())]
    for proc in procs:
        proc.join()
    errors = [g["error"] for g in got if "error" in g]
    if errors:
        raise RuntimeError(f"a plain checker process failed: {errors[0]}")
    return {"clips_per_s": sum(g["clips"] / g["wall_s"] for g in got),
            "cpu_ms_per_clip": [1000 * g["cpu_s"] / g["clips"] for g in got],
            "threads": [g["threads"] for g in got],
            # the rest of the machine meanwhile (other sessions share the cores): cores used, idle, stolen
            "others_cores": (machine[0] - sum(g.get("cpu_s", 0.0) for g in got)) / wall,
            "idle_cores": machine[1] / wall, "steal_cores": machine[2] / wall}


def process_role(proc, driver_pid: int) -> str:
    """Which part of a curate job a process is, from the title Ray gives its processes (read again at every
    sample: a Ray worker process starts untitled or `ray::IDLE` and becomes an actor's or a task's)."""
    if proc.pid == driver_pid:
        return "driver"
    title = " ".join(proc.cmdline())
    if "GuardActor" in title:
        return "guard actors"  # ray::MapWorker(MapBatches(GuardActor))
    if title.startswith("ray::") and any(k in title for k in ("read_unit", "Read", "Write", "FlatMap")):
        return "read/write tasks"  # ray::FlatMap(read_unit), the output's write tasks
    return "Ray's own processes"  # raylet, GCS, dashboard agents, log monitor, stats actors, the roll call, idle workers


class CpuSampler:
    """CPU seconds of every process of a job (the driver and its descendants: Ray's raylet, GCS and workers), sampled
    a few times a second, so that the CPU spent between two moments can be split by role: where the cores went while
    the actors were checking. A process that ends between two samples loses its last interval (0.2 s at most)."""

    def __init__(self, pid: int, interval: float = 0.2):
        import threading

        self.pid, self.interval, self.samples = pid, interval, []  # (time, {pid: (role, cpu seconds)})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            now, cpu = time.time(), {}
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for proc in procs:
                try:
                    times = proc.cpu_times()
                    cpu[proc.pid] = (process_role(proc, self.pid), times.user + times.system)
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
            self.samples.append((now, cpu, machine_cpu()))
            self._stop.wait(self.interval)

    def stop(self):
        self._stop.set()
        self._thread.join()

    def cores(self, start: float, end: float) -> dict[str, float]:
        """Cores used per role between `start` and `end` (CPU seconds over wall seconds), from the samples nearest;
        a process counts under the role it had at the end."""
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2:
            return {}
        (t0, first, machine0), (t1, last, machine1) = inside[0], inside[-1]
        used: dict[str, float] = {}
        for pid, (role, cpu) in last.items():
            base = first[pid][1] if pid in first else 0.0  # started inside the window: all its CPU counts
            used[role] = used.get(role, 0.0) + cpu - base
        ours = {role: seconds / (t1 - t0) for role, seconds in sorted(used.items())}
        busy, idle, steal = ((b - a) / (t1 - t0) for a, b in zip(machine0, machine1))
        # Not this job's: other sessions' processes (they share the cores), the idle cores, the hypervisor's steal.
        return {**ours, "rest of the machine": busy - sum(ours.values()), "idle": idle, "steal": steal}

    def process_cpu(self, pid: int, start: float, end: float) -> float:
        """CPU seconds process `pid` used between `start` and `end`, from the samples nearest inside."""
        inside = [s[1][pid][1] for s in self.samples if start <= s[0] <= end and pid in s[1]]
        return inside[-1] - inside[0] if len(inside) >= 2 else 0.0


def curate_job(path: Path, work: Path, name: str, **options) -> dict:
    args = {"input": str(path), "output": str(work / name), **options}
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=str(ROOT))
    sampler = CpuSampler(proc.pid)
    stdout, stderr = proc.communicate(timeout=3600)
    sampler.stop()
    if proc.returncode != 0:
        raise RuntimeError(stderr[-3000:])
    result = json.loads(stdout.strip().splitlines()[-1])
    run = result["run"]
    actors = run["actors"]
    # While checking: from the first actor ready to the last batch checked (what `check_seconds` spans).
    result["cores_while_checking"] = sampler.cores(min(a["ready_at"] for a in actors),
                                                   max(a.get("last_done") or a["ready_at"] for a in actors))
    result["steady_clips_per_s"] = result["counts"]["read"] / run["check_seconds"]
    # CPU per clip in the guard actors (the ceiling's figure, for the actors): each actor's CPU from its own
    # ready_at, so a second actor still loading its guard while the first checks does not count its start-up.
    end = max(a.get("last_done") or a["ready_at"] for a in actors)
    result["actor_cpu_ms_per_clip"] = (1000 * sum(sampler.process_cpu(a["pid"], a["ready_at"], end) for a in actors)
                                       / result["counts"]["read"])
    result["end_to_end_clips_per_s"] = result["counts"]["read"] / run["seconds"]
    return result


def actor_breakdown(run: dict) -> str:
    """Where each actor's time went, to tell why a pool does (not) scale: when it was ready after the first one
    (start-up skew), clips it checked, seconds in calls (`busy`; `guard` of them in the checker itself), seconds
    it waited for rows (`idle`: reads starving it), and its own rate while busy (CPU contention lowers it)."""
    actors = run["actors"]
    first = min(a["ready_at"] for a in actors)
    end = max(a.get("last_done") or a["ready_at"] for a in actors)  # an actor that got no rows has no last_done
    return "; ".join(
        f"actor {k}: ready +{a['ready_at'] - first:.1f} s, {a['rows']} clips in {a['calls']} calls, "
        f"busy {a['busy_s']:.1f} s (guard {a['guard_s']:.1f}), idle {end - a['ready_at'] - a['busy_s']:.1f} s, "
        f"{a['rows'] / a['busy_s'] if a['busy_s'] else 0:.1f} clips/busy s"
        for k, a in enumerate(sorted(actors, key=lambda a: a["ready_at"])))


def busy_rate(run: dict) -> float:
    """The actors' clips per second of their own busy time, summed: the pool's rate with every actor up and fed."""
    return sum(a["rows"] / a["busy_s"] for a in run["actors"] if a["busy_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=96, help="clips in the 1x dataset (default 96)")
    parser.add_argument("--frames", type=int, default=9, help="frames per clip (default 9)")
    parser.add_argument("--size", type=int, default=32, help="frame side in pixels (default 32)")
    parser.add_argument("--windows", default="1,4,16", help="client windows tried for the worker baseline")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray (default 2)")
    parser.add_argument("--actor-gpus", type=float, default=0, help="GPUs per actor (default 0: CPU)")
    parser.add_argument("--batch-size", type=int, default=8, help="clips per actor call (default 8)")
    parser.add_argument("--tiny-dir", default=None, help="tiny checkpoint cache (default: the worker's)")
    parser.add_argument("--ceiling", action="store_true",
                        help="first measure the checker alone in 1 vs 2 plain processes (no Ray, no ZeroMQ; 4x the clips "
                             "each), twice (1, 2, 1, 2): the most two guard processes get from this machine, beside the actors")
    args = parser.parse_args()

    from safety_worker.tiny import default_tiny_dir

    tiny_dir = args.tiny_dir or str(default_tiny_dir())
    preset = {"preset": "tiny", "tiny_dir": tiny_dir, "tiny_faces": "all"}
    with tempfile.TemporaryDirectory(prefix="bench-curate-") as tmp:
        work = Path(tmp)
        small = write_clips(work, args.clips, args.frames, args.size)
        large = write_clips(work, 4 * args.clips, args.frames, args.size)
        print(f"{args.clips} clips of {args.frames}x{args.size}x{args.size}; local Ray with {args.num_cpus} CPUs"
              f"{f', {args.actor_gpus} GPU per actor' if args.actor_gpus else ''}", flush=True)

        ceiling = []
        if args.ceiling:
            for processes in (1, 2, 1, 2):
                c = plain_ceiling(small, args.batch_size, 4 * args.clips, tiny_dir, processes)
                ceiling.append(c)
                print(f"checker alone, {processes} plain process{'es' if processes > 1 else ''}: {c['clips_per_s']:7.1f} "
                      f"clips/s, CPU {' / '.join(f'{ms:.1f}' for ms in c['cpu_ms_per_clip'])} ms per clip, "
                      f"threads {' / '.join(map(str, c['threads']))}; meanwhile the rest of the machine used "
                      f"{c['others_cores']:.2f} cores, idle {c['idle_cores']:.2f}, steal {c['steal_cores']:.2f}", flush=True)
            print("checker alone, 2 plain processes / 1: " + ", ".join(
                f"{ceiling[k + 1]['clips_per_s'] / ceiling[k]['clips_per_s']:.2f}x" for k in (0, 2)), flush=True)

        rates = worker_rate(small, [int(w) for w in args.windows.split(",")], tiny_dir)
        best = max(rates, key=rates.get)
        for window, rate in rates.items():
            print(f"worker, one client, window {window:>2}: {rate:7.1f} clips/s", flush=True)

        common = {"preset": preset, "actor_gpus": args.actor_gpus, "num_cpus": args.num_cpus,
                  "batch_size": args.batch_size, "shard_size": max(1, args.clips // 8)}
        one = curate_job(small, work, "one", actors=1, **common)
        two = curate_job(small, work, "two", actors=2, **common)
        for name, r in (("1 actor ", one), ("2 actors", two)):
            print(f"curate, {name}: {r['steady_clips_per_s']:7.1f} clips/s checking, {r['end_to_end_clips_per_s']:6.2f} "
                  f"end to end ({r['run']['seconds']:.1f} s, first result after {r['run']['first_result_seconds']:.1f} s)",
                  flush=True)
        for name, r in (("1 actor ", one), ("2 actors", two)):
            print(f"  {name}: {actor_breakdown(r['run'])}", flush=True)
        print(f"2 actors / 1 actor (checking): {two['steady_clips_per_s'] / one['steady_clips_per_s']:.2f}x (target >= 1.7x)")
        print(f"2 actors / worker at its best window ({best}): {two['steady_clips_per_s'] / rates[best]:.2f}x")

        big = curate_job(large, work, "four-x", actors=2, **{**common, "shard_size": common["shard_size"]})
        # At 1x the checking lasts seconds, as long as the second actor's start-up lag: the same at 4x the clips.
        big_one = curate_job(large, work, "four-x-one", actors=1, **common)
        print(f"at {4 * args.clips} clips: 1 actor {big_one['steady_clips_per_s']:.1f}, 2 actors "
              f"{big['steady_clips_per_s']:.1f} clips/s checking: {big['steady_clips_per_s'] / big_one['steady_clips_per_s']:.2f}x",
              flush=True)
        for name, r in (("1 actor ", big_one), ("2 actors", big)):
            print(f"  {name}: {actor_breakdown(r['run'])}", flush=True)
        # Where the 2 cores went while the actors checked: what the actors did not get, the rest of the job used.
        for name, r in (("1 actor ", big_one), ("2 actors", big)):
            cores = r["cores_while_checking"]
            job = {role: c for role, c in cores.items() if role not in ("rest of the machine", "idle", "steal")}
            print(f"  cores while checking, {name}: " + ", ".join(f"{role} {c:.2f}" for role, c in job.items())
                  + f"; the job {sum(job.values()):.2f}; the rest of the machine {cores.get('rest of the machine', 0):.2f}, "
                  f"idle {cores.get('idle', 0):.2f}, steal {cores.get('steal', 0):.2f}", flush=True)
        print(f"actors' summed rate while busy, 2 / 1: {busy_rate(two['run']) / busy_rate(one['run']):.2f}x at "
              f"{args.clips} clips, {busy_rate(big['run']) / busy_rate(big_one['run']):.2f}x at {4 * args.clips} "
              "(start-up lag and idle excluded: what is left is the cores the actors got)", flush=True)
        print(f"guard actors' CPU per clip at {4 * args.clips} clips: {big_one['actor_cpu_ms_per_clip']:.1f} ms with 1 actor, "
              f"{big['actor_cpu_ms_per_clip']:.1f} with 2: {big['actor_cpu_ms_per_clip'] / big_one['actor_cpu_ms_per_clip']:.2f}x",
              flush=True)
        if ceiling:
            alone = [ceiling[k + 1]["clips_per_s"] / ceiling[k]["clips_per_s"] for k in (0, 2)]
            print(f"side by side, 2 / 1: plain processes {' and '.join(f'{r:.2f}x' for r in alone)}; curate actors "
                  f"{big['steady_clips_per_s'] / big_one['steady_clips_per_s']:.2f}x checking at {4 * args.clips} clips; "
                  f"CPU per clip plain {sum(ceiling[0]['cpu_ms_per_clip']):.1f} -> "
                  f"{sum(ceiling[1]['cpu_ms_per_clip']) / 2:.1f} ms, actors {big_one['actor_cpu_ms_per_clip']:.1f} -> "
                  f"{big['actor_cpu_ms_per_clip']:.1f} ms", flush=True)
        print(f"driver peak RSS: {two['peak_rss_mb']:.0f} MiB at {args.clips} clips, {big['peak_rss_mb']:.0f} MiB at "
              f"{4 * args.clips}: {big['peak_rss_mb'] / two['peak_rss_mb']:.2f}x (target <= 1.2x)")


if __name__ == "__main__":
    main()
