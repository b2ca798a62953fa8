"""`python -m theworld.generate`: safe inference with the real tiny models and a real tiny safety worker."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image

from safety_worker.tiny import BLOCKED_PHRASE, SAFE_EXAMPLE
from theworld import TheWorld
from theworld.data.collator import TheWorldCollator
from theworld.generate import main
from theworld.inference.media import read_frames
from theworld.inference.messages import Request
from theworld.inference.offline import Generator
from theworld.modeling.rollout import decode_world_latents

REPO_ROOT = Path(__file__).resolve().parent.parent
FAST_ROLLOUT_STEPS = 2


@pytest.fixture(scope="module")
def rollout_model(tiny_models):
    gemma_dir, cosmos_dir = tiny_models
    return TheWorld.from_pretrained(gemma_dir, cosmos_model=cosmos_dir, num_world_steps=1).eval()


@pytest.fixture(scope="module")
def frames():
    return np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)


@pytest.fixture()
def image_file(tmp_path, frames):
    path = tmp_path / "scene.png"
    Image.fromarray(frames[0]).save(path)
    return path


def _model_args(tiny_models) -> list[str]:
    gemma_dir, cosmos_dir = tiny_models
    return ["--model", str(gemma_dir), "--cosmos", str(cosmos_dir)]


def test_blocked_prompt_is_refused_with_exit_code_1_and_nothing_generated(tiny_models, tiny_safety_worker,
                                                                          image_file, tmp_path):
    video = tmp_path / "never.mp4"
    done = subprocess.run(
        [sys.executable, "-m", "theworld.generate", "--image", str(image_file), "--prompt",
         f"Where is it? {BLOCKED_PHRASE}", "--rollout", "1", "--save-video", str(video),
         "--safety-endpoint", tiny_safety_worker.endpoint, *_model_args(tiny_models)],
        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert "refused: the request was blocked by the safety checker (text)" in done.stderr
    assert done.stdout == ""
    assert not video.exists()


def test_refused_request_never_loads_the_model(tiny_safety_worker, frames):
    def must_not_load():
        raise AssertionError("the model was loaded for a refused request")

    with Generator(must_not_load, tiny_safety_worker.endpoint) as generator:
        result = generator(Request.question(BLOCKED_PHRASE, frames, id="r"))
    assert result.answer is None and "blocked" in result.refused


def test_safe_request_is_answered_and_the_answer_is_checked(rollout_model, tiny_safety_worker, frames):
    from safety_worker import SafetyClient

    with SafetyClient(tiny_safety_worker.endpoint) as client, \
            Generator(rollout_model, tiny_safety_worker.endpoint, rollout_steps=FAST_ROLLOUT_STEPS,
                      prefix_allowed_tokens_fn=_force_text(rollout_model.processor.tokenizer, "A red square.")) as generator:
        before = client.stats()["requests"]
        result = generator(Request.question(SAFE_EXAMPLE, frames, id="ok", max_tokens=16))
        after = client.stats()["requests"]
    assert result.refused is None and result.answer == "A red square."  # the model's answer, passed on whole
    # One combined check of the prompt and frames, then one check of the answer text.
    for op in ("check_sample", "check_text"):
        assert after.get(op, 0) - before.get(op, 0) == 1, (op, before, after)


def _force_text(tokenizer, text: str):
    """A `prefix_allowed_tokens_fn` that makes greedy decoding spell `text`, then end the turn."""
    forced = tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.convert_tokens_to_ids("<end_of_turn>")]
    start = {}

    def allowed(batch_id, input_ids):
        position = len(input_ids) - start.setdefault(batch_id, len(input_ids))
        return [forced[min(position, len(forced) - 1)]]

    return allowed


def test_blocked_answer_is_withheld(rollout_model, tiny_safety_worker, frames):
    tokenizer = rollout_model.processor.tokenizer
    with Generator(rollout_model, tiny_safety_worker.endpoint, rollout_steps=FAST_ROLLOUT_STEPS,
                   prefix_allowed_tokens_fn=_force_text(tokenizer, f"I will {BLOCKED_PHRASE}")) as generator:
        result = generator(Request.question(SAFE_EXAMPLE, frames, id="bad-answer", max_tokens=64))
    assert result.answer is None
    assert "generated answer was blocked" in result.refused


def test_rollout_video_is_the_sanitised_decoded_rollout(rollout_model, tiny_safety_worker_faces, frames, tmp_path):
    """With a worker that finds faces everywhere, the written video is the pixelated rollout, not the raw one."""
    from safety_worker import SafetyClient

    video = tmp_path / "rollout.mp4"
    with SafetyClient(tiny_safety_worker_faces.endpoint) as client, \
            Generator(rollout_model, tiny_safety_worker_faces.endpoint, rollout_steps=FAST_ROLLOUT_STEPS) as generator:
        result = generator(Request.question(SAFE_EXAMPLE, frames, id="vid", max_tokens=2), save_video=video)
        assert result.refused is None and result.video == str(video)
        # The same latents the answer saw, decoded and sanitised by the same worker.
        batch = TheWorldCollator(rollout_model, for_generation=True)([{"id": "vid", "messages": [{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": SAFE_EXAMPLE}]}], "images": [client.check_video(frames).frames[-1]]}])
        with torch.no_grad():
            raw = decode_world_latents(rollout_model.world_encoder, rollout_model.encode_world(batch["world_pixel_values"]))[0]
        sanitised = client.check_video(raw).frames
    written = iio.imread(video, plugin="FFMPEG").astype(np.int16)
    assert written.shape == (1 + 4 * 1, 32, 32, 3)  # the observed frame + 4 predicted video frames
    to_sanitised = np.abs(written - sanitised).mean()
    to_raw = np.abs(written - raw.astype(np.int16)).mean()
    assert to_sanitised < to_raw, (to_sanitised, to_raw)


def test_jsonl_batch_answers_safe_lines_and_refuses_blocked_ones(tiny_models, tiny_safety_worker, image_file,
                                                                 tmp_path, capsys):
    lines = [{"id": "a", "image": image_file.name, "prompt": SAFE_EXAMPLE},
             {"id": "b", "image": image_file.name, "prompt": BLOCKED_PHRASE}]
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps(line) + "\n" for line in lines))
    code = main(["--jsonl", str(requests), "--max-new-tokens", "2", "--safety-endpoint", tiny_safety_worker.endpoint,
                 *_model_args(tiny_models)])
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 1
    assert [r["id"] for r in results] == ["a", "b"]
    assert "answer" in results[0] and "refused" not in results[0]
    assert "refused" in results[1] and "answer" not in results[1]


def test_video_input_is_read_whole_and_answered(tiny_models, tiny_safety_worker, tmp_path, capsys):
    clip = tmp_path / "clip.mp4"
    iio.imwrite(clip, np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8), fps=16,
                plugin="FFMPEG", macro_block_size=1)
    assert read_frames(clip, video=True).shape == (5, 32, 32, 3)  # every frame goes to the safety check
    code = main(["--video", str(clip), "--prompt", SAFE_EXAMPLE, "--max-new-tokens", "2",
                 "--safety-endpoint", tiny_safety_worker.endpoint, *_model_args(tiny_models)])
    assert code == 0
    assert capsys.readouterr().out.strip() != ""


def test_rollout_must_match_a_checkpoint(tiny_models, tiny_safety_worker, image_file, tmp_path, capsys):
    gemma_dir, cosmos_dir = tiny_models
    checkpoint = tmp_path / "ckpt"
    TheWorld.from_pretrained(gemma_dir, cosmos_model=cosmos_dir).save_pretrained(checkpoint)
    code = main(["--image", str(image_file), "--prompt", SAFE_EXAMPLE, "--model", str(checkpoint), "--rollout", "2",
                 "--safety-endpoint", tiny_safety_worker.endpoint])
    assert code == 2
    assert "trained with num_world_steps=0" in capsys.readouterr().err


def test_help_describes_the_safety_contract():
    done = subprocess.run([sys.executable, "-m", "theworld.generate", "--help"], capture_output=True, text=True,
                          timeout=120, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert done.returncode == 0
    assert "--safety-endpoint" in done.stdout and "--save-video" in done.stdout


def test_a_video_must_be_a_clip_of_1_plus_4k_frames(tmp_path):
    def distinct_frames(count):  # a GIF writer may merge identical frames
        return (np.zeros((count, 32, 32, 3)) + 20 * np.arange(count)[:, None, None, None]).astype(np.uint8)

    iio.imwrite(tmp_path / "six.gif", distinct_frames(6), duration=50, loop=0)
    with pytest.raises(ValueError, match=r"six.gif: a world clip must have 1 \+ 4k frames .* use 5 or 9 frames"):
        read_frames(tmp_path / "six.gif", video=True)
    iio.imwrite(tmp_path / "nine.gif", distinct_frames(9), duration=50, loop=0)
    assert read_frames(tmp_path / "nine.gif", video=True).shape == (9, 32, 32, 3)
