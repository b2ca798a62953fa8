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
video blocked), 2 for a usage error.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
DEFAULT_MAX_NEW_TOKENS = 32
DEFAULT_VIDEO_FPS = 16  # == theworld.modeling.rollout.DEFAULT_FPS (not imported here: keeps --help light)


@dataclass
class Request:
    """One question about one image or video clip."""

    id: str
    prompt: str
    frames: np.ndarray  # uint8 [T, H, W, 3]; an image is one frame


@dataclass
class Result:
    id: str
    answer: str | None = None
    refused: str | None = None  # the reason, when the safety worker blocked something
    video: str | None = None

    def as_json(self) -> dict:
        return {key: value for key, value in vars(self).items() if value is not None}


def read_frames(path: str | Path, video: bool) -> np.ndarray:
    """An image as `[1, H, W, 3]` or a video as `[T, H, W, 3]`, uint8 RGB."""
    import imageio.v3 as iio

    from theworld.data.sources import as_rgb_array

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such {'video' if video else 'image'} file: {path}")
    if not video:
        return as_rgb_array(path)[None]
    from theworld.configuration_theworld import check_clip_length

    frames = np.asarray(iio.imread(path, plugin=None if path.suffix.lower() == ".gif" else "FFMPEG"))
    try:
        check_clip_length(len(frames))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return np.ascontiguousarray(np.stack([as_rgb_array(frame[..., :3]) for frame in frames]))


def write_video(path: str | Path, frames: np.ndarray, fps: int = DEFAULT_VIDEO_FPS) -> None:
    """Write uint8 `[T, H, W, 3]` frames (mp4 through ffmpeg, or gif by extension)."""
    import imageio.v3 as iio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".gif":
        iio.imwrite(path, frames, duration=1000 / fps, loop=0)
    else:
        # macro_block_size=1: keep tiny frames at their size instead of padding to 16.
        iio.imwrite(path, frames, fps=fps, plugin="FFMPEG", macro_block_size=1)


def load_requests(args: argparse.Namespace) -> list[Request]:
    """The requests named on the command line, or one per line of `--jsonl`."""
    from theworld.data.sources import iter_jsonl

    if args.jsonl is None:
        source = args.video if args.video is not None else args.image
        return [Request(id=Path(source).stem, prompt=args.prompt, frames=read_frames(source, video=args.video is not None))]
    requests = []
    jsonl = Path(args.jsonl)
    for line_no, record in iter_jsonl(jsonl):
        if "prompt" not in record or ("image" in record) == ("video" in record):
            raise ValueError(f'{jsonl}:{line_no}: each line needs "prompt" and exactly one of "image" or "video"')
        source = jsonl.parent / record.get("video", record.get("image"))
        requests.append(Request(id=str(record.get("id", f"line-{line_no}")), prompt=str(record["prompt"]),
                                frames=read_frames(source, video="video" in record)))
    return requests


def load_model(model_path: str | None, cosmos: str | None, num_world_steps: int | None, device: str):
    """A trained TheWorld directory, or a base Gemma 3 id plus a Cosmos id; the tiny models by default."""
    from transformers import AutoConfig

    from theworld import TheWorld, TheWorldConfig
    from theworld.tiny import build_tiny_models, default_tiny_dir

    if model_path is None:
        gemma_dir, cosmos_dir = build_tiny_models(default_tiny_dir())
        model_path, cosmos = str(gemma_dir), cosmos or str(cosmos_dir)
    saved = AutoConfig.from_pretrained(model_path)
    if saved.model_type == TheWorldConfig.model_type:
        if num_world_steps is not None and num_world_steps != saved.num_world_steps:
            raise ValueError(
                f"{model_path} was trained with num_world_steps={saved.num_world_steps} (its projector has one "
                f"temporal embedding per frame); use --rollout {saved.num_world_steps} or leave --rollout out"
            )
        model = TheWorld.from_pretrained(model_path, cosmos_model=cosmos)
    else:
        if cosmos is None:
            raise ValueError(f"{model_path} is a base Gemma 3 model: pass --cosmos (a Cosmos-Predict2 Video2World id or dir)")
        model = TheWorld.from_pretrained(model_path, cosmos_model=cosmos, num_world_steps=num_world_steps or 0)
    return model.to(device).eval()


@dataclass
class GeneratedBatch:
    """What `generate_batch` returns: each row's new tokens, its prompt length, and the world latents."""

    new_tokens: torch.Tensor  # [B, N] token ids after each prompt (padding after an early end of turn)
    prompt_tokens: list[int]  # real (unpadded) prompt tokens per row
    world_latents: torch.Tensor | None  # [B, 16, T, h, w], rollout included; None without a world

    def answer(self, model, row: int, max_new_tokens: int | None = None) -> str:
        """Row `row`'s answer text, optionally cut to its first `max_new_tokens` tokens."""
        tokens = self.new_tokens[row] if max_new_tokens is None else self.new_tokens[row, :max_new_tokens]
        return model.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()


def generate_batch(model, collator, samples: list[dict], *, max_new_tokens: int, **generation_kwargs) -> GeneratedBatch:
    """Answer samples (already checked, sanitised frames) in one `model.generate` call.

    `collator` is a `TheWorldCollator(model, for_generation=True)`. The world is encoded (and rolled out)
    once, so the same latents feed the answer and any rollout video."""
    batch = {k: v.to(model.device) for k, v in collator(samples).items()}
    world_latents = None
    with torch.no_grad():
        if "world_pixel_values" in batch:
            world_latents = model.encode_world(batch.pop("world_pixel_values"), batch["world_num_frames"])
            batch["world_latents"] = world_latents
        output = model.generate(**batch, max_new_tokens=max_new_tokens, **generation_kwargs)
    return GeneratedBatch(output[:, batch["input_ids"].shape[1]:].cpu(), batch["attention_mask"].sum(dim=1).tolist(),
                          world_latents)


class SafeGenerator:
    """Answers requests with TheWorld; the safety worker sees every input before the model does and
    every output before the user does.

    Args:
        model: a `TheWorld`, or a function returning one: it is then loaded on the first request
            that passes the safety check (a refused request loads nothing).
        client: a connected `SafetyClient`.
        max_new_tokens: answer length limit.
        rollout_config: denoising steps, guidance and seed of the world rollout (models with
            `num_world_steps > 0`).
        fps: frame rate of written rollout videos.
        generation_kwargs: passed to `model.generate` (greedy decoding by default).
    """

    def __init__(self, model, client, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, rollout_config=None,
                 fps: int = DEFAULT_VIDEO_FPS, **generation_kwargs):
        self._model = model
        self._collator = None
        self.client = client
        self.max_new_tokens = max_new_tokens
        self.rollout_config = rollout_config
        self.fps = fps
        self.generation_kwargs = {"do_sample": False, **generation_kwargs}

    @property
    def model(self):
        if callable(self._model) and not isinstance(self._model, torch.nn.Module):
            self._model = self._model()
        if self._collator is None:
            from theworld.data.collator import TheWorldCollator

            if self.rollout_config is not None:
                self._model.rollout_config = self.rollout_config
            self._collator = TheWorldCollator(self._model, for_generation=True)
        return self._model

    def __call__(self, request: Request, save_video: str | Path | None = None) -> Result:
        verdict = self.client.check_sample(request.prompt, request.frames)
        if not verdict.safe:
            return Result(request.id, refused=f"the request was blocked by the safety checker ({verdict.stage}): "
                                              f"{verdict.reason}")
        # The model sees the worker's sanitised frames: the whole clip feeds the world path, its last frame
        # (the current observation) Gemma's image path.
        sample = {
            "id": request.id,
            "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": request.prompt}]}],
            "images": list(verdict.frames),
        }
        model = self.model
        generated = generate_batch(model, self._collator, [sample], max_new_tokens=self.max_new_tokens,
                                   **self.generation_kwargs)
        world_latents = generated.world_latents
        answer = generated.answer(model, 0)
        answer_verdict = self.client.check_text(answer)
        if not answer_verdict.safe:
            return Result(request.id, refused=f"the generated answer was blocked by the safety checker and withheld: "
                                              f"{answer_verdict.reason}")
        result = Result(request.id, answer=answer)
        if save_video is not None:
            result = self._save_rollout_video(result, world_latents, Path(save_video))
        return result

    def _save_rollout_video(self, result: Result, world_latents, path: Path) -> Result:
        from theworld.modeling.rollout import decode_world_latents

        if world_latents is None or world_latents.shape[2] < 2:
            raise ValueError("--save-video needs a world rollout: pass --rollout N (N >= 1)")
        frames = decode_world_latents(self.model.world_encoder, world_latents)[0]
        verdict = self.client.check_video(frames)
        if not verdict.safe:
            result.refused = f"the rollout video was blocked by the safety checker and not written: {verdict.reason}"
            return result
        write_video(path, verdict.frames, fps=self.fps)  # the sanitised (face-pixelated) frames only
        result.video = str(path)
        return result


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
    model.add_argument("--model", help="a directory written by TheWorld.save_pretrained (e.g. a training run's "
                       "checkpoint), or a base Gemma 3 id/dir with --cosmos (default: the tiny models, built offline "
                       "in $THEWORLD_TINY_DIR or ~/.cache/theworld/tiny on first use)")
    model.add_argument("--cosmos", help="Cosmos-Predict2 Video2World id or dir (for a base Gemma 3 --model; a saved "
                       "TheWorld remembers its own)")
    model.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    model.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                       help=f"answer length limit (default: {DEFAULT_MAX_NEW_TOKENS})")
    world = parser.add_argument_group("world rollout")
    world.add_argument("--rollout", type=int, metavar="N", help="predict N future latent frames (4 video frames "
                       "each) with the Cosmos transformer and add them as world tokens (default: the checkpoint's "
                       "num_world_steps; 0 for base models)")
    world.add_argument("--rollout-steps", type=int, default=35, help="denoising steps per rollout (default: 35)")
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
    if args.rollout_steps < 1:
        parser.error("--rollout-steps must be >= 1")


@contextlib.contextmanager
def safety_endpoint(endpoint: str | None, preset: str = "tiny", device: str = "cpu"):
    """`endpoint` when given (a running, shared worker); else a spawned, supervised worker's endpoint,
    stopped on exit."""
    if endpoint is not None:
        yield endpoint
        return
    from safety_worker import spawn_worker

    with spawn_worker(preset=preset, device=device) as worker:
        yield worker.endpoint


@contextlib.contextmanager
def _safety_client(args: argparse.Namespace):
    from safety_worker import SafetyClient

    with safety_endpoint(args.safety_endpoint, args.safety_preset) as endpoint, SafetyClient(endpoint) as client:
        yield client


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _validate(parser, args)
    try:
        requests = load_requests(args)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE

    from theworld.modeling.rollout import RolloutConfig

    rollout_config = RolloutConfig(num_inference_steps=args.rollout_steps, seed=args.seed, fps=args.fps)
    refused = False
    with _safety_client(args) as client:
        generator = SafeGenerator(lambda: load_model(args.model, args.cosmos, args.rollout, args.device), client,
                                  max_new_tokens=args.max_new_tokens, rollout_config=rollout_config, fps=args.fps)
        for request in requests:
            video = args.save_video
            if video is not None and args.jsonl is not None:
                video = Path(video) / f"{request.id}.mp4"
            try:
                result = generator(request, save_video=video)
            except ValueError as e:  # a model that cannot do what was asked (e.g. --rollout vs checkpoint)
                print(f"error: {e}", file=sys.stderr)
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
