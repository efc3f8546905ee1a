"""Whole-video quality, judged like parity: a candidate's video against the fp32 eager video, within a band set by
eager PyTorch's own distance from that video at the candidate's precision.

A fixed floor (so many dB from fp32) judges the model as much as the candidate: a deep model that amplifies
rounding puts PyTorch's own bf16 video far from fp32, and a floor set on a shallow one then fails the baseline itself.
So every metric is turned into a distance from the reference video (RMSE of the [0, 1] pixels, 1 - SSIM,
100 - VMAF, LPIPS), and the candidate's distance must stay within what eager's allows: over the whole video, and on
every frame. Rows carry three distances, each in its own unit (dB, SSIM, VMAF points, LPIPS): the candidate's from
fp32 (gated), eager's own from fp32 (`eager_*`, where the band comes from) and the candidate's from eager (`*_eager`:
what the candidate changes in the video PyTorch gives, reported, never gated). Sanity floors no drift excuses catch a
broken video: non-finite, black, constant (each frame one flat colour) or frozen. Every number comes from
harness/thresholds.toml [quality] and [quality.<precision>].
"""
from __future__ import annotations

import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from harness.case import eager_precision
from harness.thresholds import band, thresholds
from harness.video import vmaf, vmaf_unavailable

KINDS = ("psnr", "ssim", "vmaf", "lpips")


@dataclass(frozen=True)
class VideoDistance:
    """Per-frame distances of one video from another; `vmaf` None where VMAF was skipped (`vmaf_note` says why,
    else what scored it), `lpips` None where LPIPS did not run."""

    rmse: tuple[float, ...]
    ssim: tuple[float, ...]
    vmaf: tuple[float, ...] | None
    lpips: tuple[float, ...] | None
    vmaf_note: str = ""

    def frames(self, kind: str) -> tuple[float, ...] | None:
        """Each frame's distance of `kind`: RMSE, 1 - SSIM, 100 - VMAF, LPIPS (None where it did not run)."""
        if kind == "psnr":
            return self.rmse
        if kind == "ssim":
            return tuple(1 - s for s in self.ssim)
        if kind == "vmaf":
            return None if self.vmaf is None else tuple(100 - v for v in self.vmaf)
        return self.lpips

    def whole(self, kind: str) -> float | None:
        """The video's distance of `kind`: RMSE over every pixel of every frame, the others' mean over frames."""
        per_frame = self.frames(kind)
        if per_frame is None:
            return None
        return math.sqrt(float(np.mean(np.square(per_frame)))) if kind == "psnr" else float(np.mean(per_frame))


def psnr(rmse: float) -> float:
    """PSNR in dB of frames in [0, 1], capped (identical frames have infinite PSNR); NaN stays NaN."""
    cap = thresholds()["quality"]["psnr_cap_db"]
    if math.isnan(rmse):
        return math.nan
    return cap if rmse <= 10 ** (-cap / 20) else min(cap, -20 * math.log10(rmse))


def in_unit(kind: str, distance: float | None) -> float | None:
    """A distance in the unit people read: PSNR in dB, SSIM, VMAF points, LPIPS."""
    if distance is None:
        return None
    return {"psnr": psnr, "ssim": lambda d: 1 - d, "vmaf": lambda d: 100 - d, "lpips": lambda d: d}[kind](distance)


@dataclass(frozen=True)
class Band:
    """How far from the fp32 video a candidate at `precision` may be, given eager-at-precision's distance d:
    k x d + atol for RMSE and LPIPS (torch/_dynamo/utils.py::same's rule), k^2 x d + atol for 1 - SSIM (which grows
    with the squared error), d + one just-noticeable difference for 100 - VMAF (a perceptual scale)."""

    precision: str
    k: float
    rmse_atol: float
    ssim_atol: float
    lpips_atol: float
    vmaf_jnd: float

    @classmethod
    def of(cls, precision: str) -> "Band":
        shared, own = thresholds()["quality"], band("quality", precision)
        return cls(precision, own["k"], shared["rmse_atol"], shared["ssim_atol"], shared["lpips_atol"],
                   shared["vmaf_jnd"])

    def allowed(self, kind: str, eager: float) -> float:
        if kind == "psnr":
            return self.k * eager + self.rmse_atol
        if kind == "ssim":
            return self.k ** 2 * eager + self.ssim_atol
        if kind == "vmaf":
            return eager + self.vmaf_jnd
        return self.k * eager + self.lpips_atol


@dataclass(frozen=True)
class Check:
    """One gated distance: the candidate's, the band it needed, eager's that set it, and where (a frame or all)."""

    kind: str
    candidate: float
    allowed: float
    eager: float
    frame: int | None  # None: over the whole video

    @property
    def passed(self) -> bool:
        return self.candidate <= self.allowed  # NaN never passes


def _whole_check(kind: str, candidate: VideoDistance, eager: VideoDistance, band_: Band) -> Check | None:
    c, e = candidate.whole(kind), eager.whole(kind)
    return None if c is None or e is None else Check(kind, c, band_.allowed(kind, e), e, None)


def _frame_check(kind: str, candidate: VideoDistance, eager: VideoDistance, band_: Band) -> Check | None:
    """The frame closest to its band (or furthest past it): every frame passes exactly when this one does."""
    c, e = candidate.frames(kind), eager.frames(kind)
    if c is None or e is None:
        return None
    allowed = [band_.allowed(kind, x) for x in e]
    margins = [a - x if not math.isnan(x) else -math.inf for x, a in zip(c, allowed)]
    f = int(np.argmin(margins))
    return Check(kind, c[f], allowed[f], e[f], f)


@dataclass(frozen=True)
class Floors:
    """What makes a video broken whatever eager does: non-finite pixels, every frame one flat colour (black: all
    of it dark), no frame moving from the first. Values are measured on the candidate's video."""

    nonfinite: int
    frame_std_min: float  # the flattest frame's pixel standard deviation
    pixel_max: float
    motion_max: float | None  # the largest RMSE of a frame from the first; None for a one-frame video
    limits: dict = field(default_factory=dict)  # flat_std and frozen_rmse: [quality] floor_* in thresholds.toml

    def broken(self) -> str:
        """'' for a video that passes every floor, else what it is, naming the threshold it fell under."""
        if self.nonfinite:
            return f"non-finite video ({self.nonfinite:,} NaN or Inf values)"
        if not self.frame_std_min >= self.limits["flat_std"]:
            if self.pixel_max < self.limits["flat_std"]:
                return f"black video (no pixel above {self.limits['flat_std']:.4g})"
            return (f"constant video (every frame one flat colour: pixel std {self.frame_std_min:.3g} < "
                    f"{self.limits['flat_std']:.4g} in its flattest frame)")
        if self.motion_max is not None and not self.motion_max >= self.limits["frozen_rmse"]:
            return (f"frozen video (no frame moves from the first by RMSE {self.limits['frozen_rmse']:.4g}; "
                    f"largest {self.motion_max:.3g})")
        return ""


def floors(frames: np.ndarray) -> Floors:
    finite = np.isfinite(frames)
    clean = np.where(finite, frames, 0.0)
    motion = None if len(frames) < 2 else float(max(_rmse(clean[0], f) for f in clean[1:]))
    return Floors(int((~finite).sum()), float(clean.reshape(len(frames), -1).std(axis=1).min()),
                  float(clean.max()), motion, {name.removeprefix("floor_"): value for name, value
                                               in thresholds()["quality"].items() if name.startswith("floor_")})


@dataclass(frozen=True)
class QualityResult:
    """A candidate's video judged against the fp32 video relative to eager-at-its-precision's (see the module).

    Truthy when every gated distance is within its band and no floor is broken; a skipped metric (VMAF on small
    frames) never fails a case.
    """

    band: Band
    candidate: VideoDistance  # candidate -> fp32
    eager: VideoDistance  # eager at the precision -> fp32
    to_eager: VideoDistance  # candidate -> eager at the precision
    floors: Floors
    origin: str = ""  # where the fp32 and eager videos came from (made, or read from the cache)

    def _checks(self) -> dict[str, Check | None]:
        out = {}
        for kind in KINDS:
            if kind == "lpips" and self.candidate.lpips is None:
                continue
            out[f"{kind}_fp32"] = _whole_check(kind, self.candidate, self.eager, self.band)
            out[f"{kind}_frame_fp32"] = _frame_check(kind, self.candidate, self.eager, self.band)
        return out

    def metrics(self) -> dict[str, float | None]:
        """Per kind: the candidate's distance from fp32 over the video and at its tightest frame (gated), eager's at
        both (the band's source), and the candidate's from eager (reported); then the floors' measurements."""
        out: dict[str, float | None] = {}
        for name, check in self._checks().items():
            kind = name.split("_")[0]
            out[name] = in_unit(kind, check.candidate) if check else None
            out[f"eager_{name}"] = in_unit(kind, check.eager) if check else None
            if "_frame_" not in name:
                out[f"{kind}_eager"] = in_unit(kind, self.to_eager.whole(kind))
        out.update(nonfinite=float(self.floors.nonfinite), frame_std_min=self.floors.frame_std_min,
                   motion_max=self.floors.motion_max)
        return out

    def thresholds(self) -> dict[str, float | None]:
        limits = self.floors.limits
        out = {name: in_unit(name.split("_")[0], check.allowed) if check else None
               for name, check in self._checks().items()}
        return {**out, "nonfinite": 0.0, "frame_std_min": limits["flat_std"],
                "motion_max": None if self.floors.motion_max is None else limits["frozen_rmse"]}

    def checks(self) -> dict[str, bool | None]:
        floors = self.floors
        out = {name: check.passed if check else None for name, check in self._checks().items()}
        return {**out, "nonfinite": floors.nonfinite == 0,
                "frame_std_min": bool(floors.frame_std_min >= floors.limits["flat_std"]),
                "motion_max": None if floors.motion_max is None else bool(floors.motion_max >= floors.limits["frozen_rmse"])}

    def notes(self) -> dict[str, str]:
        """The frame each per-frame row was taken at, what scored VMAF (or why it was skipped), where the videos
        came from."""
        out = {name: f"frame {check.frame} of {len(self.candidate.rmse)}, the closest to its band"
               for name, check in self._checks().items() if check and check.frame is not None}
        for name in ("vmaf_fp32", "vmaf_frame_fp32", "vmaf_eager"):
            out[name] = "; ".join(filter(None, (out.get(name), self.candidate.vmaf_note)))
        if self.origin:
            out["psnr_fp32"] = self.origin
        far = thresholds()["quality"]["far_psnr_db"]
        if self.eager_psnr < far:
            out["eager_psnr_fp32"] = (f"eager {eager_precision(self.band.precision)}'s own video is {self.eager_psnr:.1f} dB from the fp32 "
                                      f"video (under {far:g} dB): the model amplifies rounding, so the band is wide; "
                                      "--attribution shows which component moves it")
        return out

    @property
    def passed(self) -> bool:
        return all(ok is not False for ok in self.checks().values())

    def __bool__(self) -> bool:
        return self.passed

    @property
    def eager_psnr(self) -> float:
        """Eager-at-precision's video PSNR from fp32: low means the model amplifies rounding, so the band is wide."""
        return psnr(self.eager.whole("psnr"))

    def message(self) -> str:
        """One line: each gated distance against its band, failing ones marked, then what is broken, if anything."""
        parts = []
        for name, check in self._checks().items():
            if check is None:
                continue
            kind, where = name.split("_")[0], "video" if check.frame is None else f"frame {check.frame}"
            mark = "" if check.passed else " FAIL"
            parts.append(f"{kind} ({where}) {_show(kind, check.candidate)} vs band {_show(kind, check.allowed)} from "
                         f"eager's {_show(kind, check.eager)}{mark}")
        broken = self.floors.broken()
        verdict = "passed" if self.passed else "FAILED"
        return (f"quality {verdict} at {self.band.precision} over {len(self.candidate.rmse)} frames, distance from the "
                f"fp32 video within k={self.band.k:g} x eager {eager_precision(self.band.precision)}'s: {'; '.join(parts)}"
                + (f"; {broken}" if broken else "") + f"; vmaf: {self.candidate.vmaf_note}")


def _show(kind: str, distance: float) -> str:
    value = in_unit(kind, distance)
    return f"{value:.2f} dB" if kind == "psnr" else f"{value:.4g}"


def judge_video(candidate_frames, eager_frames, reference_frames, precision: str,
                lpips_model: torch.nn.Module | None = None, origin: str = "") -> QualityResult:
    """The candidate's video and eager-at-`precision`'s against the fp32 `reference_frames` (all of one prompt, seed
    and step count), judged by `precision`'s band; frames [F, H, W, 3] in [0, 1] (or uint8)."""
    cand, eager, ref = (_frames_float(f) for f in (candidate_frames, eager_frames, reference_frames))
    if not cand.shape == eager.shape == ref.shape:
        raise ValueError(f"videos differ in shape: candidate {cand.shape}, eager {eager.shape}, reference {ref.shape}")
    distance = _distances(lpips_model)
    # Three pairs at once: VMAF is an ffmpeg process and SSIM's filters release the GIL (81 frames of 480p take
    # ~10 s of SSIM and as much of VMAF per pair).
    with ThreadPoolExecutor(3) as pool:
        to_fp32, eager_to_fp32, to_eager = pool.map(lambda pair: distance(*pair), [(cand, ref), (eager, ref),
                                                                                   (cand, eager)])
    return QualityResult(Band.of(precision), to_fp32, eager_to_fp32, to_eager, floors(cand), origin)


@dataclass(frozen=True)
class DriftAttribution:
    """Where a reduced precision's drift of the video comes from: eager PyTorch's video with one part in it (the
    experts, the text encoder or the VAE decoder; `all` for every part), the rest in fp32, against the fp32 video.
    Reported, not gated."""

    parts: dict[str, VideoDistance]

    def metrics(self) -> dict[str, float | None]:
        return {f"drift_{part}_{kind}_fp32": in_unit(kind, distance.whole(kind))
                for part, distance in self.parts.items() for kind in ("psnr", "ssim", "vmaf")}

    def thresholds(self) -> dict[str, float | None]:
        return {}

    def checks(self) -> dict[str, bool | None]:
        return {}


def attribute_drift(videos: dict, reference_frames) -> DriftAttribution:
    """Each part's video (by part name) against the fp32 video."""
    ref, distance = _frames_float(reference_frames), _distances(None)
    return DriftAttribution({part: distance(_frames_float(frames), ref) for part, frames in videos.items()})


def _distances(lpips_model) -> Callable[[np.ndarray, np.ndarray], VideoDistance]:
    def distance(video: np.ndarray, reference: np.ndarray) -> VideoDistance:
        finite = np.where(np.isfinite(video), video, np.nan)
        rmse = tuple(_rmse(r, c) for r, c in zip(reference, finite))
        ssim = tuple(_ssim(r, c) for r, c in zip(reference, finite))
        lpips = None if lpips_model is None else lpips_per_frame(lpips_model, np.nan_to_num(video), reference)
        scores, note = _vmaf(np.nan_to_num(video), reference)
        return VideoDistance(rmse, ssim, scores, lpips, note)

    return distance


def _frames_float(frames) -> np.ndarray:
    """[F, H, W, 3] as float64 in [0, 1], from uint8 or float frames, numpy or torch."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu()
        frames = frames.numpy() if frames.dtype == torch.uint8 else frames.float().numpy()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [F, H, W, 3], got shape {frames.shape}")
    return frames.astype(np.float64) / 255.0 if frames.dtype == np.uint8 else frames.astype(np.float64)


def _rmse(reference: np.ndarray, candidate: np.ndarray) -> float:
    return math.sqrt(float(np.mean(np.square(candidate - reference))))  # NaN in, NaN out


def _ssim(reference: np.ndarray, candidate: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    if not np.isfinite(candidate).all():
        return math.nan
    return float(structural_similarity(reference, candidate, data_range=1.0, channel_axis=-1))


@torch.inference_mode()
def lpips_per_frame(model: torch.nn.Module, candidate: np.ndarray, reference: np.ndarray) -> tuple[float, ...]:
    """LPIPS of each frame pair; frames shorter than the band's minimum side are upsampled to it."""
    def prepare(frames: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(frames).float().permute(0, 3, 1, 2) * 2 - 1  # LPIPS wants [-1, 1], NCHW
        min_side = thresholds()["quality"]["lpips_min_side"]
        if min(x.shape[-2:]) < min_side:
            scale = min_side / min(x.shape[-2:])
            x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
        return x.to(next(model.parameters()).device)

    return tuple(float(v) for v in model(prepare(candidate), prepare(reference)).flatten())


def vmaf_skip_reason(height: int, width: int) -> str:
    """Why VMAF is not computed for frames of this size on this machine ('' when it is)."""
    min_side = thresholds()["quality"]["vmaf_min_side"]
    if min(height, width) < min_side:
        return (f"frames {height}x{width} are below the {min_side} px short side VMAF needs to mean anything "
                "(harness/thresholds.toml [quality] vmaf_min_side)")
    return vmaf_unavailable()


def _vmaf(candidate: np.ndarray, reference: np.ndarray) -> tuple[tuple[float, ...] | None, str]:
    """Per-frame VMAF and what scored it, or None and "skipped: <why>": a missing score never fails a case."""
    reason = vmaf_skip_reason(*reference.shape[1:3])
    if not reason:
        try:
            scored = vmaf(candidate, reference, thresholds()["quality"]["vmaf_model"])
            return scored.scores, str(scored)
        except RuntimeError as exc:
            reason = str(exc)
    return None, f"skipped: {reason}"


# ----------------------------------------------------------------------------------------------- LPIPS

def alexnet_weights_path() -> Path:
    """Where torchvision looks for LPIPS's AlexNet backbone before it would try the network."""
    from torchvision.models import AlexNet_Weights

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(AlexNet_Weights.IMAGENET1K_V1.url).name


def load_lpips() -> tuple[torch.nn.Module | None, str]:
    """Real LPIPS (net="alex") when its backbone is already cached locally, else (None, what is missing).

    The file is checked before construction: lpips.LPIPS(net="alex") would otherwise try to download it.
    """
    try:
        import lpips
    except ImportError as exc:
        return None, f"lpips not importable: {exc}"
    weights = alexnet_weights_path()
    if not weights.is_file():
        return None, (f"LPIPS AlexNet backbone weights {weights.name} are not in the local torch hub cache "
                      f"({weights} is missing); copy them there to enable LPIPS")
    with _quiet_torchvision():
        return lpips.LPIPS(net="alex", verbose=False).eval(), ""


def lpips_untrained() -> torch.nn.Module:
    """LPIPS with an untrained AlexNet backbone (pnet_rand=True): exercises the plumbing, measures nothing."""
    import lpips

    with _quiet_torchvision():
        return lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()


@contextmanager
def _quiet_torchvision():
    """lpips 0.1.4 passes torchvision's deprecated `pretrained=`; its two UserWarnings are noise here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*", category=UserWarning)
        yield
