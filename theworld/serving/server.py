"""Running the server: bind the port, start (or attach to) the safety worker, load the model, serve until
SIGTERM. `python -m theworld.serve` parses its arguments and calls `run_server`."""
from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import sys
import tempfile

READY_PREFIX = "theworld-serve ready"
# Seeds what loading initialises at random (a base model's projector): every server and every Ray Serve
# replica of the same model then answers alike.
MODEL_INIT_SEED = 0


def run_server(args: argparse.Namespace) -> int:
    """Serve with the options of `python -m theworld.serve` (`theworld.serve.build_parser`); the exit code."""
    # uvicorn re-raises SIGTERM after its graceful shutdown; with the default handler that would kill this
    # process before the ExitStack below stops the engine and the spawned worker. Exit normally instead.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    from theworld.inference import DEFAULT_MAX_NEW_TOKENS
    from theworld.inference.guard import safety_endpoint
    from theworld.inference.loading import TINY_MODEL_NAME
    from theworld.serving.schema import Limits

    limits = Limits(max_request_bytes=args.max_request_bytes, max_image_bytes=args.max_image_bytes,
                    max_image_pixels=args.max_image_pixels, max_frames=args.max_frames,
                    max_prompt_tokens=args.max_prompt_tokens, max_tokens_limit=args.max_tokens_limit,
                    default_max_tokens=min(DEFAULT_MAX_NEW_TOKENS, args.max_tokens_limit), max_rollout=args.max_rollout)
    model_name = args.served_model_name or args.model or TINY_MODEL_NAME
    try:
        sock = _bind(args.host, args.port)  # first: a port in use fails before anything is loaded
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    if args.ray is not None:  # the same app, its model a Ray Serve deployment (theworld.serving.ray_serve)
        port = sock.getsockname()[1]
        sock.close()  # Serve's proxy binds it (with --port 0: the free port the system just gave)
        with safety_endpoint(args.safety_endpoint, args.safety_preset, args.safety_device) as endpoint:
            from theworld.serving.ray_serve import run_ray_server

            return run_ray_server(args, limits, endpoint, model_name, port)

    from theworld.inference.engine import BatchingEngine
    from theworld.inference.guard import Guard
    from theworld.inference.loading import load_model
    from theworld.inference.pipeline import GuardedPipeline
    from theworld.serving.app import ServeApp
    from theworld.serving.metrics import ServeMetrics

    with contextlib.ExitStack() as stack:
        stack.callback(sock.close)
        endpoint = stack.enter_context(safety_endpoint(args.safety_endpoint, args.safety_preset, args.safety_device))
        try:
            model = load_model(args.model, args.cosmos, init_seed=MODEL_INIT_SEED).to(args.device).eval()
        except (OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        metrics = ServeMetrics()
        engine = BatchingEngine(model, max_batch=args.max_batch, batch_wait=args.batch_wait_ms / 1000,
                                max_queue=args.max_queue, rollout_steps=args.rollout_steps, fps=args.fps,
                                on_batch=metrics.batch_size.observe)
        stack.callback(engine.close)
        guard = Guard(endpoint)
        stack.callback(guard.close)
        pipeline = GuardedPipeline(engine, guard, request_timeout=args.request_timeout)
        examples = []
        if not args.no_demo:
            from theworld.serving.demo import motion_examples

            examples_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="theworld-examples-"))
            examples = motion_examples(examples_dir, args.model)
        server_app = ServeApp(pipeline, metrics, model_name=model_name,
                              limits=limits, api_key=args.api_key, demo=not args.no_demo, demo_examples=examples,
                              fps=args.fps)
        host, port = sock.getsockname()[:2]
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}"

        _serve(server_app.app, sock, f"{READY_PREFIX} {url} (safety worker {endpoint})")
    return 0


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _serve(app, sock: socket.socket, ready_line: str) -> None:
    """Run uvicorn on the bound socket; print `ready_line` once it serves (the socket already listens, so a
    client that connects earlier waits instead of failing)."""
    import uvicorn

    class AnnouncingServer(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            print(ready_line, flush=True)

    AnnouncingServer(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10)).run(sockets=[sock])


def _exit_cleanly(signum, frame):
    raise SystemExit(0)
