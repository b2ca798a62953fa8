"""Safe inference with TheWorld: `python -m theworld.generate` (console script `theworld-generate`).

Every request passes the safety worker *before* the model sees it: the prompt and the image (or
video) are checked in one round trip, a blocked request is refused with its reason and nothing is
generated; a safe one continues with the worker's sanitised (face-pixelated) frames. The generated
answer is checked too, and so is every frame of a rollout video before it is written.

Examples (tiny models, offline; they are built on first use):

    python -m theworld.generate --image ball.png --prompt "Where will the ball be next?"
    python -m theworld.generate --image ball.png --prompt "What happens next?" --rollout 2 --save-video next.mp4
    python -m theworld.generate --jsonl requests.jsonl    # {"image": ..., "prompt": ...} per line

Exit status: 0 when every request was answered, 1 when any was refused (prompt, image, answer or
video blocked), 2 for a usage error or a request that could not be checked (the worker never answered).

This module parses the arguments; the pipeline (loading, media, the safety checks, the rollout video) is
`theworld.inference`, which `python -m theworld.serve` runs too.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from theworld.inference import DEFAULT_MAX_NEW_TOKENS, DEFAULT_VIDEO_FPS

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m theworld.generate",
        description="Answer a question about an image or video with TheWorld. The prompt and the frames are "
        "checked by the safety worker first (blocked: a refusal on stderr, exit 1, nothing generated); the "
        "answer and any rollout video are checked before they are shown or written.",
    )
    inputs = parser.add_argument_group("input (either --image/--video with --prompt, or --jsonl)")
    source = inputs.add_mutually_exclusive_group()
    source.add_argument("--image", help="image file (PNG, JPEG, ...)")
    source.add_argument("--video", help="video clip (mp4, gif, ...) of 1 + 4k frames (1, 5, 9, ...), oldest first; every "
                        "frame is checked, the world path encodes the whole clip, Gemma sees its last frame")
    source.add_argument("--jsonl", help='batch: one {"id", "prompt", "image" or "video"} object per line (paths '
                        "relative to the file); prints one JSON result per line")
    inputs.add_argument("--prompt", help="the question")
    model = parser.add_argument_group("model")
    model.add_argument("--model", help="a directory written by TheWorld.save_pretrained (e.g. runs/theworld/model, "
                       "the model/ of a `python -m theworld.train` run), or a base Gemma 3 id/dir with --cosmos "
                       "(default: the tiny models, built offline in $THEWORLD_TINY_DIR or ~/.cache/theworld/tiny on "
                       "first use)")
    model.add_argument("--cosmos", help="Cosmos-Predict2 Video2World id or dir (for a base Gemma 3 --model; a saved "
                       "TheWorld remembers its own)")
    model.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    model.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                       help=f"answer length limit (default: {DEFAULT_MAX_NEW_TOKENS})")
    world = parser.add_argument_group("world rollout")
    world.add_argument("--rollout", type=int, metavar="N", help="predict N future latent frames (4 video frames "
                       "each) with the Cosmos transformer and add them as world tokens (default: the checkpoint's "
                       "num_world_steps; 0 for base models)")
    world.add_argument("--rollout-steps", type=int, default=None, help="denoising steps per rollout (default: "
                       "the model's own, the --world-rollout-steps a num_world_steps > 0 model was trained with, "
                       "else the pipeline's 35)")
    world.add_argument("--seed", type=int, default=0, help="seed of the rollout noise (default: 0)")
    world.add_argument("--save-video", metavar="PATH", help="write the decoded rollout (observed frame + predicted "
                       "frames, after the safety worker's face pixelation) to PATH (.mp4 or .gif); with --jsonl a "
                       "directory that receives <id>.mp4")
    world.add_argument("--fps", type=int, default=DEFAULT_VIDEO_FPS, help=f"frame rate of the rollout: the fps the Cosmos transformer is conditioned on and the written "
                       f"video's rate (default: {DEFAULT_VIDEO_FPS})")
    safety = parser.add_argument_group("safety worker")
    safety.add_argument("--safety-endpoint", help="attach to a running worker (`python -m safety_worker serve`) "
                        "instead of spawning one")
    safety.add_argument("--safety-preset", choices=("tiny", "hub"), default="tiny",
                        help="checkpoint of a spawned worker (default: tiny, the offline test guardrail)")
    return parser


def _validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.jsonl is None and (args.image is None and args.video is None):
        parser.error("give --image or --video with --prompt, or --jsonl")
    if args.jsonl is None and args.prompt is None:
        parser.error("--prompt is required with --image/--video")
    if args.jsonl is not None and args.prompt is not None:
        parser.error("--prompt does not apply to --jsonl (each line has its own prompt)")
    if args.rollout is not None and args.rollout < 0:
        parser.error("--rollout must be >= 0")
    if args.save_video is not None and args.rollout == 0:
        parser.error("--save-video writes the rollout: it needs --rollout N with N >= 1")
    if args.rollout_steps is not None and args.rollout_steps < 1:
        parser.error("--rollout-steps must be >= 1")


def _requests(args: argparse.Namespace) -> list:
    from theworld.inference.media import read_frames
    from theworld.inference.offline import read_jsonl_requests
    from theworld.inference.pipeline import Request

    if args.jsonl is not None:
        return read_jsonl_requests(args.jsonl, max_tokens=args.max_new_tokens)
    source = args.video if args.video is not None else args.image
    frames = read_frames(source, video=args.video is not None)
    return [Request.question(args.prompt, frames, id=Path(source).stem, max_tokens=args.max_new_tokens)]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _validate(parser, args)
    try:
        requests = _requests(args)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE

    from theworld.inference.guard import safety_endpoint
    from theworld.inference.messages import InferenceError
    from theworld.inference.loading import load_model
    from theworld.inference.offline import Generator

    def model():  # loaded on the first request the worker lets through
        return load_model(args.model, args.cosmos, num_world_steps=args.rollout).to(args.device).eval()

    refused = False
    with safety_endpoint(args.safety_endpoint, args.safety_preset) as endpoint, \
            Generator(model, endpoint, rollout_steps=args.rollout_steps, seed=args.seed, fps=args.fps) as generator:
        for request in requests:
            video = args.save_video
            if video is not None and args.jsonl is not None:
                video = Path(video) / f"{request.id}.mp4"
            try:
                result = generator(request, save_video=video)
            except ValueError as e:  # a model that cannot do what was asked (e.g. --rollout vs checkpoint)
                print(f"error: {e}", file=sys.stderr)
                return EXIT_USAGE
            except InferenceError as e:  # the worker never answered (safety_unavailable) or the model ran out of time
                print(f"error: {e.message}", file=sys.stderr)
                return EXIT_USAGE
            refused |= result.refused is not None
            if args.jsonl is not None:
                print(json.dumps(result.as_json()), flush=True)
                continue
            if result.refused is not None:
                print(f"refused: {result.refused}", file=sys.stderr)
            if result.answer is not None:
                print(result.answer)
            if result.video is not None:
                print(f"rollout video: {result.video}", file=sys.stderr)
    return EXIT_REFUSED if refused else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
