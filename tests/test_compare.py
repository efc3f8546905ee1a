"""The parity and quality judges catch what they must (a 1e-2 perturbation, NaN/Inf, a noisy video) and pass eager vs eager."""
import math
import re
import shutil

import pytest
import torch

from engines.torch_eager import TorchEager
from harness.case import Case
from harness.compare import (compare, drift_tolerance, judge_parity, load_lpips, lpips_untrained, min_cosine, rel_l2,
                             video_quality)
from harness.components import make_component
from harness.errors import HarnessError
from harness.models import load_model
from harness.results import result_rows
from harness.shapes import parse_shape
from harness.thresholds import thresholds
from harness.video import vmaf_unavailable

pytestmark = pytest.mark.unit
SHAPE = parse_shape("16x16x9")
# The one message format: "<n> of <N> elements mismatch (<share>; ...), <k> non-finite; worst at [i, ...]:
# actual <a> vs expected <e>; rel L2 <r> needs tolerance >= <r>, allowed <t>; ..."
MESSAGE = re.compile(r"parity FAILED: [\d,]+ of [\d,]+ elements mismatch \(\d+\.\d+%; .*\), [\d,]+ non-finite; "
                     r"worst at \[[\d, ]+\]: actual \S+ vs expected \S+; rel L2 \S+ needs tolerance >= \S+, "
                     r"allowed \S+; ")


@pytest.fixture(scope="module")
def dit_outputs():
    """Tiny DiT outputs: fp32 reference, a second fp32 eager run, and eager fp16 and bf16 (same weights up to rounding)."""
    out = {}
    for precision, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        model = load_model("tiny", dtype=dtype)
        case = Case("transformer", SHAPE, precision)
        runner = TorchEager().build(make_component(model, "transformer"), case)
        out[precision] = runner(*make_component(model, "transformer").inputs(case))
        if precision == "fp32":
            out["fp32_again"] = runner(*make_component(model, "transformer").inputs(case))
    return out


def perturbed(output: torch.Tensor, rel: float, seed: int = 0) -> torch.Tensor:
    """`output` plus seeded noise whose L2 norm is `rel` times the output's: a broken runner's result."""
    noise = torch.randn(output.shape, generator=torch.Generator().manual_seed(seed)).to(output.dtype)
    return output + noise * (rel * output.float().norm() / noise.float().norm()).to(output.dtype)


def test_eager_vs_eager_passes(dit_outputs):
    result = compare(dit_outputs["fp32_again"], dit_outputs["fp32"], tolerance=drift_tolerance(0.0, "fp32"))
    assert result, result.message()
    assert result.rel_l2 == 0.0 and result.max_abs == 0.0 and result.mismatched == 0
    assert result.cosine == pytest.approx(1.0)


def test_one_percent_perturbation_fails_at_fp32_with_the_fixed_message(dit_outputs):
    reference = dit_outputs["fp32"]
    eager_error = rel_l2(dit_outputs["fp32_again"], reference)
    tolerance = drift_tolerance(eager_error, "fp32")
    result = compare(perturbed(reference, 1e-2), reference, tolerance=tolerance)
    assert not result
    assert result.rel_l2 == pytest.approx(1e-2, rel=1e-3)
    assert MESSAGE.match(result.message()), result.message()
    assert result.mismatched > 0 and 0 < result.mismatched_share <= 1
    w = result.worst_index
    assert result.worst_actual == pytest.approx(float(perturbed(reference, 1e-2)[w]))
    assert result.worst_expected == pytest.approx(float(reference[w]))


def test_one_percent_perturbation_fails_at_fp16(dit_outputs):
    reference, eager = dit_outputs["fp32"], dit_outputs["fp16"]
    tolerance = drift_tolerance(rel_l2(eager, reference), "fp16")
    assert compare(eager, reference, tolerance=tolerance), "eager fp16 must pass its own band"
    result = compare(perturbed(eager, 1e-2), reference, tolerance=tolerance)
    assert not result, result.message()


def test_bf16_band_is_wider_than_a_one_percent_perturbation(dit_outputs):
    """At bf16 parity cannot catch 1e-2: eager bf16 already drifts ~6e-3 from fp32 on the tiny DiT, so
    k=3 allows ~1.8e-2 (torch/_dynamo/utils.py::same). This pins that known limit so a threshold change
    that alters it is seen; the quality cases and fp32/fp16 parity are what catch such a slip."""
    reference, eager = dit_outputs["fp32"], dit_outputs["bf16"]
    eager_error = rel_l2(eager, reference)
    tolerance = drift_tolerance(eager_error, "bf16")
    assert 1e-3 < eager_error < 1e-2
    assert compare(perturbed(eager, 1e-2), reference, tolerance=tolerance)
    assert not compare(perturbed(eager, 3e-2), reference, tolerance=tolerance)


def test_fp8_band_hides_a_one_percent_slip_and_catches_three(dit_outputs):
    """torch-fp8's error is 3.2x eager bf16's (proxy, H100: 0.0195 vs 0.0061), and its band is k x bf16's
    drift + 0.01. An independent 1e-2 slip beside that error passes, as at bf16; 3e-2 fails. Pins the
    limit (harness/thresholds.toml [parity.fp8]) so a threshold change that moves it is seen."""
    reference, eager = dit_outputs["fp32"], dit_outputs["bf16"]
    eager_error = rel_l2(eager, reference)
    tolerance = drift_tolerance(eager_error, "fp8")
    fp8_like = perturbed(reference, 3.2 * eager_error, seed=2)
    assert compare(fp8_like, reference, tolerance=tolerance), "an fp8-sized error must pass its band"
    assert compare(perturbed(fp8_like, 1e-2, seed=3), reference, tolerance=tolerance)
    assert not compare(perturbed(fp8_like, 3e-2, seed=3), reference, tolerance=tolerance)


def test_judge_parity_carries_its_band_and_the_eager_error(dit_outputs):
    """The verdict a case asserts is the one its rows record: band, eager error and per-metric checks."""
    reference, eager = dit_outputs["fp32"], dit_outputs["bf16"]
    slipped = judge_parity(perturbed(eager, 3e-2, seed=4), reference, "bf16", eager)
    assert not slipped and slipped.eager_rel_l2 == rel_l2(eager, reference)
    assert slipped.tolerance == drift_tolerance(rel_l2(eager, reference), "bf16")
    assert slipped.checks() == {"rel_l2": False, "cosine": None}
    assert slipped.thresholds()["rel_l2"] == slipped.tolerance and "eager_rel_l2" in slipped.metrics()
    exact = judge_parity(dit_outputs["fp32_again"], reference, "fp32")
    assert exact and exact.eager_rel_l2 is None and exact.tolerance == drift_tolerance(0.0, "fp32")
    fp8 = judge_parity(perturbed(reference, 0.02, seed=5), reference, "fp8", eager)
    assert fp8 and fp8.min_cosine == min_cosine("fp8") and fp8.checks()["cosine"]


def test_a_nan_in_eager_fails_the_band_too(dit_outputs):
    reference, eager = dit_outputs["fp32"], dit_outputs["bf16"].clone()
    eager[0, 0, 0, 0, 0] = math.nan
    assert not judge_parity(dit_outputs["bf16"], reference, "bf16", eager)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_always_fails(dit_outputs, bad):
    reference = dit_outputs["fp32"]
    broken = reference.clone()
    broken[0, 3, 1, 1, 0] = bad
    result = compare(broken, reference, tolerance=math.inf)
    assert not result
    assert result.nonfinite == 1 and result.worst_index == (0, 3, 1, 1, 0)
    assert "1 non-finite" in result.message()


def test_fp8_band_has_a_cosine_floor():
    assert min_cosine("fp8") == 0.99 and min_cosine("bf16") is None
    expected = torch.ones(1000)
    flipped = expected.clone()
    flipped[:10] = -1.0  # rel L2 0.2 but cosine 0.98: the cosine floor alone fails it
    assert compare(flipped, expected, tolerance=1.0)
    assert not compare(flipped, expected, tolerance=1.0, min_cosine=min_cosine("fp8"))


@pytest.fixture(scope="module")
def video():
    """Real frames: the tiny VAE decoder on seeded latents, as [F, H, W, 3] in [0, 1]."""
    model = load_model("tiny")
    case = Case("vae_decoder", SHAPE)
    component = make_component(model, "vae_decoder")
    out = TorchEager().build(component, case)(*component.inputs(case))
    return (out[0].float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 3, 0).contiguous()


def noisy(frames: torch.Tensor, sigma: float) -> torch.Tensor:
    noise = torch.randn(frames.shape, generator=torch.Generator().manual_seed(1))
    return (frames + sigma * noise).clamp(0, 1)


def test_quality_identical_video_passes(video):
    result = video_quality(video, video, "bf16")
    assert result, result.message()
    assert result.metrics()["psnr_min"] == 100.0 and result.metrics()["ssim_min"] == pytest.approx(1.0)
    as_uint8 = (video * 255).round().to(torch.uint8)
    assert video_quality(as_uint8, as_uint8, "fp32")


def test_quality_catches_a_noisy_video(video):
    result = video_quality(noisy(video, 0.1), video, "bf16")  # ~20 dB: well below the bf16 band
    assert not result
    assert not result.checks()["psnr_mean"] and not result.checks()["psnr_min"]
    assert "psnr_mean" in result.message() and "FAIL" in result.message()
    assert result.metrics()["psnr_mean"] < result.thresholds()["psnr_mean"]


def test_lpips_plumbing_with_an_untrained_backbone(video):
    """UNTRAINED AlexNet (pnet_rand=True): proves frames reach LPIPS and its numbers reach the result;
    the values mean nothing perceptually. Real LPIPS is test_real_lpips below."""
    model = lpips_untrained()
    same = video_quality(video, video, "bf16", lpips_model=model)
    other = video_quality(noisy(video, 0.1), video, "bf16", lpips_model=model)
    assert len(same.lpips) == video.shape[0] and set(same.checks()) >= {"lpips_mean", "lpips_max"}
    assert same.metrics()["lpips_max"] == pytest.approx(0.0, abs=1e-6)
    assert other.metrics()["lpips_mean"] > same.metrics()["lpips_mean"]


def moving_clip(height: int = 128, width: int = 128, frames: int = 5) -> torch.Tensor:
    """Smooth stripes drifting 2 px a frame, [F, H, W, 3] in [0, 1]: content VMAF can score, with motion in it."""
    y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    t = torch.arange(frames).view(-1, 1, 1)
    channels = [torch.sin(2 * math.pi * (x + 2 * t) / 37), torch.cos(2 * math.pi * (y - 2 * t) / 29),
                torch.sin(2 * math.pi * (x + y) / 53 + 0.3 * t)]
    return torch.stack(channels, dim=-1) / 2 + 0.5


def test_vmaf_ranks_identical_above_noisy_and_frame_shifted_videos():
    reason = vmaf_unavailable()
    if reason:
        pytest.skip(f"VMAF: {reason}")
    clip = moving_clip()
    same = video_quality(clip, clip, "fp32")
    noise = video_quality(noisy(clip, 0.1), clip, "fp32")
    shifted = video_quality(torch.cat([clip[:1], clip[:-1]]), clip, "fp32")  # every frame one frame late
    assert len(same.vmaf) == clip.shape[0] and "model vmaf_v0.6.1" in same.vmaf_note
    assert same.metrics()["vmaf_mean"] >= 99 and same.checks()["vmaf_mean"] and same.checks()["vmaf_min"]
    for other in (noise, shifted):
        assert other.metrics()["vmaf_mean"] < same.metrics()["vmaf_mean"], other.message()
        assert not other and other.checks()["vmaf_mean"] is False and "vmaf_mean" in other.message()


def test_vmaf_below_its_minimum_side_is_skipped_with_the_reason_in_the_result_and_rows(video):
    result = video_quality(video, video, "bf16")  # 16x16: libvmaf gives no score there
    assert result, result.message()  # a missing score never fails a case
    assert result.vmaf is None and result.checks()["vmaf_mean"] is None and result.checks()["vmaf_min"] is None
    reason = "skipped: frames 16x16 are below the 128 px short side VMAF needs"
    assert f"vmaf: {reason}" in result.message()
    rows = {r.metric: r for r in result_rows(Case("video", SHAPE, "bf16"), "torch", result, device="cpu", versions="")}
    assert rows["vmaf_mean"].value is None and rows["vmaf_mean"].passed is None
    assert rows["vmaf_min"].note.startswith(reason) and rows["psnr_mean"].note == ""


def test_vmaf_is_skipped_where_ffmpeg_lacks_libvmaf(monkeypatch):
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", shutil.which("true"))  # an "ffmpeg" whose filter list is empty
    clip = moving_clip(frames=2)
    result = video_quality(clip, clip, "fp32")
    assert result and result.vmaf is None
    assert "was built without libvmaf" in result.vmaf_note and "IMAGEIO_FFMPEG_EXE" in result.vmaf_note


def test_load_lpips_names_the_missing_weights_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    model, reason = load_lpips()
    assert model is None and "alexnet-owt-7be5be79.pth" in reason and str(tmp_path) in reason


def test_real_lpips(video):
    model, reason = load_lpips()
    if model is None:
        pytest.skip(f"real LPIPS: {reason}")
    same = video_quality(video, video, "bf16", lpips_model=model)
    other = video_quality(noisy(video, 0.1), video, "bf16", lpips_model=model)
    assert same.metrics()["lpips_max"] < 1e-3 < other.metrics()["lpips_mean"]


def test_a_precision_without_a_band_names_the_bands_there_are():
    with pytest.raises(HarnessError, match=r"no \[quality\.fp64\] thresholds in \S+thresholds\.toml; known precisions: "
                                           r"fp32, fp16, bf16, fp8, int8$"):
        video_quality(torch.zeros(1, 16, 16, 3), torch.zeros(1, 16, 16, 3), "fp64")


@pytest.mark.parametrize("damage, needle", [(b"[parity\n", "TOMLDecodeError"), (b"\xff\xfe", "UnicodeDecodeError")])
def test_a_damaged_thresholds_file_is_one_line_naming_it(tmp_path, damage, needle):
    path = tmp_path / "thresholds.toml"
    path.write_bytes(damage)
    with pytest.raises(HarnessError) as error:
        thresholds(path)
    message = str(error.value)
    assert message.startswith(f"{path}: unreadable ({needle}") and message.endswith("restore it from git"), message
    assert "\n" not in message
