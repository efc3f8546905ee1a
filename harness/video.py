"""Frames to a playable H.264 mp4 and back (imageio-ffmpeg carries its own ffmpeg binary)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from harness.errors import HarnessError

# Wan2.2-T2V-A14B renders at 16 frames per second.
FPS = 16


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """[F, H, W, 3] floats in [0, 1] -> uint8 array."""
    return (frames.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def check_video_path(path: str | os.PathLike) -> Path:
    """The path a video may be written to, or HarnessError (checked before a run spends time generating)."""
    path = Path(path)
    if path.is_dir():
        raise HarnessError(f"--out {path} is a folder; give a file name, e.g. --out {path / 'video.mp4'}")
    if any(parent.exists() and not parent.is_dir() for parent in path.parents):
        raise HarnessError(f"--out {path}: a file stands where its folder should be; choose another path")
    if path.suffix.lower() != ".mp4":
        raise HarnessError(f"--out {path}: the video is written as H.264 in an mp4 container; name it *.mp4")
    return path


def write_mp4(frames: torch.Tensor, path: str | os.PathLike, fps: int = FPS) -> Path:
    """Write atomically (temp file, then rename) so a crash never leaves half a video behind."""
    import imageio.v2 as imageio

    path = check_video_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial.mp4")
    try:
        # macro_block_size=1 keeps small sizes (e.g. 16x16) exact instead of padding them to 16-multiples.
        with imageio.get_writer(tmp, fps=fps, codec="libx264", quality=8, macro_block_size=1,
                                pixelformat="yuv420p", ffmpeg_log_level="error") as writer:
            for frame in to_uint8(frames):
                writer.append_data(frame)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_mp4(path: str | os.PathLike) -> np.ndarray:
    """[F, H, W, 3] uint8, for checking what was written.

    Reads through imageio_ffmpeg directly: imageio's ffmpeg reader reports nframes=inf for H.264
    streams and its iterator then never ends.
    """
    import imageio_ffmpeg

    frames = imageio_ffmpeg.read_frames(str(path))
    width, height = next(frames)["size"]
    return np.stack([np.frombuffer(f, np.uint8).reshape(height, width, 3) for f in frames])
