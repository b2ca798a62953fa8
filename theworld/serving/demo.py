"""The web demo at `/`: upload an image or a clip, ask, see the checked answer, the sanitised frame the
model saw and the rollout video. It calls the same `ChatService` as the API (same guard, same batching);
a refusal is shown as a refusal. Gradio serves its own fonts and scripts: the page needs no internet."""
from __future__ import annotations

import os
import tempfile

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home, before gradio is imported

import gradio as gr  # noqa: E402

from theworld.serving.schema import ApiError, ChatRequest  # noqa: E402

DEMO_TEMPERATURE = 0.0  # greedy: the same question about the same image gets the same answer


def build_demo(server) -> gr.Blocks:
    """A `gr.Blocks` for `server` (a `theworld.serving.app.ServeApp`)."""

    # Rollout videos are handed to Gradio as files; they live in one directory removed with the process.
    videos = tempfile.TemporaryDirectory(prefix="theworld-demo-")

    async def ask(image, clip, prompt, rollout):
        try:
            frames = _frames(image, clip)
            request = server.validate(ChatRequest(
                messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt or ""}]}],
                frames=frames, max_tokens=server.limits.default_max_tokens, temperature=DEMO_TEMPERATURE,
                rollout=int(rollout or 0)))
            completion = await server.service.complete(request)
        except ApiError as e:
            server.service.metrics.errors.labels(e.code).inc()
            if e.code == "content_blocked":
                return "", f"**Refused by the safety checker** ({e.extra['stage']}): {e.message}", None, None
            return "", f"**Not answered** (`{e.code}`): {e.message}", None, None
        status = f"Answered in a batch of {completion.batch_size}; the answer passed the safety checker."
        if completion.finish_reason == "content_filter":
            status = "**Refused by the safety checker** (answer): the generated answer was blocked and withheld."
        video = None
        if completion.rollout_video is not None:
            with tempfile.NamedTemporaryFile(suffix=".mp4", delete=False, prefix="rollout-", dir=videos.name) as out:
                out.write(completion.rollout_video)
            video = out.name
        elif completion.rollout_blocked:
            status += f" Rollout withheld: {completion.rollout_blocked}."
        return completion.content, status, completion.frames_seen[-1], video

    with gr.Blocks(title="TheWorld", analytics_enabled=False) as demo:
        gr.Markdown(f"## TheWorld: `{server.model_name}`\nAsk about an image or a clip. The safety worker checks "
                    "the question and every frame before the model runs, and the answer and the rollout before "
                    "they are shown; the model sees the worker's sanitised (face-pixelated) frames.")
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="Image", type="numpy", image_mode="RGB", sources=["upload"], elem_id="image-input")
                clip = gr.File(label="…or a clip (mp4 or gif of 1, 5, 9, … frames; the last is now)",
                               file_types=[".mp4", ".gif", ".webm"], elem_id="clip-input")
                prompt = gr.Textbox(label="Question", placeholder="What is here?", elem_id="prompt")
                rollout = gr.Slider(0, server.limits.max_rollout, value=0, step=1, elem_id="rollout-steps",
                                    label="Rollout: latent frames the world model predicts (4 video frames each)")
                button = gr.Button("Ask", variant="primary", elem_id="ask")
            with gr.Column():
                answer = gr.Textbox(label="Answer", interactive=False, elem_id="answer")
                status = gr.Markdown(elem_id="status")
                seen = gr.Image(label="What the model saw (the worker's sanitised last frame)", interactive=False,
                                elem_id="seen")
                video = gr.Video(label="Rollout (checked by the safety worker)", interactive=False, elem_id="rollout")
        button.click(ask, [image, clip, prompt, rollout], [answer, status, seen, video])
        prompt.submit(ask, [image, clip, prompt, rollout], [answer, status, seen, video])
    return demo


def _frames(image, clip):
    import numpy as np

    if clip is not None:
        from theworld.generate import read_frames

        try:
            return read_frames(clip, video=True)
        except (OSError, ValueError) as e:
            raise ApiError("invalid_clip", str(e)) from None
    if image is None:
        raise ApiError("image_required", "upload an image or a clip first")
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8)[None, ..., :3])
