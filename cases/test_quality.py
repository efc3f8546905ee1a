"""Whole-pipeline video quality of each backend against the fp32 eager video: PSNR, SSIM, LPIPS."""
import pytest

from harness.case import Case
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
    reference = generations.get("torch", "fp32", shape, prompt)
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
