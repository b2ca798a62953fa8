"""`python -m theworld.serve --ray [ADDRESS] --model-replicas N|MIN,MAX`: the same API and demo through Ray Serve.

```
 users ── HTTP (--host/--port) ──▶ Serve's proxy ──▶ ModelIngress (one replica, no model, no guard import)
                                                       ServeApp's FastAPI app and demo (serve.ingress),
                                                       validation, the Guard (safety worker or fleet endpoint)
                                                         │ DeploymentHandle.generate.remote(job): checked input
                                                         ▼
                                   ModelReplica x N (or MIN..MAX, autoscaled): each an actor process that
                                   loads the model and batches what reaches it (BatchingEngine, as today)
```

- **One app.** The ingress builds the same `ServeApp` as `python -m theworld.serve` (routes, errors, metrics,
  demo) over the same `GuardedPipeline`; only the engine differs: `DeploymentEngine` has `BatchingEngine`'s
  interface and sends each checked job to the model deployment. The guard stays in the ingress: every input
  is checked before it leaves for a replica, every answer and rollout after it comes back.
- **Batching as today.** Each replica runs a `BatchingEngine`; Serve lets up to `2 x --max-batch` requests
  into a replica at once so that a batch can gather while the previous one generates.
- **Faults.** A replica that dies mid-request (kill -9, a lost node) fails the Ray call; generation is
  repeatable (greedy, or seeded), so the ingress sends the job again (`_RESENDS` times, with a growing pause)
  and Serve routes it to a live replica while its controller starts a replacement. A job that still finds no
  replica is answered 503 `model_unavailable`. Either way the request gets one answer, and an answer is
  returned only after the guard checked it.
- **Where.** The ingress runs on the node of this process (the driver), where a spawned worker's ipc endpoint
  is; Serve's HTTP proxy on the head node (`--host/--port`); the replicas wherever Ray places them.
- **What serves.** Replicas enrol in a roll call (`safety_worker.fleet.FleetRoll`, the guard fleet's) once
  their model is loaded; `/ready` reports the live replicas' pids (and 503 `not_ready` with none).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import tempfile
import threading
import time

from ray import serve

from theworld.inference.engine import Generation, Job, resolve_rollout
from theworld.inference.messages import InferenceError

logger = logging.getLogger("theworld.serve")

APPLICATION = "theworld"  # the Serve application; its ingress answers at route prefix "/"
_RESENDS = 3  # times a job is sent again after the replica generating it died
_RESEND_PAUSE_S = 0.5  # before the first resend; doubled each time (a replacement loads the model meanwhile)
_HEARTBEAT_S = 1.0  # how often a replica tells the roll call it lives
_GUARD_MODULE = "cosmos_guardrail"
_STOP_TIMEOUT_S = 30.0


# ---------------------------------------------------------------------------------------- a replica

class ModelReplica:
    """One model replica: a Ray actor process that loads the model and runs a `BatchingEngine` over it."""

    def __init__(self, model: str | None, cosmos: str | None, device: str, engine_options: dict, roll: str):
        import ray

        from theworld.inference.engine import BatchingEngine
        from theworld.inference.loading import load_model

        from theworld.serving.server import MODEL_INIT_SEED

        model = load_model(model, cosmos, init_seed=MODEL_INIT_SEED).to(device).eval()
        self.engine = BatchingEngine(model, **engine_options)
        self.report = {"replica": serve.get_replica_context().replica_id.unique_id, "pid": os.getpid(),
                       "node": ray.get_runtime_context().get_node_id(), "device": device,
                       "guard_loaded": _GUARD_MODULE in sys.modules, "started_at": time.time()}
        from safety_worker.fleet import NAMESPACE

        self._roll = ray.get_actor(roll, namespace=NAMESPACE)
        ray.get(self._roll.enrol.remote(self.report))
        threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True).start()

    def describe(self) -> dict:
        """What the ingress needs of the model: its processor (to measure requests) and its rollout facts."""
        model = self.engine.model
        return {"processor": model.processor, "num_world_steps": model.config.num_world_steps,
                "has_world": model.world_encoder is not None, "pid": os.getpid()}

    async def generate(self, job: Job) -> Generation | dict:
        """`job`'s generation, or the engine's refusal as `{"code", "message", "extra"}` (an `InferenceError`
        would reach the ingress wrapped in Ray's own exception)."""
        try:
            return await self.engine.generate(job)
        except InferenceError as e:
            return {"code": e.code, "message": e.message, "extra": e.extra}

    def check_health(self) -> None:
        """Serve's health check: a replica whose model thread died is replaced."""
        if not self.engine._thread.is_alive():
            raise RuntimeError("the model thread has stopped")

    def _heartbeat(self) -> None:
        while True:
            time.sleep(_HEARTBEAT_S)
            try:
                self._roll.heartbeat.remote(self.report["replica"], {"waiting": self.engine.waiting})
            except Exception:  # the server (and its roll call) is gone: Serve will stop us
                return

    def __del__(self):
        # Serve stops a replica (scaling down, the server stopping) by ending its actor after draining.
        with contextlib.suppress(Exception):
            self._roll.leave.remote(self.report["replica"])


# ---------------------------------------------------------------------------------- the ingress side

class DeploymentEngine:
    """`BatchingEngine`'s interface over the model deployment, for the ingress's `GuardedPipeline`."""

    def __init__(self, handle, described: dict, roll, on_batch=None):
        self.handle, self._roll = handle, roll
        self.processor = described["processor"]
        self._num_world_steps, self._has_world = described["num_world_steps"], described["has_world"]
        self.on_batch = on_batch or (lambda size: None)
        self.in_flight = 0
        self.resent = 0

    @property
    def waiting(self) -> int:
        return self.in_flight

    def resolve_rollout(self, rollout: int | None, has_frames: bool = True) -> int:
        return resolve_rollout(rollout, has_frames, num_world_steps=self._num_world_steps, has_world=self._has_world)

    async def generate(self, job: Job) -> Generation:
        import ray
        from ray.serve.exceptions import BackPressureError

        self.in_flight += 1
        try:
            pause = _RESEND_PAUSE_S
            for attempt in range(_RESENDS + 1):
                try:
                    result = await self.handle.generate.remote(job)
                except BackPressureError:
                    raise InferenceError("overloaded", "every model replica's queue is full (--max-queue); try again "
                                                       "shortly") from None
                except ray.exceptions.RayActorError as e:  # the replica died (kill -9, a lost node)
                    if attempt == _RESENDS:
                        raise InferenceError("model_unavailable", f"the model replica answering this request died "
                                             f"{attempt + 1} times ({type(e).__name__}) and no live replica answered; "
                                             "nothing was returned, try again") from None
                    self.resent += 1
                    logger.warning("a model replica died with a request (%s); sending it again", type(e).__name__)
                    await asyncio.sleep(pause)
                    pause *= 2
                    continue
                if isinstance(result, dict):
                    raise InferenceError(result["code"], result["message"], **result["extra"])
                if result.batch_row == 0:  # one row stands for its batch
                    self.on_batch(result.batch_size)
                return result
        finally:
            self.in_flight -= 1

    async def status(self) -> dict:
        """`/ready`'s `model_deployment`: the live replicas (`not_ready` with none)."""
        from theworld.serving.schema import ApiError

        try:
            roster = await asyncio.wait_for(self._roll.roster.remote(), timeout=3.0)
        except Exception as e:  # noqa: BLE001  (the roll call is Ray's: whatever fails, not ready)
            raise ApiError("not_ready", f"the model deployment does not answer ({type(e).__name__})") from None
        if not roster["live"]:
            raise ApiError("not_ready", "no model replica is serving (starting, or restarting after a fault)")
        return {"engine": "ray-serve", "application": APPLICATION, "replicas": len(roster["live"]),
                "replica_pids": [r["pid"] for r in roster["live"]], "replicas_started": roster["started"],
                "replicas_lost": roster["lost"], "resent": self.resent,
                # Neither side ever holds the guard (its import switches autograd off): the worker does.
                "guard_loaded": {"ingress": _GUARD_MODULE in sys.modules,
                                 "replicas": [r["guard_loaded"] for r in roster["live"]]}}

    def close(self) -> None:
        pass


@serve.ingress()
class ModelIngress:
    """The HTTP side behind Serve's proxy: `ServeApp` (the FastAPI routes and the demo) over a
    `DeploymentEngine`. Loads no model and never imports the guard (`theworld`'s import guard refuses it)."""

    async def __init__(self, model_handle, options: dict, roll: str):
        import ray

        from safety_worker.fleet import NAMESPACE
        from theworld.inference.guard import Guard
        from theworld.inference.pipeline import GuardedPipeline
        from theworld.serving.app import ServeApp
        from theworld.serving.metrics import ServeMetrics

        metrics = ServeMetrics()
        described = await model_handle.describe.remote()
        engine = DeploymentEngine(model_handle, described, ray.get_actor(roll, namespace=NAMESPACE),
                                  on_batch=metrics.batch_size.observe)
        self.guard = Guard(options["safety_endpoint"])
        pipeline = GuardedPipeline(engine, self.guard, request_timeout=options["request_timeout"])
        examples = []
        if options["demo"]:
            from theworld.serving.demo import motion_examples

            self._examples_dir = tempfile.TemporaryDirectory(prefix="theworld-examples-")
            examples = motion_examples(self._examples_dir.name, options["model"])
        self.server_app = ServeApp(pipeline, metrics, model_name=options["model_name"], limits=options["limits"],
                                   api_key=options["api_key"], demo=options["demo"], demo_examples=examples,
                                   fps=options["fps"])

    def __serve_build_asgi_app__(self):
        return self.server_app.app

    def __del__(self):
        with contextlib.suppress(Exception):
            self.guard.close()


# ------------------------------------------------------------------------------------------ the driver

def run_ray_server(args: argparse.Namespace, limits, endpoint: str, model_name: str, port: int) -> int:
    """Deploy the model and the ingress on Ray Serve (a local Ray, or the cluster at `--ray ADDRESS`), print
    the ready line, and serve until SIGTERM; then delete the application (and stop a Ray started here)."""
    import ray

    from safety_worker.fleet import NAMESPACE, FleetError, FleetRoll, join_ray
    from theworld.serving.server import READY_PREFIX, _exit_cleanly

    replicas = args.model_replicas  # (min, max), checked by theworld.serve
    address = None if args.ray == "local" else args.ray
    try:
        started_ray = join_ray(address, args.num_cpus)  # a local Ray is for this server, stopped with it
    except FleetError as e:
        print(f"error: --ray {args.ray}: {e}", file=sys.stderr)
        return 2
    # Ray's core worker installs its own SIGTERM handler (it logs a stack and aborts the process); ours again,
    # so that SIGTERM deletes the application and stops what this process started.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        serve.start(http_options={"host": args.host, "port": port}, proxy_location="HeadOnly")
        roll_name = f"{APPLICATION}-models-roll-{os.getpid()}"
        # Found by name (every replica enrols with it, /ready reads it); the handle is held for as long as we serve,
        # so that Ray keeps the actor whatever its rules for named actors without handles.
        _roll_call = ray.remote(num_cpus=0)(FleetRoll).options(name=roll_name, namespace=NAMESPACE).remote()  # noqa: F841
        device = "cuda" if args.model_replica_gpus and args.device == "cpu" else args.device
        scaling = ({"num_replicas": replicas[0]} if replicas[0] == replicas[1] else
                   {"autoscaling_config": {"min_replicas": replicas[0], "max_replicas": replicas[1],
                                           "target_ongoing_requests": args.max_batch}})
        engine_options = {"max_batch": args.max_batch, "batch_wait": args.batch_wait_ms / 1000,
                          "max_queue": args.max_queue, "rollout_steps": args.rollout_steps, "fps": args.fps}
        model_app = serve.deployment(
            ModelReplica, name="ModelReplica",
            # Enough requests in at once for a batch to gather while the previous one generates; beyond, Serve
            # queues up to --max-queue per replica, then `overloaded` (BackPressureError).
            max_ongoing_requests=2 * args.max_batch, max_queued_requests=args.max_queue * replicas[1],
            ray_actor_options={"num_cpus": args.model_replica_cpus, "num_gpus": args.model_replica_gpus},
            health_check_period_s=2.0, health_check_timeout_s=60.0, graceful_shutdown_timeout_s=5.0, **scaling,
        ).bind(args.model, args.cosmos, device, engine_options, roll_name)
        options = {"safety_endpoint": endpoint, "request_timeout": args.request_timeout, "demo": not args.no_demo,
                   "model": args.model, "model_name": model_name, "limits": limits, "api_key": args.api_key,
                   "fps": args.fps}
        # The ingress is asyncio and light: no CPU reserved, so that N model replicas fit N CPUs. It runs on this
        # node: a spawned worker's endpoint (ipc, in a private directory) exists only here.
        here = {f"node:{ray.util.get_node_ip_address()}": 0.001}
        app = serve.deployment(ModelIngress, name="ModelIngress", ray_actor_options={"num_cpus": 0, "resources": here},
                               max_ongoing_requests=max(100, 2 * args.max_queue)).bind(model_app, options, roll_name)
        serve.run(app, name=APPLICATION, route_prefix="/")
        url = f"http://{f'[{args.host}]' if ':' in args.host else args.host}:{port}"
        print(f"{READY_PREFIX} {url} (safety worker {endpoint}; Ray Serve application {APPLICATION}, model replicas "
              f"{replicas[0] if replicas[0] == replicas[1] else f'{replicas[0]}..{replicas[1]}'})", flush=True)
        while True:  # SIGTERM raises SystemExit here (server._exit_cleanly)
            time.sleep(3600)
    except Exception as e:  # noqa: BLE001
        print(f"error: the model service did not start on Ray Serve: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    finally:
        _stop(started_ray)


def _stop(started_ray: bool) -> None:
    """Delete the application; stop Serve and Ray if this process started them. Bounded: a Ray whose processes
    are already gone (a Ctrl-C reaches the whole process group) would make these calls wait for ever."""
    import ray

    def stop():
        try:
            serve.delete(APPLICATION)
        except Exception as e:  # noqa: BLE001
            logger.warning("could not delete the Serve application %s: %s", APPLICATION, e)
        if started_ray:
            serve.shutdown()
            ray.shutdown()

    stopping = threading.Thread(target=stop, name="serve-stop", daemon=True)
    stopping.start()
    stopping.join(_STOP_TIMEOUT_S)
    if stopping.is_alive():
        logger.warning("Ray Serve did not stop within %gs; leaving it", _STOP_TIMEOUT_S)

