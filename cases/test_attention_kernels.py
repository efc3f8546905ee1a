"""The self-attention kernels alone at Wan's shapes (40 heads x 128): speed against their floor, and error
against fp32 attention. fp8 kernels run with their quantization compiled in, as torch-fp8 runs them.

Two inputs: N(0, 1) Q/K/V, and the same with a per-channel offset on K and V (what real activations carry,
and what K/V centring is for); the "-uncentred" variants show what centring buys.
"""
import functools

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from engines.attention.kernels import attend, kernel_available
from harness.case import Case
from harness.compare import compare
from harness.errors import BackendUnavailable
from harness.kernels import KERNELS
from harness.profile import floor_tflops
from harness.shapes import A14B_DIM
from harness.thresholds import thresholds
from harness.timing import summarize, timed_call

pytestmark = [pytest.mark.perf, pytest.mark.gpu]
HEADS, HEAD_DIM = 40, 128
# label -> (kernel, options for kernels.attend)
VARIANTS = {**{name: (name, {}) for name in KERNELS},
            "cudnn-fp8-uncentred": ("cudnn-fp8", {"smooth_k": False, "smooth_v": False}),
            "fa3-fp8-uncentred": ("fa3-fp8", {"smooth_k": False, "smooth_v": False})}
OFFSET = 2.0  # per-channel offsets of K and V in units of their spread


def qkv(tokens: int, offset: float) -> tuple[torch.Tensor, ...]:
    """Seeded Q, K, V in diffusers' [B, S, H, D] layout, drawn on the GPU (a 720p K is 0.8 GB in bf16)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, tokens, HEADS, HEAD_DIM, generator=gen, device="cuda") for _ in range(3))
    shift = offset * torch.randn(1, 1, HEADS, HEAD_DIM, generator=gen, device="cuda")
    return q.bfloat16(), (k + shift).bfloat16(), (v + shift).bfloat16()


def fp32_attention(q, k, v) -> torch.Tensor:
    """The reference: fp32 attention by the memory-efficient kernel (the math kernel needs L^2 x heads memory)."""
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        return F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)


@pytest.mark.parametrize("variant", VARIANTS)
def test_attention_kernel(variant, shape, session):
    if session.settings.device != "cuda":
        pytest.skip("attention kernels are timed on a CUDA device; this run has none")
    kernel, options = VARIANTS[variant]
    ok, reason = kernel_available(kernel)
    if not ok:
        raise BackendUnavailable(f"{variant} unavailable: {reason}")
    precision = KERNELS[kernel].precision
    fn = functools.partial(attend, kernel=kernel, **options)
    # fullgraph: a graph break in the kernel's lookup is an error inside a nested compile region and a split
    # block otherwise, so the kernel must trace whole.
    fn = fn if precision == "bf16" else torch.compile(fn, dynamic=False, fullgraph=True)
    bound = thresholds()["attention"][f"max_rel_l2_{precision}"]
    results = {}
    for data, offset in (("normal", 0.0), ("offset", OFFSET)):
        q, k, v = qkv(shape.tokens, offset)
        results[data] = compare(fn(q, k, v), fp32_attention(q, k, v), tolerance=bound)
        session.record("parity", Case("attention", shape, precision, source="proxy", variant=data), variant,
                       results[data])
    q, k, v = qkv(shape.tokens, 0.0)
    for _ in range(2):
        fn(q, k, v)
    times = [timed_call(fn, q, k, v, device="cuda")[1] for _ in range(session.settings.perf_rounds)]
    session.record("perf", Case("attention", shape, precision, source="proxy"), variant,
                   summarize(variant, times, "cuda", flops=4 * shape.tokens ** 2 * A14B_DIM,
                             floor_tflops=floor_tflops("attention", precision)))
    normal = results["normal"]
    assert normal, normal.message()  # uncentred kernels may fail on offset data: that is what they show
    if not variant.endswith("-uncentred"):
        assert results["offset"], results["offset"].message()
