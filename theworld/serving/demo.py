"""The web demo at `/`: pick a held-out motion clip (or upload an image or a clip, or ask text alone), ask,
see the checked answer, the worker's sanitised frames the model saw and the rollout video. It calls the
same guarded pipeline as the API (same guard, same batching); a refusal is shown as a refusal. Gradio
serves its own fonts and scripts: the page needs no internet."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home, before gradio is imported

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402

from theworld.inference.messages import InferenceError  # noqa: E402
from theworld.serving.schema import ChatRequest  # noqa: E402

DEMO_TEMPERATURE = 0.0  # greedy: the same question about the same clip gets the same answer
# The examples come from the held-out split of the motion task at the training seed plus this offset: clips
# drawn from a random stream no training run of that seed has read.
EXAMPLE_SEED_OFFSET = 1000
PREVIEW_SCALE = 8  # the task's 32x32 frames, shown 256x256 (nearest neighbour: pixels stay pixels)


def motion_examples(directory: str | Path, model_dir: str | None = None, colour_questions: int = 2,
                    ) -> list[tuple[str, str, str]]:
    """`(clip.gif, question, reference answer)` of held-out motion clips, written to `directory`: the first
    direction question of each direction, then `colour_questions` colour questions.

    The task (frames, image size, seed) is the one `model_dir/theworld_task.json` records, when the model
    was trained on the motion task; else the default motion task. GIF keeps the frames exactly."""
    import imageio.v3 as iio

    from theworld.data.synthetic import DIRECTIONS, SyntheticMotionTask

    record = {}
    task_file = Path(model_dir) / "theworld_task.json" if model_dir else None
    if task_file is not None and task_file.is_file():
        record = json.loads(task_file.read_text())
    if record.get("data", "synthetic") != "synthetic":
        record = {}
    task = SyntheticMotionTask(split="heldout", size=64, seed=record.get("seed", 0) + EXAMPLE_SEED_OFFSET,
                               num_frames=record.get("num_frames", 9), image_size=record.get("image_size", 32))
    wanted = {direction: 1 for direction in DIRECTIONS}
    picked, colours = [], 0
    for sample in task:
        if sample["question_type"] == "direction" and wanted.pop(sample["answer"], 0):
            picked.append(sample)
        elif sample["question_type"] == "colour" and colours < colour_questions:
            picked.append(sample)
            colours += 1
    examples = []
    for index, sample in enumerate(picked):
        path = Path(directory) / f"heldout-clip-{index + 1}.gif"
        iio.imwrite(path, np.stack(sample["images"]), duration=120, loop=0)
        question = next(part["text"] for part in sample["messages"][0]["content"] if part["type"] == "text")
        examples.append((str(path), question, sample["answer"]))
    return examples


def frame_strip(frames: np.ndarray, scale: int = PREVIEW_SCALE) -> np.ndarray:
    """Frames side by side, oldest first, enlarged `scale` times (a 1 px gap between them)."""
    big = np.kron(frames, np.ones((1, scale, scale, 1), np.uint8))
    gap = np.full((big.shape[1], scale, 3), 255, np.uint8)
    return np.concatenate([part for frame in big for part in (frame, gap)][:-1], axis=1)


def build_demo(server) -> gr.Blocks:
    """A `gr.Blocks` for `server` (a `theworld.serving.app.ServeApp`)."""

    # Rollout videos and clip previews are handed to Gradio as files; they live in one directory removed
    # with the process.
    files = tempfile.TemporaryDirectory(prefix="theworld-demo-")

    async def ask(image, clip, prompt, rollout):
        try:
            frames = _frames(image, clip)
            request = server.validate(ChatRequest.question(
                prompt or "", frames, max_tokens=server.limits.default_max_tokens, temperature=DEMO_TEMPERATURE,
                rollout=int(rollout or 0)))
            completion = await server.complete(request)
        except InferenceError as e:
            server.metrics.errors.labels(e.code).inc()
            if e.code == "content_blocked":
                return "", f"**Refused by the safety checker** ({e.extra['stage']}): {e.message}", None, None
            return "", f"**Not answered** (`{e.code}`): {e.message}", None, None
        # The completion's id makes every answer's status distinct (and findable in the server's logs).
        status = (f"Answered (`{completion.id}`) in a batch of {completion.batch_size}; the answer passed the "
                  "safety checker.")
        if completion.finish_reason == "content_filter":
            status = "**Refused by the safety checker** (answer): the generated answer was blocked and withheld."
        video = None
        if completion.rollout_frames is not None:
            from theworld.inference.media import write_video

            with tempfile.NamedTemporaryFile(suffix=".mp4", delete=False, prefix="rollout-", dir=files.name) as out:
                pass
            write_video(out.name, completion.rollout_frames, fps=server.fps)
            video = out.name
        elif completion.rollout_blocked:
            status += f" Rollout withheld: {completion.rollout_blocked}."
        seen = None if completion.frames_seen is None else frame_strip(completion.frames_seen)
        return completion.content, status, seen, video

    def preview(clip):
        """The chosen clip, enlarged and animated, so that the motion can be seen."""
        if clip is None:
            return None
        import imageio.v3 as iio

        from theworld.inference.media import read_frames

        try:
            frames = read_frames(clip, video=True)
        except (OSError, ValueError):
            return None
        with tempfile.NamedTemporaryFile(suffix=".gif", delete=False, prefix="clip-", dir=files.name) as out:
            pass
        iio.imwrite(out.name, np.kron(frames, np.ones((1, PREVIEW_SCALE, PREVIEW_SCALE, 1), np.uint8)),
                    duration=120, loop=0)
        return out.name

    with gr.Blocks(title="TheWorld", analytics_enabled=False) as demo:
        gr.Markdown(f"## TheWorld: `{server.model_name}`\nPick a held-out motion clip below (a square moving up, "
                    "down, left or right; no single frame tells which way) or upload your own, and ask. The safety "
                    "worker checks the question and every frame before the model runs, and the answer and the "
                    "rollout before they are shown; the model sees the worker's sanitised (face-pixelated) frames. "
                    "With no image or clip, Gemma 3 answers the text alone.")
        with gr.Row():
            with gr.Column():
                clip = gr.File(label="Clip (mp4 or gif of 1, 5, 9, … frames, oldest first; the last is now)",
                               file_types=[".mp4", ".gif", ".webm"], elem_id="clip-input")
                clip_preview = gr.Image(label="The clip", type="filepath", interactive=False, elem_id="clip-preview",
                                        height=180)
                image = gr.Image(label="…or an image", type="numpy", image_mode="RGB", sources=["upload"],
                                 elem_id="image-input", height=160)
                prompt = gr.Textbox(label="Question", placeholder="Which way is the square moving?", elem_id="prompt")
                rollout = gr.Slider(0, server.limits.max_rollout, value=0, step=1, elem_id="rollout-steps",
                                    label="Rollout: latent frames the world model predicts (4 video frames each)")
                button = gr.Button("Ask", variant="primary", elem_id="ask")
            with gr.Column():
                answer = gr.Textbox(label="Answer", interactive=False, elem_id="answer")
                status = gr.Markdown(elem_id="status")
                seen = gr.Image(label="What the model saw: the worker's sanitised frames, oldest first",
                                interactive=False, elem_id="seen")
                video = gr.Video(label="Rollout (checked by the safety worker)", interactive=False, elem_id="rollout",
                                 height=200)
        if server.demo_examples:
            gr.Examples(examples=[[path, question] for path, question, _ in server.demo_examples],
                        inputs=[clip, prompt], elem_id="examples",
                        example_labels=[f"held-out clip {i + 1}: {question} (truth: {truth})"
                                        for i, (_, question, truth) in enumerate(server.demo_examples)],
                        label="Held-out motion clips (drawn with a seed this model's training and evaluation never used)")
        clip.change(preview, clip, clip_preview)
        button.click(ask, [image, clip, prompt, rollout], [answer, status, seen, video])
        prompt.submit(ask, [image, clip, prompt, rollout], [answer, status, seen, video])
    return demo


def _frames(image, clip):
    """The clip (preferred) or the image as uint8 `[T, H, W, 3]`; None for a text-only question."""
    if clip is not None:
        from theworld.inference.media import read_frames

        try:
            return read_frames(clip, video=True)
        except (OSError, ValueError) as e:
            raise InferenceError("invalid_clip", str(e)) from None
    if image is None:
        return None
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8)[None, ..., :3])
