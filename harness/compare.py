"""Parity and video-quality comparisons, returned as result objects that are truthy when they pass.

One object feeds both the assertion message and the result rows (Polygraphy's OutputCompareResult idea);
the message has one fixed format and never dumps whole tensors (diffusers' assert_tensors_close habit).
Every threshold comes from harness/thresholds.toml, through harness/thresholds.py.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from harness.thresholds import band, thresholds
from harness.video import vmaf, vmaf_unavailable

QUALITY_METRICS = ("psnr_mean", "psnr_min", "ssim_mean", "ssim_min", "lpips_mean", "lpips_max", "vmaf_mean", "vmaf_min")


def drift_tolerance(eager_error: float, precision: str) -> float:
    """The drift band, in one place: allowed rel L2 vs the fp32 reference = k x eager-at-p's own rel L2 + atol.

    k and atol per precision come from thresholds.toml [parity.<precision>] (pytorch's
    torch/_dynamo/utils.py::same). For fp8 pass bf16 eager's error: fp8 keeps bf16 activations and has no eager run.
    """
    drift = band("parity", precision)
    return drift["k"] * eager_error + drift["atol"]


def min_cosine(precision: str) -> float | None:
    """The per-forward cosine floor for `precision`, where the thresholds file sets one (fp8)."""
    return band("parity", precision).get("min_cosine")


# ---------------------------------------------------------------------------------------------- parity

@dataclass(frozen=True)
class ParityResult:
    """Error of `actual` against `expected`; truthy when finite, within `tolerance` and above `min_cosine`.

    From `judge_parity`, `tolerance` is the drift band and `eager_rel_l2` the eager error it was derived from.
    """

    max_abs: float
    rel_l2: float
    cosine: float
    p99_abs: float
    nonfinite: int
    mismatched: int
    numel: int
    worst_index: tuple[int, ...]
    worst_actual: float
    worst_expected: float
    tolerance: float
    atol: float
    min_cosine: float | None
    passed: bool
    precision: str = ""
    eager_rel_l2: float | None = None  # eager-at-precision's error against the same reference

    def __bool__(self) -> bool:
        return self.passed

    @property
    def mismatched_share(self) -> float:
        return self.mismatched / max(self.numel, 1)

    def message(self) -> str:
        """One line: mismatches and share, worst index with actual vs expected, and the tolerance needed."""
        verdict = "passed" if self.passed else "FAILED"
        cosine = "" if self.min_cosine is None else f" (min {self.min_cosine:g})"
        return (f"parity {verdict}: {self.mismatched:,} of {self.numel:,} elements mismatch "
                f"({self.mismatched_share:.2%}; |a-e| > {self.atol:g} + {self.tolerance:.3g}*|e|), "
                f"{self.nonfinite:,} non-finite; worst at {list(self.worst_index)}: actual {self.worst_actual:.6g} "
                f"vs expected {self.worst_expected:.6g}; rel L2 {self.rel_l2:.3e} needs tolerance >= "
                f"{self.rel_l2:.3e}, allowed {self.tolerance:.3e}; max abs {self.max_abs:.3e}, "
                f"p99 abs {self.p99_abs:.3e}, cosine {self.cosine:.6f}{cosine}")

    def metrics(self) -> dict[str, float]:
        """The numbers for result rows (metric names of the one row schema)."""
        out = {"max_abs": self.max_abs, "rel_l2": self.rel_l2, "cosine": self.cosine, "p99_abs": self.p99_abs,
               "nonfinite": float(self.nonfinite), "mismatched_share": self.mismatched_share}
        if self.eager_rel_l2 is not None:
            out["eager_rel_l2"] = self.eager_rel_l2
        return out

    def thresholds(self) -> dict[str, float | None]:
        return {"rel_l2": self.tolerance, "cosine": self.min_cosine}

    def checks(self) -> dict[str, bool | None]:
        """Each bounded metric's own verdict; a NaN anywhere fails rel_l2 (and so the whole result)."""
        return {"rel_l2": self.nonfinite == 0 and self.rel_l2 <= self.tolerance,
                "cosine": None if self.min_cosine is None else self.cosine >= self.min_cosine}


def _p99(values: torch.Tensor) -> float:
    """99th percentile via kthvalue: torch.quantile refuses tensors above 16M elements (a 720p video)."""
    flat = values.flatten()
    k = max(1, math.ceil(0.99 * flat.numel()))
    return float(flat.kthvalue(k).values) if flat.numel() else 0.0


def _cosine(a: torch.Tensor, e: torch.Tensor) -> float:
    na, ne = float(a.norm()), float(e.norm())
    if na == 0.0 and ne == 0.0:
        return 1.0
    return float((a * e).sum()) / (na * ne) if na and ne else 0.0


def _rel_l2(diff_norm: float, expected_norm: float) -> float:
    if expected_norm == 0.0:
        return 0.0 if diff_norm == 0.0 else math.inf
    return diff_norm / expected_norm


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (NaN or Inf in either gives a non-finite number)."""
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    return _rel_l2(float((a - e).norm()), float(e.norm()))


def judge_parity(actual: torch.Tensor, expected: torch.Tensor, precision: str,
                 eager: torch.Tensor | None = None) -> ParityResult:
    """`actual` against the fp32 `expected`, within the drift band of eager-at-precision's own error.

    `eager` is eager PyTorch at `precision` (bf16 for fp8, which has no eager run) on the same inputs; None
    means the reference is itself eager at this precision (fp32), so eager's error is 0.
    """
    drift = 0.0 if eager is None else rel_l2(eager, expected)
    result = compare(actual, expected, tolerance=drift_tolerance(drift, precision), min_cosine=min_cosine(precision))
    return dataclasses.replace(result, precision=precision, eager_rel_l2=None if eager is None else drift)


def compare(actual: torch.Tensor, expected: torch.Tensor, *, tolerance: float, atol: float = 1e-5,
            min_cosine: float | None = None) -> ParityResult:
    """Compare in float64 on the CPU; passes when rel L2 <= tolerance, nothing is NaN/Inf and cosine is high enough.

    `atol` and `tolerance` also define which elements count as mismatched (|a-e| > atol + tolerance*|e|),
    which the message reports; the verdict itself rests on rel L2, which is robust to single outliers.
    """
    if tuple(actual.shape) != tuple(expected.shape):
        raise ValueError(f"shape mismatch: actual {tuple(actual.shape)} vs expected {tuple(expected.shape)}")
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    nonfinite = int((~torch.isfinite(a)).sum())
    diff = (a - e).abs()
    ranked = torch.where(torch.isfinite(diff), diff, torch.full_like(diff, math.inf))  # NaN ranks worst
    worst = int(ranked.flatten().argmax()) if ranked.numel() else 0
    index = tuple(int(i) for i in np.unravel_index(worst, tuple(a.shape))) if a.numel() else ()
    rel_l2 = _rel_l2(float(diff.norm()), float(e.norm()))
    cosine = _cosine(a, e)
    passed = (nonfinite == 0 and int((~torch.isfinite(e)).sum()) == 0 and rel_l2 <= tolerance
              and (min_cosine is None or cosine >= min_cosine))
    return ParityResult(
        max_abs=float(ranked.max()) if ranked.numel() else 0.0, rel_l2=rel_l2, cosine=cosine,
        p99_abs=_p99(ranked), nonfinite=nonfinite, mismatched=int((ranked > atol + tolerance * e.abs()).sum()),
        numel=a.numel(), worst_index=index, worst_actual=float(a.flatten()[worst]) if a.numel() else 0.0,
        worst_expected=float(e.flatten()[worst]) if e.numel() else 0.0, tolerance=tolerance, atol=atol,
        min_cosine=min_cosine, passed=passed)


@dataclass(frozen=True)
class LoopParityResult:
    """The denoising loop's latents against the fp32 loop's: the verdict on the last step, and every step's error."""

    final: ParityResult
    step_errors: tuple[float, ...]

    def __bool__(self) -> bool:
        return bool(self.final)

    def metrics(self) -> dict[str, float]:
        steps = {f"rel_l2@step={i}": e for i, e in enumerate(self.step_errors, start=1)}
        return {**steps, "loop_rel_l2": self.final.rel_l2, "eager_loop_rel_l2": self.final.eager_rel_l2}

    def thresholds(self) -> dict[str, float | None]:
        return {"loop_rel_l2": self.final.tolerance}

    def checks(self) -> dict[str, bool | None]:
        return {"loop_rel_l2": self.final.checks()["rel_l2"]}

    def message(self) -> str:
        return f"after {len(self.step_errors)} steps: " + self.final.message()


def judge_loop(candidate: list[torch.Tensor], reference: list[torch.Tensor], eager: list[torch.Tensor],
               precision: str) -> LoopParityResult:
    """Per-step latents of three loops from the same seed: the candidate's, fp32 eager's, eager-at-precision's."""
    steps = tuple(rel_l2(got, want) for got, want in zip(candidate, reference))
    final = judge_parity(candidate[-1], reference[-1], precision, eager[-1])
    return LoopParityResult(final, steps)


def judge_parallel(actual: torch.Tensor, single: torch.Tensor, reference: torch.Tensor, precision: str) -> ParityResult:
    """A parallel run's output against one GPU's (same backend, precision and inputs), within reduction-order
    noise: rel L2 <= k x (one GPU's own error against the fp32 `reference`) + atol, from [parallel] in
    thresholds.toml. `eager_rel_l2` carries one GPU's error, the drift the band is derived from."""
    drift = rel_l2(single, reference)
    noise = thresholds()["parallel"]
    result = compare(actual, single, tolerance=noise["k"] * drift + noise["atol"])
    return dataclasses.replace(result, precision=precision, eager_rel_l2=drift)


def judge_parallel_loop(candidate: list[torch.Tensor], single: list[torch.Tensor], reference: list[torch.Tensor],
                        precision: str) -> LoopParityResult:
    """Per-step latents of a parallel loop against one GPU's loop from the same seed; the verdict on the last."""
    steps = tuple(rel_l2(got, want) for got, want in zip(candidate, single))
    return LoopParityResult(judge_parallel(candidate[-1], single[-1], reference[-1], precision), steps)


# --------------------------------------------------------------------------------------------- quality

@dataclass(frozen=True)
class QualityResult:
    """Per-frame PSNR/SSIM/VMAF (and LPIPS) of a video against a reference, judged against a precision's bands.

    `vmaf` is None where VMAF was skipped; `vmaf_note` then says why ("skipped: ..."), else what scored it.
    """

    precision: str
    psnr: tuple[float, ...]
    ssim: tuple[float, ...]
    lpips: tuple[float, ...] | None
    bands: dict[str, float] = field(default_factory=dict)
    vmaf: tuple[float, ...] | None = None
    vmaf_note: str = ""

    def metrics(self) -> dict[str, float | None]:
        """psnr_mean/min, ssim_mean/min, vmaf_mean/min and, with LPIPS, lpips_mean/max: mean and worst frame.
        A skipped VMAF is None (not measured): its rows stay, carrying the reason."""
        out = {"psnr_mean": float(np.mean(self.psnr)), "psnr_min": min(self.psnr),
               "ssim_mean": float(np.mean(self.ssim)), "ssim_min": min(self.ssim)}
        if self.lpips is not None:
            out.update(lpips_mean=float(np.mean(self.lpips)), lpips_max=max(self.lpips))
        scored = self.vmaf is not None
        out.update(vmaf_mean=float(np.mean(self.vmaf)) if scored else None, vmaf_min=min(self.vmaf) if scored else None)
        return out

    def thresholds(self) -> dict[str, float]:
        return dict(self.bands)

    def checks(self) -> dict[str, bool | None]:
        """metric -> within its band (a NaN never is), None where it was not measured (a skipped VMAF);
        LPIPS metrics appear only when LPIPS ran."""
        return {name: None if value is None else
                (value <= self.bands[name] if name.startswith("lpips") else value >= self.bands[name])
                for name, value in self.metrics().items()}

    def notes(self) -> dict[str, str]:
        """What the VMAF rows carry beside their numbers: the libvmaf and model versions, or why they are blank."""
        return {"vmaf_mean": self.vmaf_note, "vmaf_min": self.vmaf_note}

    @property
    def passed(self) -> bool:
        """Every measured metric within its band: a skipped metric never fails a case."""
        return all(ok is not False for ok in self.checks().values())

    def __bool__(self) -> bool:
        return self.passed

    def message(self) -> str:
        """One line per verdict: each metric with its band, failing ones marked, and the worst frames."""
        parts = []
        for name, value in self.metrics().items():
            if value is None:
                continue  # a skipped VMAF: its reason closes the line
            sign = "<=" if name.startswith("lpips") else ">="
            mark = "" if self.checks()[name] else " FAIL"
            parts.append(f"{name} {value:.4g} (needs {sign} {self.bands[name]:g}){mark}")
        worst = f"worst PSNR at frame {int(np.argmin(self.psnr))}, worst SSIM at frame {int(np.argmin(self.ssim))}"
        if self.vmaf is not None:
            worst += f", worst VMAF at frame {int(np.argmin(self.vmaf))}"
        verdict = "passed" if self.passed else "FAILED"
        return (f"quality {verdict} at {self.precision} over {len(self.psnr)} frames: {'; '.join(parts)}; {worst}; "
                f"vmaf: {self.vmaf_note}")


def _frames_float(frames) -> np.ndarray:
    """[F, H, W, 3] as float64 in [0, 1], from uint8 or float frames, numpy or torch."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu()
        frames = frames.numpy() if frames.dtype == torch.uint8 else frames.float().numpy()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [F, H, W, 3], got shape {frames.shape}")
    return frames.astype(np.float64) / 255.0 if frames.dtype == np.uint8 else frames.astype(np.float64)


def _psnr(reference: np.ndarray, candidate: np.ndarray, cap: float) -> float:
    from skimage.metrics import peak_signal_noise_ratio

    with np.errstate(divide="ignore"):  # identical frames: MSE 0 -> inf, capped below
        return min(float(peak_signal_noise_ratio(reference, candidate, data_range=1.0)), cap)


def _ssim(reference: np.ndarray, candidate: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

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


def video_quality(candidate_frames, reference_frames, precision: str,
                  lpips_model: torch.nn.Module | None = None) -> QualityResult:
    """Frame-by-frame PSNR and SSIM (scikit-image) and VMAF (ffmpeg's libvmaf, harness.video), plus LPIPS when a
    model is given, against `precision`'s bands."""
    cand, ref = _frames_float(candidate_frames), _frames_float(reference_frames)
    if cand.shape != ref.shape:
        raise ValueError(f"videos differ in shape: candidate {cand.shape} vs reference {ref.shape}")
    bands = {name: float(band("quality", precision)[name]) for name in QUALITY_METRICS}
    cap = thresholds()["quality"]["psnr_cap_db"]
    psnr = tuple(_psnr(r, c, cap) for r, c in zip(ref, cand))
    ssim = tuple(_ssim(r, c) for r, c in zip(ref, cand))
    lpips = None if lpips_model is None else lpips_per_frame(lpips_model, cand, ref)
    if lpips is None:
        bands = {k: v for k, v in bands.items() if not k.startswith("lpips")}
    return QualityResult(precision, psnr, ssim, lpips, bands, *_vmaf(cand, ref))


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
