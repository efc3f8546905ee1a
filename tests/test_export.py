"""The exporter's own checks (harness/export.py): what it refuses, the patches it applies and restores, the
ONNX Runtime backend on its graph, and why a TensorRT backend is unavailable."""
from __future__ import annotations

import pytest
import torch

from engines.tensorrt import TensorRT, TensorRTRTX, import_trt
from harness.backends import make_backend
from harness.case import Case
from harness.errors import HarnessError
from harness.export import assert_plain_types, export_friendly
from harness.shapes import parse_shape

pytestmark = pytest.mark.export
SHAPE = parse_shape("16x16x9")


@pytest.mark.parametrize("bad", ["unknown_component", "bad_shape"])
def test_bad_input_is_a_harness_error(bad):
    with pytest.raises(HarnessError, match="unknown component|not a multiple of 16"):
        Case("vae_encoder", SHAPE) if bad == "unknown_component" else Case("transformer", parse_shape("20x16x9"))


def test_float64_graph_is_refused(tmp_path):
    class Widening(torch.nn.Module):
        def forward(self, x):
            return (x.double() * 2).float()

    path = tmp_path / "wide.onnx"
    torch.onnx.export(Widening(), (torch.ones(2),), str(path), dynamo=False, opset_version=20)
    with pytest.raises(ValueError, match="float64"):
        assert_plain_types(path)


def test_export_patches_are_restored():
    forward = torch.nn.RMSNorm.forward
    with export_friendly():
        assert torch.nn.RMSNorm.forward is not forward
    assert torch.nn.RMSNorm.forward is forward


def test_rms_norm_decomposition_keeps_the_math():
    norm = torch.nn.RMSNorm(24, eps=1e-6).eval()
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(2, 7, 24)
    expected = norm(x)
    with export_friendly():
        assert torch.allclose(norm(x), expected, rtol=1e-6, atol=1e-6)


def test_onnxruntime_backend_runs_the_exported_graph(tiny, tmp_path):
    from harness.backends import BackendOptions

    case, component = tiny
    runner = make_backend("onnxruntime", BackendOptions(cache_dir=tmp_path)).build(component(), case)
    inputs = component().inputs(case)
    with torch.no_grad():
        expected = component().module(*inputs)
    assert torch.allclose(runner(*inputs), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.unit
def test_available_reasons():
    module, reason = import_trt("tensorrt_no_such_module")
    assert module is None and reason.startswith("tensorrt_no_such_module not importable:")
    ok, reason = TensorRT().available()
    if import_trt("tensorrt")[0] is None:
        assert not ok and reason.startswith("tensorrt not importable:")
    ok, reason = TensorRTRTX().available()
    if not torch.cuda.is_available():
        assert not ok and "build-only" in reason and "no CUDA device" in reason
    elif torch.cuda.get_device_capability() == (9, 0):
        assert not ok and reason.startswith("TensorRT-RTX cannot run on compute capability 9.0")
