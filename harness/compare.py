"""Parity comparisons, returned as result objects that are truthy when they pass (whole videos: harness/quality.py).

One object feeds both the assertion message and the result rows (Polygraphy's OutputCompareResult idea);
the message has one fixed format and never dumps whole tensors (diffusers' assert_tensors_close habit).
Every threshold comes from harness/thresholds.toml, through harness/thresholds.py.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from harness.thresholds import band, thresholds


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
