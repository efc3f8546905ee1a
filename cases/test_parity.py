"""Numeric parity of every backend against the fp32 eager reference, judged against eager's own drift."""
import pytest

from harness.case import Case
from harness.compare import judge_loop
from harness.pipeline import REFERENCE, Precisions

pytestmark = pytest.mark.parity


def test_component_parity(parity_case: Case, backend, session):
    result = session.parity(backend, parity_case)
    session.record("parity", parity_case, backend, result)
    assert result, result.message()


def test_denoising_loop_parity(backend, reduced_precision, settings, session):
    """Same seed and latents through both experts with CFG; reports how the error grows per step. The components
    not under test run in fp32 in all three loops, as in the quality cases, whose videos these loops are."""
    precision = reduced_precision
    shape = settings.shapes[0]
    judged = Precisions.judged(precision)
    reference = session.generation("torch", REFERENCE, shape)
    eager = session.generation("torch", judged.eager, shape)
    candidate = session.generation(backend, judged, shape)
    result = judge_loop(candidate.step_latents, reference.step_latents, eager.step_latents, precision)
    case = Case("denoising_loop", shape, precision, batch=session.cfg_batch(backend), source=settings.source)
    session.record("parity", case, backend, result)
    assert result, result.message()
