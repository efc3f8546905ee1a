"""Does the video stay the same? Each backend's video against the fp32 eager video, judged relative to eager
PyTorch's own distance from it at the backend's precision (harness/quality.py): PSNR, SSIM, VMAF (skipped, with
the reason in the rows, on frames too small for it), LPIPS. The components not under test run in fp32 in all three
videos (harness.pipeline.Precisions.judged). Each case leaves a contact sheet in the run folder.
"""
import math

import pytest

from harness.case import Case, eager_precision
from harness.contact_sheet import contact_sheet
from harness.errors import BackendUnavailable
from harness.pipeline import PROMPTS, REFERENCE, Precisions
from harness.quality import attribute_drift, judge_video, load_lpips

pytestmark = pytest.mark.quality


@pytest.fixture(scope="session")
def lpips_model():
    """Real LPIPS (AlexNet backbone from the local torch hub cache) or the reason it is missing."""
    return load_lpips()


def eager_video(session, precisions: Precisions, shape, prompt: int):
    """An eager video the candidate is judged against; a machine that cannot make it skips the case, saying so."""
    try:
        return session.generation("torch", precisions, shape, prompt)
    except BackendUnavailable as exc:
        raise BackendUnavailable(f"the eager {precisions.id} video to judge against cannot be made here: {exc}") from None


def judge(session, backend, precision, prompt, lpips_model=None):
    """The candidate's video against the fp32 one beside eager's, recorded as one quality row set with its sheet."""
    shape = session.settings.shapes[0]
    judged = Precisions.judged(precision)
    reference, eager = eager_video(session, REFERENCE, shape, prompt), eager_video(session, judged.eager, shape, prompt)
    candidate = session.generation(backend, judged, shape, prompt)
    origin = f"fp32 video {reference.origin}; eager {judged.eager.id} video {eager.origin}" if reference.origin else ""
    result = judge_video(candidate.frames, eager.frames, reference.frames, precision, lpips_model, origin)
    case = Case("video", shape, precision, batch=session.cfg_batch(backend), source=session.settings.source,
                variant=f"prompt{prompt}")
    session.record("quality", case, backend, result)
    videos = {"fp32": reference.frames, "eager": eager.frames, "candidate": candidate.frames}
    title = (f"{case.id} on {backend}: {'pass' if result else 'FAIL'}\n"
             f"eager {judged.eager.id}, candidate {backend} {judged.id}")
    session.attach(f"contact-{case.id}-{backend}.png", contact_sheet(videos, "fp32", title))
    return result


@pytest.mark.parametrize("prompt", range(len(PROMPTS)), ids=[f"prompt{i}" for i in range(len(PROMPTS))])
def test_video_quality(backend, reduced_precision, prompt, session):
    result = judge(session, backend, reduced_precision, prompt)
    assert result, result.message()


def test_video_lpips(backend, reduced_precision, session, lpips_model):
    model, reason = lpips_model
    if model is None:
        pytest.skip(f"LPIPS skipped: {reason}")
    result = judge(session, backend, reduced_precision, 0, lpips_model=model)
    assert result, result.message()


def test_video_drift_attribution(attributed_precision, session):
    """Where eager's drift of the video at a precision comes from: the video with only the experts, only the text
    encoder or only the VAE decoder in it (the rest fp32), and with all of them, against the fp32 video (prompt 0).
    Reported, not gated; it asserts the three parts' videos were made and measured."""
    shape, precision = session.settings.shapes[0], eager_precision(attributed_precision)
    parts = {"all": Precisions(precision, precision, precision),
             **{part: Precisions.only(part, precision) for part in ("experts", "text_encoder", "vae_decoder")}}
    reference = eager_video(session, REFERENCE, shape, 0)
    result = attribute_drift({part: eager_video(session, p, shape, 0).frames for part, p in parts.items()},
                             reference.frames)
    session.record("quality", Case("video", shape, precision, source=session.settings.source, variant="attribution"),
                   "torch", result)
    measured = {name: value for name, value in result.metrics().items() if "_vmaf_" not in name}
    assert all(math.isfinite(value) for value in measured.values()), measured
