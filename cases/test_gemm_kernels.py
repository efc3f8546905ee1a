"""One A14B block's GEMMs alone at Wan's token counts: bf16, and fp8 with each of torch-fp8's activation scalings
(--fp8-scales): per row from each call's amax (torchao's dynamic scaling, the default), or one static scale per
tensor (what TensorRT's fp8 engines take). The fp8 linears are torch-fp8's own (engines/torch_fp8.py), compiled,
so each call includes its activation's quantization, as in the block; each output is checked against fp32.
"""
import pytest
import torch

from engines.torch_fp8 import quantized_copy, static_scales
from harness.backends import make_backend
from harness.case import Case
from harness.compare import compare
from harness.errors import BackendUnavailable
from harness.profile import floor_tflops
from harness.shapes import A14B_DIM, A14B_FFN
from harness.thresholds import thresholds
from harness.timing import summarize, timed_call

pytestmark = [pytest.mark.perf, pytest.mark.gpu]
# name -> (in, out) features: the attention projections (Q, K, V, O of both attentions), the FFN's two
GEMMS = {"qkvo": (A14B_DIM, A14B_DIM), "ffn_up": (A14B_DIM, A14B_FFN), "ffn_down": (A14B_FFN, A14B_DIM)}
SCALINGS = ("bf16", "row", "static")


class _Linear(torch.nn.Module):
    """One linear where torch-fp8 looks for them (under `blocks`)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.blocks = torch.nn.ModuleList([linear])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[0](x)


@pytest.mark.parametrize("scaling", SCALINGS)
@pytest.mark.parametrize("gemm", GEMMS)
def test_gemm_kernel(gemm, scaling, shape, session):
    if session.settings.device != "cuda":
        pytest.skip("GEMMs are timed on a CUDA device; this run has none")
    precision = "bf16" if scaling == "bf16" else "fp8"
    if precision == "fp8":
        ok, reason = make_backend("torch-fp8").available()
        if not ok:
            raise BackendUnavailable(f"fp8 GEMMs unavailable: {reason}")
    features_in, features_out = GEMMS[gemm]
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, shape.tokens, features_in, generator=gen, device="cuda").bfloat16()
    linear = torch.nn.Linear(features_in, features_out, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():  # seeded weights at the scale nn.Linear draws them
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=gen, device="cuda") * features_in ** -0.5)
        linear.bias.zero_()
    expected = torch.nn.functional.linear(x.float(), linear.weight.float())
    module = _Linear(linear)
    if precision == "fp8":
        # static: calibrated on the timed input itself, the best case for one per-tensor scale
        scales = static_scales(module, [(x,)]) if scaling == "static" else None
        module = torch.compile(quantized_copy(module, scales)[0], dynamic=False)
    with torch.inference_mode():
        result = compare(module(x), expected, tolerance=thresholds()["gemm"][f"max_rel_l2_{precision}"])
        del expected
        for _ in range(2):
            module(x)
        times = [timed_call(module, x, device="cuda")[1] for _ in range(session.settings.perf_rounds)]
    label = "bf16" if scaling == "bf16" else f"fp8-{scaling}"
    case = Case("gemm", shape, precision, source="proxy", variant=gemm)
    session.record("parity", case, label, result)
    session.record("perf", case, label, summarize(label, times, "cuda", flops=2 * shape.tokens * features_in * features_out,
                                                  floor_tflops=floor_tflops("gemm", precision)))
    assert result, result.message()
