"""scripts/bench_serve.py's own accounting (issue 25): what explains the Ray-served model's 2 / 1 replicas ratio.
The bench itself starts three Ray servers; docs/scale.md ("Measured (model service)") records its runs."""
import subprocess
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import bench_serve  # noqa: E402

# A stand-in for a model replica's process: its command line names the deployment as Ray's title does
# (`ray::ServeReplica:theworld:ModelReplica`); it burns CPU_S of CPU, says so, and waits to be stopped.
CPU_S = 0.3
BUSY_REPLICA = textwrap.dedent(f"""
    # ServeReplica:theworld:ModelReplica
    import sys, time
    started = time.process_time()
    while time.process_time() - started < {CPU_S}:
        pass
    print("busy", flush=True)
    sys.stdin.read()
""")


def test_batch_totals_read_the_servers_batch_size_histogram():
    from theworld.serving.metrics import ServeMetrics

    metrics = ServeMetrics()
    for size in (8, 8, 3):
        metrics.batch_size.observe(size)
    assert bench_serve.batch_totals(metrics.exposition().decode()) == (19.0, 3.0)


def test_cpu_between_counts_a_replica_started_between_the_snapshots_under_its_role():
    before = bench_serve.cpu_snapshot()
    replica = subprocess.Popen([sys.executable, "-c", BUSY_REPLICA], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True)
    try:
        assert replica.stdout.readline().strip() == "busy"
        after = bench_serve.cpu_snapshot()
    finally:
        replica.communicate("")
    used = bench_serve.cpu_between(before, after, requests=2)
    assert replica.pid not in before["cpu"] and after["cpu"][replica.pid][0] == "model replicas"
    # all of its CPU (it started in between), in the role, per request and per replica
    assert CPU_S <= used["cpu_ms_per_request"]["model replicas"] * 2 / 1000 < CPU_S + 0.2
    assert len(used["replica_cores"]) == 1 and used["replica_cores"][0] == used["cores"]["model replicas"] > 0
    assert list(used["cores"]) == [*bench_serve.CPU_ROLES, "all of these", "rest of the machine"]
    assert used["cores"]["all of these"] == sum(used["cores"][role] for role in bench_serve.CPU_ROLES)
    # the machine's busy CPU covers ours: what is left is the rest of the machine's, never much below zero
    assert used["cores"]["rest of the machine"] > -0.1
