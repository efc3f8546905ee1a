"""Whole-pipeline video quality of each backend against an eager video: PSNR, SSIM, VMAF (skipped, with the
reason in the rows, on frames too small for it), LPIPS.

The reference is the fp32 eager video, except for fp8 and int8: the bf16 eager video (harness.case.quality_reference).
"""
import pytest

from harness.case import Case, quality_reference
from harness.compare import load_lpips, video_quality
from harness.pipeline import PROMPTS

pytestmark = pytest.mark.quality


@pytest.fixture(scope="session")
def lpips_model():
    """Real LPIPS (AlexNet backbone from the local torch hub cache) or the reason it is missing."""
    return load_lpips()


def judge_video(session, backend, precision, prompt, lpips_model=None):
    """The candidate's video against its reference video, recorded as one quality row set."""
    shape = session.settings.shapes[0]
    candidate = session.generation(backend, precision, shape, prompt)
    reference = session.generation("torch", quality_reference(precision), shape, prompt)
    result = video_quality(candidate.frames, reference.frames, precision, lpips_model=lpips_model)
    case = Case("video", shape, precision, batch=session.cfg_batch(backend), source=session.settings.source,
                variant=f"prompt{prompt}")
    session.record("quality", case, backend, result)
    return result


@pytest.mark.parametrize("prompt", range(len(PROMPTS)), ids=[f"prompt{i}" for i in range(len(PROMPTS))])
def test_video_quality(backend, reduced_precision, prompt, session):
    result = judge_video(session, backend, reduced_precision, prompt)
    assert result, result.message()


def test_video_lpips(backend, reduced_precision, session, lpips_model):
    model, reason = lpips_model
    if model is None:
        pytest.skip(f"LPIPS skipped: {reason}")
    result = judge_video(session, backend, reduced_precision, 0, lpips_model=model)
    assert result, result.message()
