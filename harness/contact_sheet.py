"""A contact sheet of a quality case: frames of the fp32, eager and candidate videos, and heat maps of how far eager's
and the candidate's frames are from fp32's, so a reader can look before reading numbers."""
from __future__ import annotations

import io

import numpy as np
import torch

# The frames shown: first, middle and last. Each tile at most this wide (the sheet stays a few hundred KB).
TILE_WIDTH = 200


def _picked(frames: int) -> list[int]:
    return sorted({0, frames // 2, frames - 1})


def _tile(frame: np.ndarray) -> np.ndarray:
    """A frame shrunk by whole-pixel striding to at most TILE_WIDTH wide (no resampling library needed)."""
    step = max(1, -(-frame.shape[1] // TILE_WIDTH))
    return frame[::step, ::step]


def contact_sheet(videos: dict[str, torch.Tensor], reference: str, title: str) -> bytes:
    """PNG bytes: a row per video of `videos` ([F, H, W, 3] in [0, 1], by label), then, for each video but
    `reference`, a row of |video - reference| per pixel (mean over RGB) on one colour scale for all of them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = {label: np.nan_to_num(v.detach().cpu().float().numpy()) for label, v in videos.items()}
    picked = _picked(len(frames[reference]))
    diffs = {label: np.abs(f - frames[reference]).mean(axis=-1) for label, f in frames.items() if label != reference}
    top = max([float(d[picked].max()) for d in diffs.values()] + [1 / 255])
    rows = [(label, f, None) for label, f in frames.items()] + [(f"|{label} - {reference}|", None, d)
                                                              for label, d in diffs.items()]
    height, width = _tile(frames[reference][0]).shape[:2]
    fig, axes = plt.subplots(len(rows), len(picked), squeeze=False,
                             figsize=(1.0 + 2.0 * len(picked), 0.5 + len(rows) * 2.0 * height / width + 0.3))
    for r, (label, video, diff) in enumerate(rows):
        for c, index in enumerate(picked):
            ax = axes[r][c]
            if video is not None:
                ax.imshow(_tile(video[index]).clip(0, 1))
            else:
                image = ax.imshow(_tile(diff[index]), cmap="magma", vmin=0, vmax=top)
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=7)
            if r == 0:
                ax.set_title(f"frame {index}", fontsize=8)
    if diffs:
        fig.colorbar(image, ax=axes[len(frames):, :].ravel().tolist(), shrink=0.8, label="abs. difference (0-1)")
    fig.suptitle(title, fontsize=8)
    return _png(fig)


def _png(fig) -> bytes:
    """The figure as a 256-colour PNG: a third of full colour's bytes on noisy frames (500 -> 160 KB measured on the
    tiny model's), small enough to commit beside results, and plenty for looking at."""
    import matplotlib.pyplot as plt
    from PIL import Image

    full = io.BytesIO()
    fig.savefig(full, format="png", dpi=80)
    plt.close(fig)
    image = Image.open(full).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT,
                                                      dither=Image.Dither.NONE)
    small = io.BytesIO()
    image.save(small, format="PNG", optimize=True)
    return small.getvalue()
