"""The quality judge (harness/quality.py): relative to eager's own distance from the fp32 video, so eager passes by
construction and a candidate k+1 times as far fails; floors catch a broken video whatever eager does; stored videos
are served only when they are the very video asked for."""
import logging
import math
import re
import shutil
import subprocess
import sys

import pytest
import torch

from engines.torch_eager import TorchEager
from harness.case import Case
from harness.components import make_component
from harness.errors import HarnessError
from harness.models import load_model
from harness.pipeline import REFERENCE, Precisions
from harness.quality import attribute_drift, judge_video, load_lpips, lpips_untrained
from harness.results import result_rows
from harness.session import Session
from harness.settings import settings_from
from harness.shapes import parse_shape
from harness.thresholds import thresholds
from harness.video import vmaf_unavailable

pytestmark = pytest.mark.unit
SHAPE = parse_shape("16x16x9")


@pytest.fixture(scope="module")
def video():
    """Real frames: the tiny VAE decoder on seeded latents, as [F, H, W, 3] in [0, 1]."""
    model = load_model("tiny")
    case = Case("vae_decoder", SHAPE)
    component = make_component(model, "vae_decoder")
    out = TorchEager().build(component, case)(*component.inputs(case))
    return (out[0].float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 3, 0).contiguous()


def plus_noise(frames: torch.Tensor, sigma: float, seed: int = 1) -> torch.Tensor:
    """`frames` plus Gaussian noise, unclamped, so the distance is exactly sigma's draw."""
    return frames + sigma * torch.randn(frames.shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp8"])
def test_eager_itself_passes_by_construction(video, precision):
    eager = plus_noise(video, 0.02)
    result = judge_video(eager, eager, video, precision)
    assert result, result.message()
    assert result.metrics()["psnr_fp32"] == pytest.approx(result.metrics()["eager_psnr_fp32"])
    assert result.metrics()["psnr_eager"] == thresholds()["quality"]["psnr_cap_db"]


def test_a_candidate_as_far_as_eager_passes_and_one_k_plus_1_times_as_far_fails(video):
    k = thresholds()["quality"]["bf16"]["k"]
    drift = 0.02 * torch.randn(video.shape, generator=torch.Generator().manual_seed(1))
    eager, alike = video + drift, plus_noise(video, 0.02, seed=2)  # another draw of the same size
    result = judge_video(alike, eager, video, "bf16")
    assert result, result.message()
    far = judge_video(video + (k + 1) * drift, eager, video, "bf16")
    assert not far
    checks = far.checks()
    assert checks["psnr_fp32"] is False and checks["psnr_frame_fp32"] is False and checks["ssim_fp32"] is False
    assert "psnr (video)" in far.message() and "FAIL" in far.message()
    # The row's threshold is the band in dB: k x eager's RMSE + atol, i.e. about 20 log10(k) dB under eager's PSNR.
    band_db = far.thresholds()["psnr_fp32"]
    assert band_db == pytest.approx(far.metrics()["eager_psnr_fp32"] - 20 * math.log10(k), abs=0.5)
    assert far.metrics()["psnr_fp32"] < band_db


def test_one_bad_frame_fails_the_frame_check_where_the_whole_video_passes(video):
    eager = plus_noise(video, 0.02)
    candidate = plus_noise(video, 0.02, seed=2)
    candidate[4] = video[4] + 5 * (eager[4] - video[4])  # one frame five times as far as eager's same frame
    result = judge_video(candidate, eager, video, "bf16")
    assert result.checks()["psnr_fp32"] and result.checks()["psnr_frame_fp32"] is False
    rows = {r.metric: r for r in result_rows(Case("video", SHAPE, "bf16"), "torch", result, device="cpu", versions="")}
    assert rows["psnr_frame_fp32"].note.startswith("frame 4 of 9") and rows["psnr_frame_fp32"].passed is False


@pytest.mark.parametrize("broken, needle", [
    (lambda v: torch.zeros_like(v), "black video"),
    (lambda v: torch.full_like(v, 0.5), "constant video"),
    (lambda v: v[:1].expand_as(v).clone(), "frozen video"),
    (lambda v: torch.where(torch.arange(v.numel()).view(v.shape) == 7, torch.nan, v), "non-finite video"),
])
def test_a_broken_video_fails_whatever_eager_does(video, broken, needle):
    candidate = broken(video)
    result = judge_video(candidate, candidate, video, "bf16")  # eager as broken: no drift excuses it
    assert not result and needle in result.message(), result.message()


def test_the_tiny_models_videos_clear_the_floors():
    """The floors' thresholds against real eager videos of the tiny model: far from them (thresholds.toml)."""
    session = Session(settings_from({"backends": "torch", "precisions": "bf16", "device": "cpu"}))
    quality = thresholds()["quality"]
    for prompt in (0, 1):
        frames = session.generation("torch", REFERENCE, SHAPE, prompt).frames
        result = judge_video(frames, frames, frames, "bf16")
        assert result.metrics()["frame_std_min"] > 10 * quality["floor_flat_std"]
        assert result.metrics()["motion_max"] > 10 * quality["floor_frozen_rmse"]


def test_the_rows_say_all_three_distances_and_flag_an_eager_video_far_from_fp32(video):
    eager = plus_noise(video, 0.1)  # 20 dB: far from the fp32 video
    result = judge_video(plus_noise(video, 0.1, seed=2), eager, video, "fp8")
    rows = {r.metric: r for r in result_rows(Case("video", SHAPE, "fp8"), "torch-fp8", result, device="cpu",
                                             versions="")}
    for kind in ("psnr", "ssim"):
        assert {f"{kind}_fp32", f"eager_{kind}_fp32", f"{kind}_eager", f"{kind}_frame_fp32"} <= set(rows)
    assert rows["psnr_fp32"].threshold is not None and rows["eager_psnr_fp32"].threshold is None
    assert rows["psnr_eager"].passed is None  # what the candidate changes against eager is reported, not gated
    note = rows["eager_psnr_fp32"].note
    assert re.search(r"eager bf16's own video is (19.9|20.0) dB from the fp32 video \(under 30 dB\)", note), note


def test_vmaf_ranks_identical_above_noisy_and_frame_shifted_videos():
    reason = vmaf_unavailable()
    if reason:
        pytest.skip(f"VMAF: {reason}")
    clip = moving_clip()
    same = judge_video(clip, clip, clip, "fp32")
    noise = judge_video(plus_noise(clip, 0.1).clamp(0, 1), clip, clip, "fp32")
    shifted = judge_video(torch.cat([clip[:1], clip[:-1]]), clip, clip, "fp32")  # every frame one frame late
    assert len(same.candidate.vmaf) == clip.shape[0] and "model vmaf_v0.6.1" in same.candidate.vmaf_note
    assert same.metrics()["vmaf_fp32"] >= 99 and same.checks()["vmaf_fp32"] and same.checks()["vmaf_frame_fp32"]
    for other in (noise, shifted):
        assert other.metrics()["vmaf_fp32"] < same.metrics()["vmaf_fp32"], other.message()
        assert not other and other.checks()["vmaf_fp32"] is False and "vmaf (video)" in other.message()


def moving_clip(height: int = 128, width: int = 128, frames: int = 5) -> torch.Tensor:
    """Smooth stripes drifting 2 px a frame, [F, H, W, 3] in [0, 1]: content VMAF can score, with motion in it."""
    y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    t = torch.arange(frames).view(-1, 1, 1)
    channels = [torch.sin(2 * math.pi * (x + 2 * t) / 37), torch.cos(2 * math.pi * (y - 2 * t) / 29),
                torch.sin(2 * math.pi * (x + y) / 53 + 0.3 * t)]
    return torch.stack(channels, dim=-1) / 2 + 0.5


def test_vmaf_below_its_minimum_side_is_skipped_with_the_reason_in_the_result_and_rows(video):
    result = judge_video(video, video, video, "bf16")  # 16x16: libvmaf gives no score there
    assert result, result.message()  # a missing score never fails a case
    assert result.candidate.vmaf is None and result.checks()["vmaf_fp32"] is None
    reason = "skipped: frames 16x16 are below the 128 px short side VMAF needs"
    assert f"vmaf: {reason}" in result.message()
    rows = {r.metric: r for r in result_rows(Case("video", SHAPE, "bf16"), "torch", result, device="cpu", versions="")}
    assert rows["vmaf_fp32"].value is None and rows["vmaf_fp32"].passed is None
    assert rows["vmaf_frame_fp32"].note.startswith(reason) and rows["ssim_fp32"].note == ""


def test_vmaf_is_skipped_where_ffmpeg_lacks_libvmaf(monkeypatch):
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", shutil.which("true"))  # an "ffmpeg" whose filter list is empty
    clip = moving_clip(frames=2)
    result = judge_video(clip, clip, clip, "fp32")
    assert result and result.candidate.vmaf is None
    assert "was built without libvmaf" in result.candidate.vmaf_note and "IMAGEIO_FFMPEG_EXE" in result.candidate.vmaf_note


def test_lpips_plumbing_with_an_untrained_backbone(video):
    """UNTRAINED AlexNet (pnet_rand=True): proves frames reach LPIPS and its numbers reach the result and its band;
    the values mean nothing perceptually. Real LPIPS is test_real_lpips below."""
    model = lpips_untrained()
    same = judge_video(video, video, video, "bf16", lpips_model=model)
    other = judge_video(plus_noise(video, 0.1).clamp(0, 1), video, video, "bf16", lpips_model=model)
    assert len(same.candidate.lpips) == video.shape[0] and {"lpips_fp32", "lpips_frame_fp32"} <= set(same.checks())
    assert same.metrics()["lpips_fp32"] == pytest.approx(0.0, abs=1e-6)
    assert other.metrics()["lpips_fp32"] > same.metrics()["lpips_fp32"]


def test_load_lpips_names_the_missing_weights_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    model, reason = load_lpips()
    assert model is None and "alexnet-owt-7be5be79.pth" in reason and str(tmp_path) in reason


def test_real_lpips(video):
    model, reason = load_lpips()
    if model is None:
        pytest.skip(f"real LPIPS: {reason}")
    same = judge_video(video, video, video, "bf16", lpips_model=model)
    other = judge_video(plus_noise(video, 0.1).clamp(0, 1), video, video, "bf16", lpips_model=model)
    assert same.metrics()["lpips_fp32"] < 1e-3 < other.metrics()["lpips_fp32"]


def test_a_precision_without_a_band_names_the_bands_there_are():
    with pytest.raises(HarnessError, match=r"no \[quality\.fp64\] thresholds in \S+thresholds\.toml; known precisions: "
                                           r"fp32, fp16, bf16, fp8, int8$"):
        judge_video(torch.zeros(1, 16, 16, 3), torch.zeros(1, 16, 16, 3), torch.zeros(1, 16, 16, 3), "fp64")


def test_the_drift_attribution_measures_each_parts_video(video):
    result = attribute_drift({"experts": plus_noise(video, 0.01), "vae_decoder": video}, video)
    metrics = result.metrics()
    assert metrics["drift_vae_decoder_psnr_fp32"] == thresholds()["quality"]["psnr_cap_db"]
    assert 35 < metrics["drift_experts_psnr_fp32"] < 45 and not result.checks()


# ------------------------------------------------------------------------------------------- stored videos

def _session(tmp_path) -> Session:
    return Session(settings_from({"backends": "torch", "precisions": "bf16", "device": "cpu",
                                  "cache_dir": str(tmp_path / "cache")}))


def test_a_stored_video_is_read_back_as_made_without_building_the_model(tmp_path):
    made = _session(tmp_path).generation("torch", REFERENCE, SHAPE)
    again = _session(tmp_path)
    read = again.generation("torch", REFERENCE, SHAPE)
    assert torch.equal(made.frames, read.frames) and made.frames.dtype == read.frames.dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(made.step_latents, read.step_latents)) and made.experts == read.experts
    assert read.origin.startswith("read from the cache") and made.origin.startswith("made in")
    assert not again._models, "a stored video needs no model: a 40-layer fp32 expert is 57 GB"


@pytest.mark.parametrize("damage", ["truncate", "garbage", "another model"])
def test_a_damaged_or_foreign_stored_video_is_rebuilt_with_one_log_line(tmp_path, damage, caplog):
    judged = Precisions.judged("bf16").eager
    made = _session(tmp_path).generation("torch", judged, SHAPE)
    (entry,) = (tmp_path / "cache" / "videos").glob("tiny-*")
    frames = entry / "frames.npy"
    if damage == "truncate":
        frames.write_bytes(frames.read_bytes()[:-100])
    elif damage == "garbage":
        frames.write_bytes(bytes(reversed(frames.read_bytes())))
    else:  # another model's video stored under this key: its manifest names the other model's spec
        manifest = frames.parent / "manifest.json"
        manifest.write_text(manifest.read_text().replace('"seed": 0', '"seed": 7'))
    with caplog.at_level(logging.WARNING, logger="harness.cache"):
        again = _session(tmp_path).generation("torch", judged, SHAPE)
    assert again.origin.startswith("made in") and torch.equal(again.frames, made.frames)
    (line,) = [r.getMessage() for r in caplog.records if "unusable" in r.getMessage()]
    assert "rebuilding it" in line and "\n" not in line


def test_the_key_of_a_stored_video_changes_with_what_the_video_depends_on(tmp_path, monkeypatch):
    from harness import models

    _session(tmp_path).generation("torch", REFERENCE, SHAPE)
    monkeypatch.setattr(models, "INIT_RECIPE", "another-recipe")
    assert _session(tmp_path).generation("torch", REFERENCE, SHAPE).origin.startswith("made in")
    assert len(list((tmp_path / "cache" / "videos").glob("tiny-*"))) == 2


def test_bench_judges_a_saved_checkpoint_by_the_same_rule_and_leaves_a_contact_sheet(tiny_checkpoint, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "harness", "bench", "--model-source", "checkpoint",
                           f"--model-path={tiny_checkpoint}", "--shapes", "32x48x5", "--backends", "torch",
                           "--precisions", "bf16", f"--results-dir={tmp_path / 'results'}",
                           f"--cache-dir={tmp_path / 'cache'}", "--", "-k", "video_quality and prompt0"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    (run,) = (tmp_path / "results").iterdir()
    (sheet,) = run.glob("contact-video-checkpoint-32x48x5-bf16-b1-prompt0-torch.png")
    assert sheet.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and sheet.stat().st_size < 300_000
    summary = (run / "summary.md").read_text()
    assert "## quality: distance from the fp32 video" in summary and f"]({sheet.name})" in summary
    assert "| video-checkpoint-32x48x5-bf16-b1-prompt0 | torch     | PSNR (dB)" in summary


def test_a_reference_video_this_machine_cannot_make_skips_the_case_saying_why(monkeypatch, tmp_path):
    """The skip names the video that cannot be made and why (conftest turns BackendUnavailable into a skip)."""
    import importlib.util
    from pathlib import Path

    from harness.errors import BackendUnavailable

    spec = importlib.util.spec_from_file_location("quality_cases", Path(__file__).parent.parent / "cases" / "test_quality.py")
    cases = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cases)
    session = _session(tmp_path)  # an empty cache: the video must be made

    def unavailable(name, **options):
        raise BackendUnavailable(f"{name} unavailable: no {name} here")

    monkeypatch.setattr(session, "backend", unavailable)
    with pytest.raises(BackendUnavailable, match=r"^the eager fp32 video to judge against cannot be made here: "
                                                 r"torch unavailable: no torch here$"):
        cases.judge(session, "torch", "bf16", 0)
