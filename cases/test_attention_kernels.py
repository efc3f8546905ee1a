"""The self-attention kernels alone at Wan's shapes (40 heads x 128): speed against their floor, and error
against fp32 attention on N(0, 1) data. fp8 kernels run with their quantization compiled in, as torch-fp8
runs them."""
import functools

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from engines.attention.kernels import fp8_attention_available, fp8_sdpa
from harness.case import Case
from harness.compare import compare, thresholds
from harness.errors import BackendUnavailable
from harness.profile import floor_tflops
from harness.shapes import A14B_DIM
from harness.timing import summarize, timed_call

pytestmark = [pytest.mark.perf, pytest.mark.gpu]
HEADS, HEAD_DIM = 40, 128
# label -> (route in engines.attention.kernels, precision)
KERNELS = {"sdpa": ("sdpa", "bf16"), "cudnn-fp8": ("cudnn", "fp8"), "triton-fp8": ("triton", "fp8")}


def qkv(tokens: int) -> tuple[torch.Tensor, ...]:
    """Seeded N(0, 1) Q, K, V in diffusers' [B, S, H, D] layout, drawn on the GPU (a 720p K is 0.8 GB)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    return tuple(torch.randn(1, tokens, HEADS, HEAD_DIM, generator=gen, device="cuda").bfloat16() for _ in range(3))


def fp32_attention(q, k, v) -> torch.Tensor:
    """The reference: fp32 attention by the memory-efficient kernel (the math kernel needs L^2 x heads memory)."""
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        return F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)


@pytest.mark.parametrize("kernel", KERNELS)
def test_attention_kernel(kernel, shape, session):
    if session.settings.device != "cuda":
        pytest.skip("attention kernels are timed on a CUDA device; this run has none")
    route, precision = KERNELS[kernel]
    ok, reason = fp8_attention_available(route) if route != "sdpa" else (True, "")
    if not ok:
        raise BackendUnavailable(f"{kernel} unavailable: {reason}")
    attend = functools.partial(fp8_sdpa, route=route)
    fn = attend if route == "sdpa" else torch.compile(attend, dynamic=False)
    q, k, v = qkv(shape.tokens)
    case = Case("attention", shape, precision, source="proxy")
    bound = thresholds()["attention"][f"max_rel_l2_{precision}"]
    result = compare(fn(q, k, v), fp32_attention(q, k, v), tolerance=bound)
    session.record("parity", case, kernel, result)
    for _ in range(2):
        fn(q, k, v)
    times = [timed_call(fn, q, k, v, device="cuda")[1] for _ in range(session.settings.perf_rounds)]
    session.record("perf", case, kernel, summarize(kernel, times, "cuda", flops=4 * shape.tokens ** 2 * A14B_DIM,
                                                   floor_tflops=floor_tflops("attention", precision)))
    assert result, result.message()
