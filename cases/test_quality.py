"""Whole-pipeline video quality of each backend against an eager video: PSNR, SSIM, LPIPS.

The reference is the fp32 eager video, except for fp8: the bf16 eager video (harness.case.quality_reference).
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


def videos(backend, precision, prompt, settings, generations):
    shape = settings.shapes[0]
    candidate = generations.get(backend, precision, shape, prompt)
    reference = generations.get("torch", quality_reference(precision), shape, prompt)
    case = Case("video", shape, precision, source=settings.source, variant=f"prompt{prompt}")
    return case, candidate.frames, reference.frames


@pytest.mark.parametrize("prompt", range(len(PROMPTS)), ids=[f"prompt{i}" for i in range(len(PROMPTS))])
def test_video_quality(backend, reduced_precision, prompt, settings, generations, record):
    precision = reduced_precision
    case, got, want = videos(backend, precision, prompt, settings, generations)
    result = video_quality(got, want, precision)
    record("quality", case, backend, result.metrics(), thresholds=result.thresholds, passed=result.checks)
    assert result, result.message()


def test_video_lpips(backend, reduced_precision, settings, generations, record, lpips_model):
    model, reason = lpips_model
    if model is None:
        pytest.skip(f"LPIPS skipped: {reason}")
    case, got, want = videos(backend, reduced_precision, 0, settings, generations)
    result = video_quality(got, want, reduced_precision, lpips_model=model)
    record("quality", case, backend, result.metrics(), thresholds=result.thresholds, passed=result.checks)
    assert result, result.message()


def test_fp8_is_judged_against_the_bf16_eager_video_and_the_rest_against_fp32():
    assert quality_reference("fp8") == "bf16"
    assert [quality_reference(p) for p in ("fp32", "fp16", "bf16")] == ["fp32"] * 3
