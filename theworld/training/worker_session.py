"""The safety worker a run talks to: spawned by the local main process, attached to by the others."""
from __future__ import annotations

import os
import socket
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from theworld.training.arguments import TrainArguments


ENDPOINT_FILE = ".safety-endpoint-{host}"


@contextmanager
def safety_worker(train_args: TrainArguments, accelerator, threads: int | None = None):
    """The endpoint of the safety worker this process talks to; spawned (and stopped) here unless attached.

    ``threads`` caps a spawned worker's CPU threads (OMP_NUM_THREADS), for a worker sharing the trainer's cores."""
    if train_args.safety_endpoint:
        yield train_args.safety_endpoint, None
        return
    from safety_worker import spawn_worker

    endpoint_file = Path(train_args.output_dir) / ENDPOINT_FILE.format(host=socket.gethostname())
    if accelerator.is_local_main_process:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
        store = train_args.safety_verdict_store
        extra = ["--verdict-store", str(Path(store).resolve())] if store else []
        with spawn_worker(preset=train_args.safety_preset, device=train_args.safety_device, env=env,
                          extra_args=extra) as worker:
            endpoint_file.write_text(worker.endpoint)
            accelerator.wait_for_everyone()  # the other local ranks read the endpoint now
            try:
                yield worker.endpoint, worker
                accelerator.wait_for_everyone()  # nobody still needs the worker
            finally:
                # After an error, no barrier: the other ranks may be inside another collective, and this
                # rank waiting for them would hang the job without showing the error. Exiting lets the
                # launcher stop them and report it.
                endpoint_file.unlink(missing_ok=True)
    else:
        accelerator.wait_for_everyone()
        yield endpoint_file.read_text().strip(), None
        accelerator.wait_for_everyone()


def local_processes(accelerator) -> int:
    """Processes of this run on this node: they share its one safety worker."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or accelerator.num_processes


def safety_window_share(window: int, worker_hello: dict, processes: int) -> int:
    """The checks one process keeps in flight: `window`, at most its share of the worker's queue.

    The node's processes share one worker, whose queue holds `queue_size` checks (`hello`'s limits);
    more in flight than that are answered `busy` and sent again after a backoff, load that checks
    nothing. Two processes with the default window of 64 against the default queue of 64 kept 128 in
    flight, and once the held-out check ran out of resends (51 samples failed)."""
    queue_size = (worker_hello.get("limits") or {}).get("queue_size")
    if not queue_size:
        return window
    return max(1, min(window, queue_size // max(1, processes)))



@dataclass
class WorkerSession:
    """The run's connection to its safety worker: `endpoint`, the `spawned` worker (None when attached),
    the open `client`, the worker's `hello`, and the checks this process keeps in flight (`window`)."""

    endpoint: str
    spawned: object
    client: object
    hello: dict
    window: int


def open_worker_session(stack: ExitStack, train_args: TrainArguments, accelerator, worker_threads: int | None,
                        local: int) -> WorkerSession:
    """Spawn or attach to the safety worker and connect a client, both closed when `stack` closes."""
    from safety_worker import SafetyClient

    endpoint, spawned = stack.enter_context(safety_worker(train_args, accelerator, worker_threads))
    # A worker shared by several processes (or runs) can be briefly full: resend a `busy` check
    # until its deadline rather than count it as a failed check after a few seconds.
    client = stack.enter_context(SafetyClient(endpoint, timeout=train_args.safety_timeout, busy_retries=None))
    hello = client.hello()
    window = safety_window_share(train_args.safety_window, hello, local)
    if window < train_args.safety_window:
        accelerator.print(f"safety window: {window} checks in flight per process ({local} processes "
                          f"share the worker's queue of {hello['limits']['queue_size']})")
    return WorkerSession(endpoint, spawned, client, hello, window)
