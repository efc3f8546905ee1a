"""Numeric parity of every backend against the fp32 eager reference, judged against eager's own drift."""
import pytest

from harness.case import Case, eager_precision
from harness.compare import compare, drift_tolerance, min_cosine

pytestmark = pytest.mark.parity
UNBOUNDED = float("inf")


def test_component_parity(parity_case: Case, backend, runners, reference, record):
    case = parity_case
    runner = runners.get(backend, case)
    expected = reference(case)
    eager_case = case.with_precision(eager_precision(case.precision))
    eager_error = compare(runners.get("torch", eager_case)(*runners.inputs(eager_case)), expected,
                          tolerance=UNBOUNDED).rel_l2
    tolerance = drift_tolerance(eager_error, case.precision)
    floor = min_cosine(case.precision)
    result = compare(runner(*runners.inputs(case)), expected, tolerance=tolerance, min_cosine=floor)
    record("parity", case, backend, {**result.metrics(), "eager_rel_l2": eager_error},
           thresholds={"rel_l2": tolerance, "cosine": floor},
           passed={"rel_l2": result.rel_l2 <= tolerance, "cosine": None if floor is None else result.cosine >= floor})
    assert result, result.message()


def test_denoising_loop_parity(backend, reduced_precision, settings, generations, record):
    """Same seed and latents through both experts with CFG; reports how the error grows per step."""
    precision = reduced_precision
    shape = settings.shapes[0]
    reference = generations.get("torch", "fp32", shape)
    eager = generations.get("torch", eager_precision(precision), shape)
    candidate = generations.get(backend, precision, shape)
    case = Case("denoising_loop", shape, precision, source=settings.source)
    step_errors = {}
    for step, (got, want) in enumerate(zip(candidate.step_latents, reference.step_latents), start=1):
        step_errors[f"rel_l2@step={step}"] = compare(got, want, tolerance=UNBOUNDED).rel_l2
    eager_error = compare(eager.step_latents[-1], reference.step_latents[-1], tolerance=UNBOUNDED).rel_l2
    tolerance = drift_tolerance(eager_error, precision)
    final = compare(candidate.step_latents[-1], reference.step_latents[-1], tolerance=tolerance)
    record("parity", case, backend, {**step_errors, "loop_rel_l2": final.rel_l2},
           thresholds={"loop_rel_l2": tolerance}, passed={"loop_rel_l2": bool(final)})
    assert final, f"after {len(step_errors)} steps: " + final.message()
