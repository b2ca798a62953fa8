"""scripts/bench_serve.py's own accounting (issue 25): what explains the Ray-served model's 2 / 1 replicas ratio.
The bench itself starts three Ray servers; docs/scale.md ("Measured (model service)") records its runs."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

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


def test_cpu_spent_counts_a_replica_started_between_the_snapshots_under_its_role():
    server = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        before = bench_serve.cpu_snapshot(server.pid)
        replica = subprocess.Popen([sys.executable, "-c", BUSY_REPLICA], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   text=True)
        try:
            assert replica.stdout.readline().strip() == "busy"
            after = bench_serve.cpu_snapshot(server.pid)
        finally:
            replica.communicate("")
    finally:
        server.communicate(b"")
    assert after["cpu"][server.pid][0] == "Ray's own"  # the server asked (here, a stand-in with no title)
    # the replica is this process's child, not the asked server's: it is the other server's
    assert replica.pid not in before["cpu"] and after["cpu"][replica.pid][0] == "the idle server"


def test_cpu_shares_split_a_rounds_cpu_by_part_per_request_and_per_replica():
    server = subprocess.Popen([sys.executable, "-c", BUSY_REPLICA], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)  # the asked server, itself titled as a replica
    try:
        before = bench_serve.cpu_snapshot(server.pid)
        assert server.stdout.readline().strip() == "busy"
        spent = bench_serve.cpu_spent(before, bench_serve.cpu_snapshot(server.pid))
    finally:
        server.communicate("")
    twice = bench_serve.add_spent(spent, spent)
    assert twice["used"]["model replicas"] == 2 * spent["used"]["model replicas"] and twice["wall"] == 2 * spent["wall"]
    shares = bench_serve.cpu_shares(twice, requests=4)
    # its CPU_S, less the little it burnt before the first snapshot (starting)
    assert CPU_S / 2 <= shares["cpu_ms_per_request"]["model replicas"] * 4 / 1000 / 2 < CPU_S + 0.5
    assert shares["replica_cores"] == [shares["cores"]["model replicas"]] and shares["replica_cores"][0] > 0
    assert list(shares["cores"]) == [*bench_serve.CPU_ROLES, "all of these", "the idle server", "rest of the machine"]
    assert shares["cores"]["all of these"] == pytest.approx(sum(shares["cores"][role] for role in bench_serve.CPU_ROLES))
    # the machine's busy CPU covers ours: what is left is the rest of the machine's, never much below zero
    assert shares["cores"]["rest of the machine"] > -0.1
