"""Inference with TheWorld: one pipeline under both front ends.

- `loading.py`: the one loader (`load_model`) and the one "is this a saved TheWorld" rule,
- `media.py`: image and video files in (`read_frames`), rollout videos out (`write_video`, `encode_mp4`),
- `engine.py`: `generate_batch` and `BatchingEngine`, the model thread that batches what arrives together,
- `guard.py`: the safety worker's checks, bounded by each request's deadline (`Guard`, `safety_endpoint`),
- `messages.py`: what crosses the pipeline's edges: `Request`, `Completion`, `InferenceError`,
- `pipeline.py`: `GuardedPipeline`: check the input, generate, check the answer, check the rollout,
- `offline.py`: `Generator`, the offline front end (`python -m theworld.generate`); the server's front end
  is `theworld.serving` (`python -m theworld.serve`).

Submodules are imported on use: `theworld.inference` itself stays light (command-line `--help` imports it).
"""
from theworld.inference.media import DEFAULT_VIDEO_FPS

DEFAULT_MAX_NEW_TOKENS = 32  # answer length when a request does not say

__all__ = ["DEFAULT_MAX_NEW_TOKENS", "DEFAULT_VIDEO_FPS"]
