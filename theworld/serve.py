"""Serve TheWorld over HTTP: `python -m theworld.serve` (console script `theworld-serve`).

Loads the model once, spawns a safety worker (or attaches to a shared one with `--safety-endpoint`) and
serves an OpenAI-compatible `POST /v1/chat/completions`, `GET /v1/models`, `/health`, `/ready`,
`/metrics` and a web demo at `/`. The worker checks the prompt and every frame before the model runs,
and the answer and any rollout before they are returned (see docs/serve.md).

    python -m theworld.serve                        # tiny models, spawned tiny worker, http://127.0.0.1:8000
    python -m theworld.serve --model runs/theworld/model --port 8080
    python -m theworld.serve --ray --model-replicas 2  # the same API through Ray Serve, two model replicas

Prints `theworld-serve ready http://HOST:PORT` once it accepts requests (with `--port 0` the port is
chosen by the system). This module parses the arguments; `theworld.serving.server.run_server` serves, over
the inference pipeline of `theworld.inference` (the one `python -m theworld.generate` runs); with `--ray`,
`theworld.serving.ray_serve` serves the same app through Ray Serve.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from theworld.inference import DEFAULT_MAX_NEW_TOKENS, DEFAULT_VIDEO_FPS

API_KEY_ENV = "THEWORLD_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    from theworld.serving.schema import Limits

    limits = Limits()
    parser = argparse.ArgumentParser(
        prog="python -m theworld.serve",
        description="Serve TheWorld: an OpenAI-compatible /v1/chat/completions and a web demo at /, with the safety "
        "worker checking every prompt, frame, answer and rollout. Prints 'theworld-serve ready URL' when serving.",
    )
    parser.add_argument("--model", help="a directory written by TheWorld.save_pretrained (e.g. runs/theworld/model, the "
                        "model/ of a `python -m theworld.train` run; the demo then offers held-out clips of its task), "
                        "or a base Gemma 3 id/dir with --cosmos (default: the tiny models, built offline on first use)")
    parser.add_argument("--cosmos", help="Cosmos-Predict2 Video2World id or dir (for a base Gemma 3 --model)")
    parser.add_argument("--served-model-name", help="the model's name in /v1/models, answers and the demo (default: "
                        "--model as given, or theworld-tiny)")
    parser.add_argument("--device", default="cpu", help="torch device of the model (default: cpu)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1; anything beyond "
                        "loopback needs --api-key)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                        help=f"require `Authorization: Bearer KEY` on /v1/* and /metrics, and KEY as the demo's "
                        f"password (default: ${API_KEY_ENV}); required when --host is not a loopback address")
    parser.add_argument("--no-demo", action="store_true", help="serve the API only (no Gradio page at /)")
    safety = parser.add_argument_group("safety worker")
    safety.add_argument("--safety-endpoint", help="attach to a running worker (`python -m safety_worker serve`) "
                        "instead of spawning one")
    safety.add_argument("--safety-preset", choices=("tiny", "hub"), default="tiny",
                        help="checkpoint of a spawned worker (default: tiny, the offline test guardrail)")
    safety.add_argument("--safety-device", default="cpu", help="device of a spawned worker's guard models (default: cpu)")
    batching = parser.add_argument_group("batching and limits")
    batching.add_argument("--max-batch", type=int, default=8, help="most requests generated together (default: 8; "
                          "1 turns batching off)")
    batching.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long the model waits for more "
                          "requests after the first (default: 10)")
    batching.add_argument("--max-queue", type=int, default=64, help="requests allowed to wait for the model; more get "
                          "503 overloaded (default: 64)")
    batching.add_argument("--request-timeout", type=float, default=60.0, help="seconds one request may take, safety "
                          "checks included (default: 60)")
    batching.add_argument("--max-tokens-limit", type=int, default=limits.max_tokens_limit,
                          help=f"largest max_tokens a request may ask (default: {limits.max_tokens_limit}; a request "
                          f"without one gets {DEFAULT_MAX_NEW_TOKENS})")
    batching.add_argument("--max-prompt-tokens", type=int, default=limits.max_prompt_tokens,
                          help=f"longest text of a request, in tokens (default: {limits.max_prompt_tokens})")
    batching.add_argument("--max-frames", type=int, default=limits.max_frames,
                          help=f"most image parts (clip frames) per request (default: {limits.max_frames})")
    batching.add_argument("--max-image-bytes", type=int, default=limits.max_image_bytes,
                          help=f"largest encoded image (default: {limits.max_image_bytes})")
    batching.add_argument("--max-image-pixels", type=int, default=limits.max_image_pixels,
                          help=f"largest image, width x height (default: {limits.max_image_pixels})")
    batching.add_argument("--max-request-bytes", type=int, default=limits.max_request_bytes,
                          help=f"largest request body (default: {limits.max_request_bytes})")
    ray = parser.add_argument_group("Ray Serve (past one process: docs/serve.md, docs/scale.md)")
    ray.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                     help="serve the same API and demo through Ray Serve: the HTTP ingress on --host/--port, the model "
                     "as a deployment of --model-replicas replicas (each loads the model in its own process and batches "
                     "as above), the safety worker as without --ray (spawned, or --safety-endpoint: a worker or a guard "
                     "fleet). ADDRESS: a running Ray cluster (HEAD:6379 from `ray start --head`, or auto); no ADDRESS: "
                     "start a local Ray, stopped with the server")
    ray.add_argument("--model-replicas", default=None, metavar="N|MIN,MAX",
                     help="with --ray: N model replicas, or MIN,MAX to let Serve autoscale between them (aiming at "
                     "--max-batch requests in flight per replica). Default 1")
    ray.add_argument("--num-cpus", type=int, default=None,
                     help="with --ray and no ADDRESS: CPUs of the local Ray (default: all of this machine's)")
    ray.add_argument("--model-replica-cpus", type=float, default=None,
                     help="with --ray: CPUs Ray reserves per model replica (default 1)")
    ray.add_argument("--model-replica-gpus", type=float, default=None,
                     help="with --ray: GPUs per model replica (e.g. 1, or 0.5 to share one); the model then runs on "
                     "cuda (a --device other than cpu is kept; default 0)")
    world = parser.add_argument_group("world rollout")
    world.add_argument("--max-rollout", type=int, default=limits.max_rollout,
                       help=f"largest `rollout` a request may ask (default: {limits.max_rollout})")
    world.add_argument("--rollout-steps", type=int, default=None, help="denoising steps per rollout (default: "
                       "the model's own, the --world-rollout-steps a num_world_steps > 0 model was trained with, "
                       "else the pipeline's 35)")
    world.add_argument("--fps", type=int, default=DEFAULT_VIDEO_FPS,
                       help=f"frame rate of rollouts and their videos (default: {DEFAULT_VIDEO_FPS})")
    return parser


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not _is_loopback(args.host) and not args.api_key:
        parser.error(f"--host {args.host} serves beyond this machine: set --api-key (or ${API_KEY_ENV})")
    for flag in ("max_batch", "max_queue", "max_tokens_limit", "max_prompt_tokens", "max_frames", "max_image_bytes",
                 "max_image_pixels", "max_request_bytes", "rollout_steps", "fps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:  # rollout_steps None: the model's own
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.batch_wait_ms < 0 or args.request_timeout <= 0 or args.max_rollout < 0:
        parser.error("--batch-wait-ms and --max-rollout must be >= 0, --request-timeout > 0")
    ray_only = {"--model-replicas": args.model_replicas, "--num-cpus": args.num_cpus,
                "--model-replica-cpus": args.model_replica_cpus, "--model-replica-gpus": args.model_replica_gpus}
    if args.ray is None:
        given = [flag for flag, value in ray_only.items() if value is not None]
        if given:
            parser.error(f"{', '.join(given)} apply to a Ray Serve deployment only: add --ray [ADDRESS]")
        return
    if args.num_cpus is not None and args.ray != "local":
        parser.error(f"--num-cpus sizes a local Ray; the cluster at --ray {args.ray} has its own")
    from safety_worker.fleet import FleetError, parse_replicas  # the guard fleet's rule for --replicas (light)

    given = args.model_replicas or "1"
    try:
        args.model_replicas = parse_replicas(given)
    except FleetError:
        args.model_replicas = (0, 0)
    if args.model_replicas[0] < 1:
        parser.error(f"--model-replicas must be N or MIN,MAX with 1 <= MIN <= MAX, got {given!r}")
    for flag, value in (("--num-cpus", args.num_cpus), ("--model-replica-cpus", args.model_replica_cpus),
                        ("--model-replica-gpus", args.model_replica_gpus)):
        if value is not None and value < 0:
            parser.error(f"{flag} must be >= 0")
    args.model_replica_cpus = 1.0 if args.model_replica_cpus is None else args.model_replica_cpus
    args.model_replica_gpus = args.model_replica_gpus or 0.0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _validate(parser, args)
    from theworld.serving.server import run_server

    return run_server(args)


if __name__ == "__main__":
    sys.exit(main())
