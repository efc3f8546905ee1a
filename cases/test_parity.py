"""Numeric parity of every backend against the fp32 eager reference, judged against eager's own drift."""
import pytest

from harness.case import Case, eager_precision
from harness.compare import judge_loop

pytestmark = pytest.mark.parity


def test_component_parity(parity_case: Case, backend, session):
    result = session.parity(backend, parity_case)
    session.record("parity", parity_case, backend, result)
    assert result, result.message()


def test_denoising_loop_parity(backend, reduced_precision, settings, session):
    """Same seed and latents through both experts with CFG; reports how the error grows per step."""
    precision = reduced_precision
    shape = settings.shapes[0]
    reference = session.generation("torch", "fp32", shape)
    eager = session.generation("torch", eager_precision(precision), shape)
    candidate = session.generation(backend, precision, shape)
    result = judge_loop(candidate.step_latents, reference.step_latents, eager.step_latents, precision)
    case = Case("denoising_loop", shape, precision, batch=session.cfg_batch(backend), source=settings.source)
    session.record("parity", case, backend, result)
    assert result, result.message()
