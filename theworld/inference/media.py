"""Media in and out of inference: image and video files as uint8 frames, rollout frames as a video."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

DEFAULT_VIDEO_FPS = 16  # == theworld.modeling.rollout.DEFAULT_FPS (not imported here: keeps --help light)
VIDEO_SUFFIXES = (".mp4", ".webm", ".avi", ".mov", ".mkv", ".gif")


def read_frames(path: str | Path, video: bool | None = None) -> np.ndarray:
    """An image as `[1, H, W, 3]` or a video as `[T, H, W, 3]`, uint8 RGB. `video` None: by the suffix.

    A video must be a clip of `1 + 4k` frames (ValueError naming the file and the valid counts)."""
    import imageio.v3 as iio

    from theworld.data.sources import as_rgb_array

    path = Path(path)
    if video is None:
        video = path.suffix.lower() in VIDEO_SUFFIXES
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


def encode_mp4(frames: np.ndarray, fps: int = DEFAULT_VIDEO_FPS) -> bytes:
    """uint8 `[F, H, W, 3]` -> mp4 bytes (`write_video` through a temporary file: ffmpeg needs a seekable file)."""
    with tempfile.TemporaryDirectory(prefix="theworld-video-") as tmp:
        path = Path(tmp) / "rollout.mp4"
        write_video(path, frames, fps=fps)
        return path.read_bytes()
