"""`serve --ray [ADDRESS] --replicas N|MIN,MAX`: a guard fleet on Ray Serve behind the same ZeroMQ front.

```
 clients ── ZeroMQ, protocol 1.1 ──▶ FleetFront (this process: no torch, no guard; a Ray driver)
                                       │ verdict cache / store, validation, hello/ping/shutdown
                                       │ DeploymentHandle.handle_many.remote([(op, args, arrays, timeout_ms), ...])
                                       ▼
                     Ray Serve deployment "GuardReplica": N replicas (or MIN..MAX, autoscaled),
                     each an actor process holding the guard through the worker's CheckerCore
                     (GuardedChecker, BatchGatherer, check_timeout, fail closed): grad off there only
```

- **The front** is `proxy.ForwardingFront`, the `--replicas` front with a Ray Serve deployment as its
  back end: it decodes and validates every request (`front.WorkerFront`), answers `hello`, `ping` and
  `shutdown` itself, answers repeats from the verdict cache, and sends the rest to the deployment
  through a `DeploymentHandle`: what one turn of its loop received goes out in a few calls (at most
  one per replica, `_CALL_MAX` requests each; Serve picks each call's replica by queue length). It
  never imports the guard (`stats.fleet.front` says so; tests/test_fleet.py reads it).
- **A replica** (`GuardReplica`) is a Serve replica, i.e. a Ray actor: a process of its own for its
  lifetime, so the grad switch that importing the guard throws stays there. It checks with the same
  `server.CheckerCore` as a single worker: the same `GuardedChecker`, the same batching rules
  (`BatchGatherer`: up to `--max-batch` texts-or-samples, `--batch-wait-ms`), the same
  `timeout_ms`/`--check-timeout` handling, so its verdicts are byte-equal to a single worker's.
- **Arrays**: on our wire (client to front) frames travel as raw ZeroMQ frames, never pickled. From the
  front to a replica and back they are numpy arrays inside a Ray call: Ray's own serialisation (pickle
  protocol 5 with out-of-band buffers, large arrays through the object store) carries them. That hop is
  Ray's business, inside the Ray cluster's own trust boundary, not a protocol a client speaks.
- **Faults** (fail closed): a replica that dies mid-request (kill -9, a lost node) fails the Ray call;
  the front sends the check again (`_RESENDS` times: checks are idempotent) and Serve routes it to a
  live replica, while the Serve controller starts a replacement. A check that still finds no replica is
  answered with an `internal` error that says so, never with a verdict nobody computed. The front's
  wait for a reply is bounded as the replica front's (`timeout_ms` + check timeout + margin, or an hour).
- **What the fleet is**: every replica enrols in the fleet's roll call (`FleetRoll`, a small Ray actor)
  when its guard is loaded and reports its load there every `_HEARTBEAT_S`; `hello.fleet`,
  `stats.fleet` and the Prometheus metrics read it: replicas running and their target, each replica's
  pid, node, grad mode and load, replicas started, lost (died without being stopped: Serve restarted
  them) and requests resent or failed.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import queue
import sys
import threading
import time
from concurrent.futures import Future

from . import protocol as P
from .client import WorkerTimeout
from .proxy import REPLY_WAIT_S, ForwardingFront
from .server import CheckerCore

logger = logging.getLogger("safety_worker.fleet")

NAMESPACE = "safety_worker"  # the Ray namespace of the fleets' roll calls
_HEARTBEAT_S = 1.0  # how often a replica reports its load to the roll call
_LOST_AFTER_S = 5.0  # a replica silent this long (and not stopped) is counted lost
_RESENDS = 3  # times a check is sent again after the replica checking it died
# Requests one Ray call carries at most. A Serve call costs the front, the router and the replica about as
# much CPU as a small check, so what one loop turn received goes out in a few calls, not one per request
# (measured: one call per request, 8 clients got 83 req/s from a fleet of 1 against 225 from a single worker).
_CALL_MAX = 16
_REPLICA_POLL_S = 0.1  # how often a replica looks for checks past their timeout (the worker's loop: 100 ms)
_START_TIMEOUT_S = 600.0  # deploying: Ray start, replicas importing and loading the guard
_STOP_TIMEOUT_S = 20.0  # deleting the application and stopping a local Ray


class FleetError(RuntimeError):
    """The fleet cannot start (no Ray, a bad --replicas, a replica that cannot load the guard); one line."""


def join_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Join the Ray cluster at `address`, or start the embedded local Ray (this machine, `num_cpus` CPUs) when
    it is None; nothing if this process already has Ray. Returns whether a local Ray was started here (its
    caller stops it). The guard fleet, `curate` and `theworld.serve --ray` all join Ray through this.
    Raises `FleetError`, saying what to do, when Ray does not start or answer."""
    import ray

    if ray.is_initialized():
        return False
    try:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    except Exception as e:  # noqa: BLE001  (Ray's errors are many; the message says what to do)
        raise FleetError(f"Ray did not start or answer ({type(e).__name__}: {e}); start a cluster with "
                         "`ray start --head` and give its address (HEAD:6379 or auto)") from None
    return address is None


def parse_replicas(spec: str) -> tuple[int, int]:
    """`--replicas N` (min = max = N) or `MIN,MAX` (Serve autoscales between them); N = 0: no replicas."""
    try:
        parts = [int(p) for p in str(spec).split(",")]
        if len(parts) == 1 and parts[0] >= 0:
            return parts[0], parts[0]
        if len(parts) == 2 and 1 <= parts[0] <= parts[1]:
            return parts[0], parts[1]
    except ValueError:
        pass
    raise FleetError(f"--replicas must be N or MIN,MAX with 1 <= MIN <= MAX, got {spec!r}")


# --------------------------------------------------------------------------------- the roll call

class FleetRoll:
    """The fleet's roll call, a small Ray actor (no CPU, no guard): replicas enrol when their guard is loaded,
    report their load every `_HEARTBEAT_S`, and leave when Serve stops them; the front reads it."""

    def __init__(self):
        self._replicas: dict[str, dict] = {}

    def enrol(self, report: dict) -> None:
        self._replicas[report["replica"]] = dict(report, last_seen=time.time(), left=False)

    def heartbeat(self, replica: str, load: dict) -> None:
        if replica in self._replicas:
            self._replicas[replica].update(load=load, last_seen=time.time())

    def leave(self, replica: str) -> None:
        if replica in self._replicas:
            self._replicas[replica]["left"] = True

    def roster(self) -> dict:
        """Live replicas (heard from lately, not stopped), and how many were started and lost."""
        now = time.time()
        live = [r for r in self._replicas.values() if not r["left"] and now - r["last_seen"] <= _LOST_AFTER_S]
        lost = sum(1 for r in self._replicas.values() if not r["left"] and now - r["last_seen"] > _LOST_AFTER_S)
        return {"live": sorted(live, key=lambda r: r["started_at"]), "started": len(self._replicas), "lost": lost}


# ----------------------------------------------------------------------------------- a replica

class GuardReplica(CheckerCore):
    """One replica of the fleet: the checker of a single worker (`server.CheckerCore`) behind Serve.

    Constructed in its own Ray actor process: it loads the preset's checker as `serve` does (after
    checking that its checker identity is the front's), starts the checker thread and enrols in the
    roll call. `handle` answers one forwarded request (a check, `stats` or `echo`) with a `P.Reply`."""

    def __init__(self, preset: dict, controversial: str, batching: dict, limits: dict, check_timeout: float,
                 device: str, torch_threads: int, identity: str, roll: str):
        import ray
        from ray import serve

        from .presets import use_preset
        from .proxy import checker_identity
        from .server import Batching, checker_description, guarded_checker, load_checker

        self.models = use_preset(**preset)
        self.controversial, self.device = controversial, device
        mine = checker_identity(checker_description(self.models, controversial))
        if mine != identity:
            raise FleetError(f"this replica's checker ({mine[:12]}) is not the front's ({identity[:12]}): its models "
                             "or package versions differ; install the same versions and checkpoints on every node")
        self.limits = P.Limits(**limits)
        checker = load_checker(device, preset.get("guardrail_repo", "nvidia/Cosmos-1.0-Guardrail"), torch_threads)
        batching = Batching(**batching)
        # Serve bounds what a replica holds: max_ongoing_requests = queue_size calls of at most _CALL_MAX requests.
        self._init_checker(guarded_checker(checker, controversial, batching, device), batching,
                           self.limits.queue_size * _CALL_MAX, check_timeout)
        import torch

        self._grad_enabled = torch.is_grad_enabled()  # this thread's, after the guard's import: off
        self._waiting: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._expiry: asyncio.Task | None = None
        self._checker_thread.start()
        self.report = {"replica": serve.get_replica_context().replica_id.unique_id, "pid": os.getpid(),
                       "node": ray.get_runtime_context().get_node_id(), "grad_enabled": self._grad_enabled,
                       "guard_loaded": "cosmos_guardrail" in sys.modules, "theworld_loaded": "theworld" in sys.modules,
                       "device": device, "started_at": time.time()}
        self._roll = ray.get_actor(roll, namespace=NAMESPACE)
        ray.get(self._roll.enrol.remote(self.report))
        self._heartbeat = threading.Thread(target=self._report_load, name="heartbeat", daemon=True)
        self._heartbeat.start()

    def describe(self) -> dict:
        """`hello`'s checker fields, as a single worker with these options reports them."""
        from .server import checker_hello

        return checker_hello(self.models, self.controversial, self.device, self.limits, self.check_timeout,
                             self.batching, self._grad_enabled)

    async def handle_many(self, requests: list[tuple]) -> list[P.Reply]:
        """The replies to several forwarded requests (`handle`'s arguments each), queued together."""
        return list(await asyncio.gather(*(self.handle(*r) for r in requests)))

    async def handle(self, op: str, args: dict, arrays: list, timeout_ms: int | None) -> P.Reply:
        req = P.Request(id=0, op=op, args=args, arrays=list(arrays), timeout_ms=timeout_ms)
        self.metrics.request(op)
        if op == "stats":
            reply = P.Reply(0, P.STATUS_OK, result=self._stats())
        elif op == "echo":  # transport only: the Ray hop and back
            reply = P.Reply(0, P.STATUS_OK, result={}, arrays=req.arrays)
        elif op in P.CHECK_OPS:
            reply = await self._check_queued(req)
        else:
            reply = P.error_reply(0, P.INTERNAL, f"op {op} is not forwarded to a replica")
        self.metrics.replied(op, None if reply.status == P.STATUS_OK else reply.error["code"])
        return reply

    async def _check_queued(self, req: P.Request) -> P.Reply:
        from .server import CheckJob

        loop = asyncio.get_running_loop()
        job, done = CheckJob(None, req, time.monotonic()), loop.create_future()
        self._waiting[id(job)] = (loop, done)
        try:
            self._jobs.put_nowait(job)
        except queue.Full:  # not with Serve's bound on calls (see __init__); a worker's answer all the same
            del self._waiting[id(job)]
            return P.error_reply(0, P.BUSY, f"{self.limits.queue_size} checks are queued; retry later")
        if self._expiry is None:  # on the loop Serve runs our requests on (the first request's)
            self._expiry = loop.create_task(self._expire_overrun())
        return await done

    async def _expire_overrun(self) -> None:
        """Answer blocked each running check that overran `check_timeout`, as a single worker's loop does:
        one task for the replica (a timer per waiting request cost the checker thread the GIL)."""
        while True:
            await asyncio.sleep(_REPLICA_POLL_S)
            for job in self._running:
                overran = self._overran(job)
                waiting = self._waiting.get(id(job)) if overran is not None else None
                if waiting is not None and not waiting[1].done():
                    waiting[1].set_result(overran)

    def _deliver(self, finished) -> None:
        for job, reply in finished:  # on the checker thread: hand each reply to its request's loop
            loop, done = self._waiting.pop(id(job))
            if reply is not None:
                loop.call_soon_threadsafe(lambda d=done, r=reply: d.done() or d.set_result(r))

    def _stats(self) -> dict:
        return dict(self._checker_stats(), uptime_s=time.time() - self.report["started_at"],
                    instance_id=self.report["replica"])

    def _report_load(self) -> None:
        while True:
            time.sleep(_HEARTBEAT_S)
            try:
                self._roll.heartbeat.remote(self.report["replica"], self._stats())
            except Exception:  # the front (and its roll call) is gone: Serve will stop us
                return

    def check_health(self) -> None:
        """Serve's health check: a replica whose checker thread died is replaced."""
        if not self._checker_thread.is_alive():
            raise RuntimeError("the checker thread has stopped")

    def __del__(self):
        # Serve stops a replica (scaling down, the fleet stopping) by ending its actor after draining.
        try:
            self._roll.leave.remote(self.report["replica"])
        except Exception:
            pass


# ---------------------------------------------------------------------------------- the front

class FleetFront(ForwardingFront):
    """The ZeroMQ front of a guard fleet: `ForwardingFront` with a Ray Serve deployment as its back end."""

    name = "fleet front"

    def __init__(self, endpoint: str, fleet: "Fleet", *, metrics_port: int | None = None, **front):
        self.fleet = fleet
        super().__init__(endpoint, fleet.checker_hello, **front)
        self._owed = 0  # requests sent to the fleet and not yet answered (serving thread only)
        self._pending: list[tuple[P.Request, Future]] = []  # received this loop turn, not yet sent
        self.counts.update(dispatched=0, resent=0, failed=0)
        if metrics_port is not None:
            from .metrics import fleet_families

            self.serve_metrics(metrics_port, lambda: [({"replica": r["replica"]}, r["load"])
                                                      for r in self.fleet.roster()["live"] if r.get("load")],
                               lambda: fleet_families(self.snapshot()))

    def hello(self) -> dict:
        return dict(super().hello(), fleet=self.fleet.describe())

    def _dispatch(self, req: P.Request) -> Future:
        self._owed += 1
        self.counts["dispatched"] += 1
        future: Future = Future()
        self._pending.append((req, future))  # sent at the end of this loop turn (`_tick`)
        return future

    def _tick(self) -> None:
        """Send what this loop turn received, in one Ray call per replica at most (`_CALL_MAX` requests each):
        Serve routes each call to a replica by queue length, and the replica queues its requests as a worker's."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        size = min(_CALL_MAX, -(-len(pending) // self.fleet.target["max"]))
        for start in range(0, len(pending), size):
            asyncio.run_coroutine_threadsafe(self._call(pending[start:start + size]), self.fleet.loop)

    def _finish(self, envelope, req: P.Request, key, reply: P.Reply | None, exc: BaseException | None) -> None:
        # Every dispatched request ends here, on the serving thread, once: counted down only as it is
        # answered, so a draining front cannot stop between the reply's arrival and its sending.
        self._owed -= 1
        super()._finish(envelope, req, key, reply, exc)

    async def _call(self, chunk: list[tuple[P.Request, Future]]) -> None:
        """Resolve each request's future with its replica's reply; the call is sent again when its replica
        died (Serve routes it to a live one). Whatever happens, every future is resolved."""
        try:
            await self._call_replica(chunk)
        except Exception as e:  # a bug here or in Ray: an error reply, never a hang
            logger.exception("a call to the fleet failed")
            for _, future in chunk:
                if not future.done():
                    future.set_exception(RuntimeError(f"the guard fleet failed: {type(e).__name__}: {e}; not checked"))

    async def _call_replica(self, chunk: list[tuple[P.Request, Future]]) -> None:
        import ray
        from ray.serve.exceptions import BackPressureError

        wait = max(self._deadlines(req).get("timeout", REPLY_WAIT_S) for req, _ in chunk)
        deadline = time.monotonic() + wait
        for attempt in range(_RESENDS + 1):
            response = self.fleet.handle.handle_many.remote([(r.op, r.args, r.arrays, r.timeout_ms) for r, _ in chunk])
            try:
                replies = await asyncio.wait_for(response, timeout=max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                response.cancel()
                for _, future in chunk:
                    future.set_exception(WorkerTimeout(f"no reply from the fleet within {wait:g}s"))
                return
            except BackPressureError:
                for req, future in chunk:
                    future.set_result(P.error_reply(req.id, P.BUSY, "the fleet's queue is full; retry later"))
                return
            except ray.exceptions.RayActorError as e:  # its replica died (kill -9, a lost node)
                if attempt == _RESENDS:  # every op sent to a replica (checks, stats, echo) is idempotent
                    self.counts["failed"] += len(chunk)
                    for req, future in chunk:
                        future.set_exception(RuntimeError(
                            f"the guard fleet lost the replica answering this {req.op} {attempt + 1} times "
                            f"({type(e).__name__}); not checked, retry later"))
                    return
                self.counts["resent"] += len(chunk)
                logger.warning("a replica died with %d requests (%s); sending them again", len(chunk), type(e).__name__)
                continue
            for (_, future), reply in zip(chunk, replies, strict=True):
                future.set_result(reply)
            return

    def _back_end_idle(self) -> bool:
        return self._owed == 0

    def _stats_sections(self) -> dict:
        return {"proxy": self.snapshot(), "fleet": self.fleet.describe(roster=True)}

    def _back_end_snapshot(self) -> dict:
        roster = self.fleet.roster()
        return {"replicas": len(roster["live"]), "replica_pids": [r["pid"] for r in roster["live"]],
                "outstanding": [self._owed], "dispatched": [self.counts["dispatched"]],
                "resent": self.counts["resent"], "failed": self.counts["failed"],
                "replicas_started": roster["started"], "replicas_lost": roster["lost"]}

    def _stop_back_end(self) -> None:
        self.fleet.stop()


class Fleet:
    """The Ray side of a fleet: Ray (joined or started), the Serve application, its handle and roll call.

    `loop` is an asyncio loop on a thread of its own: the front awaits replica replies there, never on
    its serving thread."""

    def __init__(self, *, address: str | None, endpoint: str, replicas: tuple[int, int], preset: dict,
                 controversial: str, batching, limits: P.Limits, check_timeout: float, device: str,
                 torch_threads: int, replica_cpus: float, replica_gpus: float, target_ongoing: int,
                 num_cpus: int | None):
        import ray
        from ray import serve

        from .curate import GUARD_ACTOR_ENV, describe_preset
        from .proxy import checker_identity
        from .server import checker_description

        self.address = address
        self.target = {"min": replicas[0], "max": replicas[1]}
        models = describe_preset(preset)  # the front loads no model: the preset's description only
        self.identity = checker_identity(checker_description(models, controversial))
        try:
            self._started_ray = join_ray(address, num_cpus)
        except FleetError as e:
            raise FleetError(f"--ray {address or 'local'}: {e}") from None
        serve.start(proxy_location="Disabled")  # no HTTP: clients speak ZeroMQ to this front
        # One application per endpoint: a front restarted on the same endpoint replaces its own fleet.
        self.app = "safety-guard-" + hashlib.sha256(endpoint.encode()).hexdigest()[:12]
        roll_name = f"{self.app}-roll-{os.getpid()}"
        self._roll = ray.remote(num_cpus=0)(FleetRoll).options(name=roll_name, namespace=NAMESPACE).remote()
        scaling = ({"num_replicas": replicas[0]} if replicas[0] == replicas[1] else
                   {"autoscaling_config": {"min_replicas": replicas[0], "max_replicas": replicas[1],
                                           "target_ongoing_requests": target_ongoing}})
        deployment = serve.deployment(
            GuardReplica, name="GuardReplica",
            # A replica takes queue_size calls at once (of at most _CALL_MAX requests each); more wait in
            # Serve's queue, up to another queue_size per replica, then `busy` (BackPressureError).
            max_ongoing_requests=limits.queue_size, max_queued_requests=limits.queue_size * replicas[1],
            ray_actor_options={"num_cpus": replica_cpus, "num_gpus": replica_gpus,
                               # workers of their own: a process that ran Ray tasks never hosts the guard
                               "runtime_env": {"env_vars": {GUARD_ACTOR_ENV: "1"}}},
            health_check_period_s=2.0, health_check_timeout_s=30.0,
            # The front stops the fleet only once it has answered every request: nothing to drain.
            graceful_shutdown_timeout_s=5.0,
            **scaling)
        app = deployment.bind(preset, controversial, batching.to_dict(), limits.to_dict(), check_timeout, device,
                              torch_threads, self.identity, roll_name)
        self.loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self.loop.run_forever, name="fleet-io", daemon=True)
        self._loop_thread.start()
        try:
            self.handle = serve.run(app, name=self.app, route_prefix=None)
            self.checker_hello = self.handle.describe.remote().result(timeout_s=_START_TIMEOUT_S)
        except Exception as e:
            self.stop()
            raise FleetError(f"the guard fleet did not start: {type(e).__name__}: {e}") from None
        self._roster, self._roster_at = None, 0.0

    def roster(self) -> dict:
        """The roll call (cached for a heartbeat: `stats` and scrapes must not queue on the roll actor)."""
        import ray

        if self._roster is None or time.monotonic() - self._roster_at > _HEARTBEAT_S:
            try:
                self._roster = ray.get(self._roll.roster.remote(), timeout=5)
                self._roster_at = time.monotonic()
            except Exception as e:
                logger.warning("the fleet's roll call did not answer: %s", e)
                return self._roster or {"live": [], "started": 0, "lost": 0}
        return self._roster

    def describe(self, roster: bool = False) -> dict:
        """`hello.fleet` (and with the roster, `stats.fleet`): what the fleet is."""
        r = self.roster()
        out = {"engine": "ray-serve", "ray_address": self.address or "local", "application": self.app,
               "replicas": len(r["live"]), "target": dict(self.target), "replicas_started": r["started"],
               "replicas_lost": r["lost"]}
        if roster:
            out["roster"] = [{k: v for k, v in rep.items() if k not in ("load", "left")} |
                             {"load": _replica_load(rep.get("load") or {})} for rep in r["live"]]
            # The front loads no model (building the tiny checkpoint, `--preset tiny`'s first start, imports
            # torch here, and leaves grad on); it never imports the guard.
            torch = sys.modules.get("torch")
            out["front"] = {"pid": os.getpid(), "grad_enabled": bool(torch.is_grad_enabled()) if torch else None,
                            "modules_loaded": {m: m in sys.modules for m in ("torch", "cosmos_guardrail", "retinaface")}}
        return out

    def stop(self, timeout: float = _STOP_TIMEOUT_S) -> None:
        """Delete the application (its replicas stop), then stop what this front started, for at most
        `timeout` seconds: a Ray whose processes are gone (a Ctrl-C reaches the whole process group, the
        local raylet included) would make the calls wait for ever."""
        stopping = threading.Thread(target=self._stop_ray, name="fleet-stop", daemon=True)
        stopping.start()
        stopping.join(timeout)
        if stopping.is_alive():
            logger.warning("the fleet did not stop within %gs (is Ray still running?); leaving it", timeout)
        self.loop.call_soon_threadsafe(self.loop.stop)

    def _stop_ray(self) -> None:
        import ray
        from ray import serve

        try:
            serve.delete(self.app)
            ray.kill(self._roll)
        except Exception as e:
            logger.warning("could not delete the fleet's Serve application %s: %s", self.app, e)
        if self._started_ray:
            serve.shutdown()
            ray.shutdown()


def _replica_load(load: dict) -> dict:
    """`stats.fleet.roster[].load`: what a replica's last heartbeat said it holds and has done."""
    batching = load.get("batching") or {}
    return {"queued": load.get("queued"), "running_checks": load.get("running_checks"), "checks": load.get("checks"),
            "batches": batching.get("batches"), "batch_units": batching.get("units"),
            "check_seconds": load.get("check_seconds")}


def _watch_parent_while_starting(parent_pid: int | None) -> threading.Event:
    """Until the returned event is set, exit if `--parent-pid` dies: starting Ray and the replicas takes
    ~30-60 s (minutes on a loaded machine) before the front's loop, which watches the parent, runs; a
    spawner killed meanwhile must not leave a fleet starting for nobody."""
    started = threading.Event()

    def watch() -> None:
        while not started.wait(0.5):
            if os.getppid() != parent_pid:
                logger.warning("parent process %d is gone while the fleet starts; stopping", parent_pid)
                stopping = threading.Thread(target=_stop_local_ray, daemon=True)
                stopping.start()
                stopping.join(_STOP_TIMEOUT_S)
                os._exit(2)

    if parent_pid is not None:
        threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    return started


def _stop_local_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()  # a Ray this process started goes with it; a cluster it joined stays


def serve_fleet(args, owner_token: str | None, limits: P.Limits) -> int:
    """`serve --ray [ADDRESS] --replicas N|MIN,MAX`: start (or join) Ray, deploy the fleet, run the front."""
    from .curate import preset_arguments
    from .endpoint import WorkerStartError, claim_endpoint
    from .front import install_signal_handlers
    from .proxy import front_options
    from .server import Batching
    from .verdict_store import VerdictStoreError

    fleet = None
    started = _watch_parent_while_starting(args.parent_pid)
    try:
        replicas = parse_replicas("1" if args.replicas == "0" else args.replicas)
        if replicas[1] == 0:
            raise FleetError("--ray needs at least one replica (--replicas N or MIN,MAX)")
        batching = Batching(args.max_batch, args.max_batch_frames, args.batch_wait_ms)
        lock = claim_endpoint(args.endpoint, args.curve_dir, args.insecure)  # fail fast, before Ray starts
        device = "cuda" if args.replica_gpus and args.device == "cpu" else args.device
        fleet = Fleet(address=None if args.ray == "local" else args.ray, endpoint=args.endpoint, replicas=replicas,
                      preset=preset_arguments(args), controversial=args.controversial, batching=batching,
                      limits=limits, check_timeout=args.check_timeout, device=device, torch_threads=args.torch_threads,
                      replica_cpus=args.replica_cpus, replica_gpus=args.replica_gpus,
                      target_ongoing=args.target_ongoing, num_cpus=args.num_cpus)
        front = FleetFront(args.endpoint, fleet, metrics_port=args.metrics_port, lock_file=lock,
                           **front_options(args, owner_token, limits))
    except (FleetError, WorkerStartError, VerdictStoreError, ValueError) as e:
        if fleet is not None:
            fleet.stop()
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        started.set()  # from here the front's own loop watches the parent
    if args.insecure and args.endpoint.startswith("tcp://"):
        logger.warning("INSECURE: %s accepts unauthenticated clients from the network (--insecure)", args.endpoint)
    install_signal_handlers(front)
    described = fleet.describe()
    front.announce_ready(fleet=fleet.app, replicas=described["replicas"],
                         replica_pids=",".join(str(r["pid"]) for r in fleet.roster()["live"]))
    front.serve()
    return 0
