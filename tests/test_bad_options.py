"""Bad options and inputs to the CLI's commands, generate above all: one line (exit 2) before any model is built,
nothing left behind; a prompt past the text encoder's length is one warning; ORT refusing bf16 names the op."""
from __future__ import annotations

import logging
import os

import pytest
import torch

from harness.__main__ import main
from harness.case import Case
from harness.errors import BackendUnavailable
from harness.shapes import parse_shape

from tests.helpers import cli_error

SHAPE = parse_shape("16x16x9")


@pytest.mark.unit
@pytest.mark.parametrize("argv, needle", [
    (["--steps", "0"], "--steps 0 must be a whole number from 1 to 1000"),
    (["--steps", "-1"], "--steps -1 must be a whole number from 1 to 1000"),
    (["--model-source", "proxy", "--proxy-layers", "0"], "--proxy-layers 0 must be a whole number >= 1"),
    (["--precision", "fp8", "--backend", "torch"], "has no fp8 path (it runs fp32, fp16, bf16); fp8 runs on "
                                                   "--backend torch-fp8"),
    (["--seed", str(2 ** 64)], "--seed 18446744073709551616 must be from 0 to 2**63 - 1"),
    (["--shape", "16x16x9,32x32x9"], "--shape '16x16x9,32x32x9': generate takes one shape"),
    (["--steps", "two"], "argument --steps: invalid int value: 'two'"),
])
def test_generate_refuses_bad_options(argv, needle, capsys, tmp_path):
    assert needle in cli_error(["generate", "--prompt", "x", "--out", str(tmp_path / "v.mp4"), *argv], capsys)


@pytest.mark.unit
@pytest.mark.parametrize("argv, needle", [
    (["generate", "--prompt", "x", "--out", "clip.avi"], "--out clip.avi: the video is written as H.264 in an mp4"),
    (["export", "--precision", "fp8", "--component", "vae_decoder"], "--precision fp8 quantizes the DiT experts only"),
    (["export", "--precision", "fp64"], "--precision: unknown precision 'fp64'"),
    (["build", "--opt-level", "9"], "--opt-level 9: TensorRT's builder optimization levels are 0 to 5"),
    (["build", "--precision", "fp8", "--fp8-recipe", "nvidia"], "--fp8-recipe nvidia keeps blocks 0-2"),
    (["shapes", "99999x99999x9"], "height 99999 exceeds 2048"),
    (["shapes", "16x16x1019"], "frames 1019 is not 4k+1: Wan's VAE needs 4k+1 frames; try 1017 or 1021"),
    (["shapes", "16x16x1022"], "frames 1022 exceeds 1021"),
    (["shapes", "16x16x9", "--steps", "99999999"], "--steps 99999999 must be a whole number from 1 to 1000"),
])
def test_a_command_refuses_what_it_would_ignore_or_choke_on(argv, needle, capsys, tmp_path):
    cache = ["--cache-dir", str(tmp_path)] if argv[0] in ("export", "build") else []
    assert needle in cli_error([*argv, *cache], capsys)


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if the command gets as far as building a session (and with it, a model)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a Session was built: the bad path was not refused up front")

    monkeypatch.setattr("harness.session.Session", refuse)


@pytest.mark.unit
def test_generate_into_an_existing_folder_is_refused_and_leaves_nothing(capsys, tmp_path, no_model):
    line = cli_error(["generate", "--prompt", "x", "--out", str(tmp_path)], capsys)
    assert "is a folder" in line and list(tmp_path.iterdir()) == []


READ_ONLY = 0o555


@pytest.mark.unit
@pytest.mark.parametrize("out, needle", [
    ("a-file/video.mp4", "a-file is a file, not a folder; give another path"),
    ("a-file/deeper/video.mp4", "a-file is a file, not a folder; give another path"),
    # /proc exists and os.access calls it writable for root, yet no folder can be made in it.
    ("/proc/wan-nowhere/video.mp4", "cannot make a folder in /proc (No such file or directory); give a folder you "
                                    "can write to"),
    pytest.param("read-only/new/video.mp4", "read-only (Permission denied); give a folder you can write to",
                 marks=pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")),
])
def test_generate_into_a_folder_it_cannot_write_is_one_line_before_any_model(out, needle, capsys, tmp_path,
                                                                              no_model):
    (tmp_path / "a-file").write_text("")
    (tmp_path / "read-only").mkdir(mode=READ_ONLY)
    before = sorted(tmp_path.rglob("*"))
    line = cli_error(["generate", "--prompt", "x", "--out", str(tmp_path / out)], capsys)
    assert line.startswith(f"error: --out {tmp_path / out}: ") and needle in line, line
    assert sorted(tmp_path.rglob("*")) == before  # the probe left nothing behind


@pytest.mark.unit
def test_generate_makes_the_missing_folders_of_out(tmp_path):
    out = tmp_path / "new" / "deeper" / "video.mp4"
    assert main(["generate", "--prompt", "x", "--steps", "1", "--out", str(out)]) == 0
    assert out.is_file() and [p.name for p in out.parent.iterdir()] == ["video.mp4"]


@pytest.mark.unit
def test_a_long_prompt_is_truncated_with_one_warning(caplog):
    from harness.models import load_model
    from harness.pipeline import tokenize

    model = load_model("tiny")
    prompt = " ".join(["a cat walks on the grass"] * 1000)  # 5,000 words
    with caplog.at_level(logging.WARNING, logger="harness.pipeline"):
        for _ in range(3):
            ids, _ = tokenize(model, [prompt, "a cat"], "cpu")
    (record,) = [r for r in caplog.records if "truncated" in r.getMessage()]
    assert ids.shape[1] == 512 and "512 tokens" in record.getMessage() and "dropped" in record.getMessage()


@pytest.mark.unit
def test_ort_cpu_refusing_bf16_names_the_op_and_type(tmp_path):
    from engines.onnxruntime import OnnxRuntime, refusal
    from harness.backends import BackendOptions
    from harness.components import make_component
    from harness.models import load_model

    component = make_component(load_model("tiny", dtype=torch.bfloat16), "vae_decoder")
    with pytest.raises(BackendUnavailable, match=r"ONNX Runtime CPU does not implement Conv for tensor\(bfloat16\)"):
        OnnxRuntime(BackendOptions(cache_dir=tmp_path)).build(component, Case("vae_decoder", SHAPE, "bf16"))
    ort_words = "[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation for Mul(14) node with name 'm'"
    assert refusal(ort_words, ["CPUExecutionProvider"], tmp_path / "g.onnx") == (
        "ONNX Runtime CPU does not implement Mul (opset 14) for this graph's tensor types (node m)")
