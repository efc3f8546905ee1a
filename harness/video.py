"""Every ffmpeg call of the harness: frames to a playable H.264 mp4 and back, and VMAF between two videos.

imageio-ffmpeg carries its own ffmpeg binary, built with libvmaf and its built-in models, so all of this runs offline.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from harness.errors import HarnessError
from harness.paths import writable_folder

# Wan2.2-T2V-A14B renders at 16 frames per second.
FPS = 16


def to_uint8(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    """[F, H, W, 3] floats in [0, 1] -> uint8 array."""
    return (torch.as_tensor(frames).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def check_video_path(path: str | os.PathLike) -> Path:
    """The path a video may be written to, or HarnessError (checked before a run spends time generating): an mp4
    name, not a folder, in a folder that can be made and written into (harness.paths)."""
    path = Path(path)
    if path.is_dir():
        raise HarnessError(f"--out {path} is a folder; give a file name, e.g. --out {path / 'video.mp4'}")
    if path.suffix.lower() != ".mp4":
        raise HarnessError(f"--out {path}: the video is written as H.264 in an mp4 container; name it *.mp4")
    writable_folder(path.parent, f"--out {path}")
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


# --------------------------------------------------------------------------------------------- VMAF

@dataclass(frozen=True)
class Vmaf:
    """Per-frame VMAF scores of one video against another, with what computed them."""

    scores: tuple[float, ...]
    model: str    # the VMAF model, e.g. vmaf_v0.6.1
    libvmaf: str  # libvmaf's own version, from its log

    def __str__(self) -> str:
        return f"libvmaf {self.libvmaf}, model {self.model}"


@lru_cache(maxsize=None)
def _libvmaf_missing(exe: str) -> str:
    try:
        listed = subprocess.run([exe, "-hide_banner", "-filters"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run ffmpeg {exe}: {exc}"
    if re.search(r"^\s*\S+\s+libvmaf\s", listed, re.MULTILINE):
        return ""
    return (f"ffmpeg {exe} was built without libvmaf (`ffmpeg -filters` does not list it); unset IMAGEIO_FFMPEG_EXE "
            "to use the one imageio-ffmpeg carries")


def vmaf_unavailable() -> str:
    """Why the ffmpeg in use cannot compute VMAF ('' when it can)."""
    try:
        import imageio_ffmpeg

        exe = imageio_ffmpeg.get_ffmpeg_exe()
    except ImportError as exc:
        return f"imageio-ffmpeg is not importable ({exc}); install it from requirements.txt"
    except RuntimeError as exc:
        return str(exc)
    return _libvmaf_missing(exe)


def vmaf(candidate, reference, model: str) -> Vmaf:
    """VMAF of each frame of `candidate` against `reference` (both [F, H, W, 3] in [0, 1]), from ffmpeg's libvmaf filter.

    Both videos reach ffmpeg as the 8-bit frames the mp4 writer would encode, losslessly (raw RGB files, never a
    lossy mp4); ffmpeg converts both alike to YUV 4:4:4 for libvmaf, which scores the luma plane. RuntimeError with
    ffmpeg's own words when it gives no score.
    """
    import imageio_ffmpeg

    frames = {"candidate.rgb": to_uint8(candidate), "reference.rgb": to_uint8(reference)}
    _, height, width, _ = frames["reference.rgb"].shape
    raw = ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(FPS)]
    # libvmaf's first input is the distorted video, the second the reference.
    graph = ("[0:v]format=yuv444p[candidate];[1:v]format=yuv444p[reference];[candidate][reference]"
             f"libvmaf=model=version={model}:log_fmt=json:log_path=vmaf.json:n_threads={torch.get_num_threads()}")
    try:
        with tempfile.TemporaryDirectory(prefix="vmaf-") as folder:
            for name, video in frames.items():
                Path(folder, name).write_bytes(video.tobytes())
            # Run inside the folder so the log path needs no escaping in the filter graph.
            done = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error",
                                   *raw, "-i", "candidate.rgb", *raw, "-i", "reference.rgb", "-lavfi", graph,
                                   "-f", "null", "-"], cwd=folder, capture_output=True, text=True)
            log = Path(folder, "vmaf.json")
            if done.returncode != 0 or not log.is_file():
                said = " ".join(done.stderr.split()[-40:]) or "nothing on stderr"
                raise RuntimeError(f"ffmpeg's libvmaf gave no score (exit code {done.returncode}): {said}")
            result = json.loads(log.read_text())
        scores = tuple(float(f["metrics"]["vmaf"]) for f in result["frames"])
    except (OSError, ValueError, KeyError, TypeError) as exc:  # no room for the frames, a log of another form
        raise RuntimeError(f"no VMAF score: {type(exc).__name__}: {exc}") from exc
    if len(scores) != len(frames["reference.rgb"]):
        raise RuntimeError(f"ffmpeg's libvmaf scored {len(scores)} of {len(frames['reference.rgb'])} frames")
    return Vmaf(scores, model, str(result.get("version", "?")))
