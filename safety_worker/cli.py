"""Command line: `python -m safety_worker {serve,curate,check,status,keys}` (also the `safety-worker` script)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from . import protocol as P

EXIT_SAFE, EXIT_BLOCKED, EXIT_ERROR = 0, 1, 2
_DEFAULT_GUARDRAIL_REPO = "nvidia/Cosmos-1.0-Guardrail"  # = presets.DEFAULT_GUARDRAIL_REPO (not imported: --help stays light)


def _add_checker_options(p: argparse.ArgumentParser) -> None:
    """The checker's options, the same for `serve` and `curate` (same models, policy and batching: same verdicts)."""
    p.add_argument("--preset", choices=("tiny", "hub", "local"), default="tiny",  # resolved by safety_worker.presets
                   help="'tiny' (default): build once and use the offline tiny guardrail checkpoint "
                        "(safety_worker.tiny); 'hub': real weights from the Hugging Face cache (see --hf-home, "
                        "--guardrail-repo); 'local': real weights from two local directories (--guardrail-dir, --text-guard-dir)")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch intra-op CPU threads (default 1: the worker shares cores with trainers)")
    p.add_argument("--tiny-dir", default=None,
                   help="cache root for the tiny checkpoint (default: $SAFETY_WORKER_TINY_DIR or ~/.cache/theworld/safety-tiny)")
    p.add_argument("--tiny-faces", choices=("none", "all"), default="none",
                   help="tiny face filter: 'none' finds no face (frames unchanged), 'all' pixelates every frame")
    p.add_argument("--hf-home", default=None,
                   help="with --preset hub: HF_HOME holding hub/models--nvidia--Cosmos-1.0-Guardrail and "
                        "hub/models--Qwen--Qwen3Guard-Gen-0.6B (default: the environment's HF_HOME)")
    p.add_argument("--guardrail-repo", default=_DEFAULT_GUARDRAIL_REPO,
                   help=f"with --preset hub: hub id of the guardrail checkpoint (default {_DEFAULT_GUARDRAIL_REPO})")
    p.add_argument("--guardrail-dir", default=None,
                   help="with --preset local: a local copy of nvidia/Cosmos-1.0-Guardrail (blocklist/, face_blur_filter/)")
    p.add_argument("--text-guard-dir", default=None,
                   help="with --preset local: a local copy of Qwen/Qwen3Guard-Gen-0.6B (config, weights, tokenizer)")
    p.add_argument("--controversial", choices=("block", "allow"), default="block",
                   help="policy for a Qwen3Guard 'Controversial' verdict (default: block)")
    from .server import Batching  # light: the checker is imported only when a worker loads it

    batching = Batching()
    p.add_argument("--max-batch", type=int, default=batching.max_batch,
                   help="dynamic batching: the checker takes up to N queued checks' texts-or-samples at once (each text "
                        "of a check_text counts one; a check_video or check_sample one): their texts go through the "
                        "blocklist and ONE left-padded Qwen3Guard generate, their frames of the same size through "
                        f"RetinaFace together; 1 checks one request at a time (no batching). Default {batching.max_batch}")
    p.add_argument("--max-batch-frames", type=int, default=batching.max_batch_frames,
                   help="at most F frames in one batch, also RetinaFace's forward-pass batch size (on a CPU "
                        "at most 2^17 pixels per pass: large frames gain nothing from batching on a CPU) "
                        f"(a single bigger clip still runs, in passes of F). Default {batching.max_batch_frames}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m safety_worker",
        description="The Cosmos safety checker (cosmos_guardrail) as a ZeroMQ service, and its command-line client.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    limits = P.Limits()
    from .server import Batching  # light: the checker is imported only when a worker loads it

    batching = Batching()

    s = sub.add_parser(
        # No abbreviations: replica_args strips the front's options by name, and an abbreviated
        # --replica would reach each replica and make it start replicas of its own.
        "serve", allow_abbrev=False, help="run a worker (prints one 'safety-worker ready ...' line when it accepts requests)",
        description="Run a safety worker: loads the real cosmos_guardrail CosmosSafetyChecker (blocklist + "
        "Qwen3Guard for text, RetinaFace face pixelation for frames) and serves it on ENDPOINT. Verdicts fail "
        "closed. Stops on SIGTERM/SIGINT (drains queued checks, exits 0) or on `shutdown` from its owner "
        "(the token in $SAFETY_WORKER_OWNER_TOKEN, as spawn_worker sets it).",
    )
    s.add_argument("--endpoint", required=True,
                   help="ZeroMQ endpoint to bind: ipc:///private/dir/worker.sock (the directory is created 0700 "
                        "if missing and must not be group/world accessible) or tcp://HOST:PORT (needs --curve-dir or --insecure)")
    s.add_argument("--device", default="cpu", help="torch device for the guard models: cpu (default) or cuda:N")
    _add_checker_options(s)
    s.add_argument("--check-timeout", type=float, default=60.0,
                   help="seconds one check may run before it is answered blocked (fail closed); default 60")
    s.add_argument("--queue-size", type=int, default=limits.queue_size,
                   help=f"checks waiting at most; more are answered 'busy' at once (default {limits.queue_size})")
    s.add_argument("--max-message-bytes", type=int, default=limits.max_message_bytes,
                   help=f"largest accepted message frame; bigger ones disconnect the peer (default {limits.max_message_bytes})")
    s.add_argument("--batch-wait-ms", type=float, default=batching.wait_ms,
                   help="while a batch has fewer checks than were queued when it began plus those the previous batch "
                        "answered (their clients are about to send again), wait at most M ms (after its first check) for "
                        "more to join it; a lone client never waits. "
                        f"Default {batching.wait_ms:g}")
    s.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics at http://127.0.0.1:P/metrics (0: any free port, shown in `hello`); "
                        "names start with safety_worker_ (docs/safety_worker.md). Default: off")
    s.add_argument("--replicas", default="0", metavar="N|MIN,MAX",
                   help="N checker processes behind a load-balancing front on ENDPOINT, with a verdict cache; the "
                        "endpoint answers as one worker (hello's pid and metrics_url are the front's; the replicas' "
                        "pids are in stats.proxy.replica_pids). Without --ray: N local processes, each restarted by a "
                        "supervisor if it dies or hangs. With --ray: N Ray Serve replicas, or MIN,MAX to let Serve "
                        "autoscale between them (docs/scale.md). Default 0: one in-process checker (with --ray: 1)")
    s.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="serve the checker as a Ray Serve deployment (a guard fleet) behind this same front: join the "
                        "Ray cluster at ADDRESS (HEAD:6379 from `ray start --head`, or auto), or with no ADDRESS start "
                        "a local Ray for this worker. Each replica is a Ray actor process holding the guard with this "
                        "command's checker options; clients see protocol 1.1 unchanged, and hello.fleet / stats.fleet "
                        "describe the fleet")
    s.add_argument("--num-cpus", type=int, default=None,
                   help="with --ray and no ADDRESS: CPUs of the local Ray (default: all of this machine's)")
    s.add_argument("--replica-cpus", type=float, default=1.0,
                   help="with --ray: CPUs Ray reserves per replica (default 1; the guard runs --torch-threads threads)")
    s.add_argument("--replica-gpus", type=float, default=0.0,
                   help="with --ray: GPUs per replica (e.g. 1, or 0.5 to share one); the guard then runs on cuda (default 0)")
    s.add_argument("--target-ongoing", type=int, default=2,
                   help="with --ray and --replicas MIN,MAX: calls in flight per replica that Serve's autoscaler aims for "
                        "(the front sends the requests that arrived together as one call per replica); above it for "
                        "30 s Serve adds replicas, up to MAX, below it for 10 min it removes them, down to MIN. Default 2")
    s.add_argument("--cache-mb", type=float, default=256.0,
                   help="with --replicas or --ray: verdict cache size in MiB, keyed by content hash and checker identity (0: off)")
    s.add_argument("--cache-file", default=None,
                   help="with --replicas or --ray: keep the verdict cache across restarts in this file (msgpack, mode 0600; "
                        "saved at shutdown, loaded at start if the checker is the same)")
    s.add_argument("--verdict-store", default=None,
                   help="answer checks from this shared on-disk verdict store (SQLite, created 0600) and fill it with "
                        "what the checker computes (never faults): the store curate jobs and other workers use "
                        "(docs/scale.md); with --replicas or --ray it replaces the front's in-memory cache")
    s.add_argument("--verdict-store-mb", type=float, default=10 * 1024,
                   help="with --verdict-store: its bound in MiB; least recently used verdicts go first (default 10240)")
    s.add_argument("--curve-dir", default=None,
                   help="CURVE keys for a tcp:// endpoint (from `keys DIR`): the worker's key pair and DIR/authorized/*.key, "
                        "the only clients it answers")
    s.add_argument("--insecure", action="store_true",
                   help="allow a tcp:// endpoint without authentication (anyone who can reach the port can use the worker)")
    s.add_argument("--parent-pid", type=int, default=None,
                   help="stop (as on SIGTERM) when this process, the worker's parent, exits; spawn_worker sets it")
    s.add_argument("--log-level", default="INFO", help="logging level (prompts are never logged)")

    cu = sub.add_parser(
        "curate", allow_abbrev=False,
        help="check a whole dataset once on Ray (a pool of checker actors) and write it sanitized, with ledgers and a manifest",
        description="Curate INPUT (any data the trainer reads) through the real checker on a Ray Data job: a pool of "
        "Ray actors, each a process holding one checker with the worker's policy and batching. Writes OUTPUT/shards/"
        "part-NNNNN.parquet (kept samples: face-pixelated frames, original texts), blocked.jsonl, errors.jsonl and "
        "manifest.json (checker identity, counts read = kept + blocked + errors, input fingerprints, shards); train on "
        "it with `python -m theworld.train --data OUTPUT`. Killed, run it again with the same arguments: it resumes. "
        "Exit 0 done, 2 error. See docs/scale.md.",
    )
    from .curate import add_arguments as add_curate_arguments  # light: Ray is imported when the job runs

    add_curate_arguments(cu)
    _add_checker_options(cu)
    cu.add_argument("--log-level", default="INFO", help="logging level (prompts are never logged)")

    c = sub.add_parser(
        "check", help="check a text, image or video with a running worker; exit 0 safe, 1 blocked, 2 error",
        description="Check one input with a running worker and print a JSON verdict "
        "{safe, reason, stage, ...}. Exit status: 0 safe, 1 blocked, 2 error.",
    )
    c.add_argument("--endpoint", required=True, help="the worker's endpoint (as given to `serve`)")
    what = c.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="a prompt to check")
    what.add_argument("--image", help="an image file (any format Pillow reads; converted to RGB)")
    what.add_argument("--video", help="a video file (any format imageio reads, e.g. mp4 via ffmpeg)")
    c.add_argument("--out", help="with --image/--video: write the face-pixelated result here (only when safe)")
    c.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the verdict (default 120)")
    c.add_argument("--curve-dir", default=None, help="CURVE key directory (from `keys`) for a tcp:// worker serving with keys")

    st = sub.add_parser("status", help="print what a running worker reports about itself (hello + stats) as JSON",
                        description="Print the worker's hello (pid, versions, models, limits, grad mode, loaded "
                        "modules) and its stats as JSON. Exit 0 if it answered, 2 if not.")
    st.add_argument("--endpoint", required=True, help="the worker's endpoint")
    st.add_argument("--timeout", type=float, default=10.0, help="seconds to wait (default 10)")
    st.add_argument("--curve-dir", default=None, help="CURVE key directory (from `keys`) for a tcp:// worker serving with keys")

    k = sub.add_parser("keys", help="create CURVE keys for tcp:// workers and their clients",
                       description="Create DIR (0700) with a worker key pair (server.key, server.key_secret), a client "
                       "key pair (client.key, client.key_secret) and DIR/authorized/client.key. Serve with "
                       "`serve --endpoint tcp://... --curve-dir DIR`; give clients DIR (or copy client.key* and "
                       "server.key to them, and each extra client's public key into the worker's DIR/authorized/).")
    k.add_argument("dir", help="directory to create the keys in")
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    args.argv = argv  # `serve --replicas` passes the checker options on to its replicas
    return {"serve": serve, "check": check, "status": status, "keys": keys, "curate": curate}[args.command](args)


def curate(args) -> int:
    from .curate import main as curate_main

    return curate_main(args)


def keys(args) -> int:
    from .security import create_keys

    print(json.dumps(create_keys(args.dir), indent=2))
    return 0


def _client_kwargs(args) -> dict:
    if not args.curve_dir:
        return {}
    from .security import server_public_key

    return {"curve_server_key": server_public_key(args.curve_dir), "curve_keys_dir": args.curve_dir}


def serve(args) -> int:
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # Read and forget the owner token so nothing this process starts inherits it.
    token = os.environ.pop(P.OWNER_TOKEN_ENV, None)
    from .presets import PresetError, use_preset

    try:
        models = use_preset(args.preset, tiny_dir=args.tiny_dir, tiny_faces=args.tiny_faces, hf_home=args.hf_home,
                            guardrail_repo=args.guardrail_repo, guardrail_dir=args.guardrail_dir,
                            text_guard_dir=args.text_guard_dir)
    except PresetError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR

    from .endpoint import WorkerStartError
    from .front import install_signal_handlers
    from .server import SafetyWorker, load_checker
    from .verdict_store import VerdictStoreError

    limits = P.Limits(queue_size=args.queue_size, max_message_bytes=args.max_message_bytes)
    if args.ray is not None:
        from .fleet import serve_fleet

        return serve_fleet(args, token, limits)
    fleet_only = [flag for flag, value, default in (("--num-cpus", args.num_cpus, None), ("--replica-cpus", args.replica_cpus, 1.0),
                                                    ("--replica-gpus", args.replica_gpus, 0.0),
                                                    ("--target-ongoing", args.target_ongoing, 2)) if value != default]
    if fleet_only:
        print(f"error: {', '.join(fleet_only)} apply to a Ray fleet only: add --ray [ADDRESS]", file=sys.stderr)
        return EXIT_ERROR
    if not args.replicas.isdigit():
        print(f"error: --replicas {args.replicas}: without --ray it is a number of local replicas; "
              "MIN,MAX (autoscaling) needs --ray [ADDRESS]", file=sys.stderr)
        return EXIT_ERROR
    args.replicas = int(args.replicas)
    if args.replicas:
        from .proxy import serve_replicas

        return serve_replicas(args, token, limits)
    from .server import Batching

    try:
        batching = Batching(args.max_batch, args.max_batch_frames, args.batch_wait_ms)
    except ValueError as e:
        print(f"error: --max-batch/--max-batch-frames/--batch-wait-ms: {e}", file=sys.stderr)
        return EXIT_ERROR
    try:
        worker = SafetyWorker(
            args.endpoint, lambda: load_checker(args.device, args.guardrail_repo, args.torch_threads), models=models, limits=limits,
            check_timeout=args.check_timeout, owner_token=token, device=args.device, insecure=args.insecure, curve_dir=args.curve_dir,
            controversial=args.controversial, parent_pid=args.parent_pid, batching=batching, metrics_port=args.metrics_port,
            verdict_store=args.verdict_store, verdict_store_bytes=int(args.verdict_store_mb * 2**20),
        )
    except (WorkerStartError, VerdictStoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    if args.insecure and args.endpoint.startswith("tcp://"):
        logging.getLogger("safety_worker").warning(
            "INSECURE: %s accepts unauthenticated clients from the network (--insecure)", args.endpoint)
    install_signal_handlers(worker)
    import gc

    # The loaded models are a large object graph that lives as long as the process: move it out of the
    # cyclic collector's sight. Exiting then takes ~1.7 s instead of ~7.7 s (measured here on a
    # SIGTERM'd tiny worker, all in the final collection), and collections while serving skip it too.
    gc.freeze()
    worker.announce_ready()
    worker.serve()
    return 0


def _load_media(args):
    import numpy as np

    if args.image:
        from PIL import Image

        with Image.open(args.image) as im:
            return np.asarray(im.convert("RGB"))[None], {}
    import imageio.v3 as iio

    frames = iio.imread(args.video)
    meta = iio.immeta(args.video)
    if frames.ndim == 3:  # a single-frame file
        frames = frames[None]
    if frames.shape[-1] == 4:
        frames = frames[..., :3]
    return np.ascontiguousarray(frames, dtype=np.uint8), {"fps": meta.get("fps")}


def _save_media(args, frames, meta) -> None:
    if args.image:
        from PIL import Image

        Image.fromarray(frames[0]).save(args.out)
        return
    import imageio.v3 as iio

    kwargs = {"fps": meta["fps"]} if meta.get("fps") else {}
    iio.imwrite(args.out, frames, **kwargs)


def check(args) -> int:
    from .client import SafetyClient

    try:
        with SafetyClient(args.endpoint, timeout=args.timeout, **_client_kwargs(args)) as client:
            if args.text is not None:
                v = client.check_text(args.text)
                out = {"input": "text", "safe": v.safe, "reason": v.reason}
            else:
                frames, meta = _load_media(args)
                v = client.check_video(frames)
                out = {"input": "image" if args.image else "video", "shape": list(frames.shape),
                       "safe": v.safe, "reason": v.reason, "stage": v.stage}
                if args.out and v.safe:
                    _save_media(args, v.frames, meta)
                    out["out"] = args.out
                elif args.out:
                    out["out"] = None  # blocked: nothing written
    except Exception as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        return EXIT_ERROR
    print(json.dumps(out))
    return EXIT_SAFE if out["safe"] else EXIT_BLOCKED


def status(args) -> int:
    from .client import SafetyClient

    try:
        with SafetyClient(args.endpoint, timeout=args.timeout, **_client_kwargs(args)) as client:
            out = {"hello": client.hello(), "stats": client.stats()}
    except Exception as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        return EXIT_ERROR
    print(json.dumps(out, indent=2))
    return 0
