"""fp8 attention: the recipe's arithmetic, the processor's plumbing and the Triton kernel (interpreted) on CPU."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engines.attention import kernels, processor, recipe, triton_fp8
from harness.errors import BackendUnavailable
from harness.models import load_model

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU machine's answer")
def test_cpu_reports_unavailable_and_installs_nothing():
    for kernel in ("cudnn-fp8", "fa3-fp8", "fa3", "triton-fp8"):
        ok, reason = kernels.kernel_available(kernel)
        assert not ok and "CUDA" in reason, (kernel, reason)
    model = load_model("tiny")
    with pytest.raises(BackendUnavailable, match="cudnn-fp8 needs a CUDA GPU"):
        processor.install(model.transformer, "cudnn-fp8")
    assert all(type(b.attn1.processor).__name__ == "WanAttnProcessor" for b in model.transformer.blocks)


def test_quantize_fills_e4m3_and_centres_exactly():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 300, 2, 64, generator=gen) * 3 + 1 for _ in range(3))
    x = recipe.quantize_qkv(q, k, v)
    assert x.q.dtype == recipe.FP8 and x.q.float().abs().max().item() == recipe.E4M3_MAX
    k_centred = k - k.mean(dim=1, keepdim=True)
    for fp8, descale, orig in ((x.q, x.descale_q, q), (x.k, x.descale_k, k_centred), (x.v, x.descale_v, v - x.v_mean)):
        back = fp8.float() * descale
        big = orig.abs() > orig.abs().max() / 64  # e4m3 normal range: relative error at most 2^-4
        assert ((back - orig).abs() <= orig.abs() / 16 + 1e-6)[big].all()


def test_processor_matches_stock_processor():
    """Our processor with the stock kernel ('sdpa' route) must compute Wan's self-attention exactly."""
    model = load_model("tiny")
    stock = model.transformer
    ours = processor.with_kernel(stock, "sdpa")
    assert all(isinstance(b.attn1.processor, processor.SelfAttnProcessor) for b in ours.blocks)
    assert all(type(b.attn1.processor).__name__ == "WanAttnProcessor" for b in stock.blocks), "the original stays stock"
    assert ours.blocks[0].attn1.to_q.weight is stock.blocks[0].attn1.to_q.weight, "the clone shares the weights"
    gen = torch.Generator().manual_seed(1)
    args = dict(hidden_states=torch.randn(1, 16, 3, 8, 8, generator=gen), timestep=torch.tensor([500]),
                encoder_hidden_states=torch.randn(1, 12, 32, generator=gen), return_dict=False)
    with torch.inference_mode():
        expected, got = stock(**args)[0], ours(**args)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(got, ours(**{**args, "timestep": torch.tensor([900])})[0])


@pytest.mark.skipif(triton_fp8.triton is None, reason="triton is not installed here")
def test_triton_kernel_in_interpreter():
    """The fp8 flash-attention kernel run by Triton's CPU interpreter, ragged tails included."""
    script = (
        "import torch; from engines.attention.kernels import attend\n"
        "g = torch.Generator().manual_seed(0)\n"
        "q, k, v = (torch.randn(1, n, 2, 64, generator=g).bfloat16() + o for n, o in ((150, 0), (130, .5), (130, 1)))\n"
        "ref = attend(q.float(), k.float(), v.float(), 'sdpa')\n"
        "out = attend(q, k, v, 'triton-fp8').float()\n"
        "print(((out - ref).norm() / ref.norm()).item())\n")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rel_l2 = float(done.stdout.strip().splitlines()[-1])
    assert 1e-4 < rel_l2 < 0.03  # fp8 noise is visible, a wrong kernel is far above


def test_per_head_scales_fill_each_head_and_take_fa3s_descale_shape():
    """FA3 takes float32 descales of shape (batch, heads); each head is scaled to its own amax."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 64, 3, 16, generator=gen) * torch.tensor([1.0, 10.0, 100.0]).view(1, 1, 3, 1)
    x8, descale = recipe.quantize_e4m3(x, per_head=True)
    assert descale.shape == (2, 3) and descale.dtype == torch.float32
    per_head_max = x8.float().abs().amax(dim=(1, 3))
    assert torch.all(per_head_max == recipe.E4M3_MAX)
    back = x8.float() * descale[:, None, :, None]
    assert ((back - x) / x.abs().amax(dim=(1, 3), keepdim=True)).abs().max() < 2 ** -4


def test_unknown_kernel_and_a_bf16_pv_on_fp8_kernels_are_user_errors():
    from harness.errors import HarnessError

    q = torch.randn(1, 8, 2, 64)
    with pytest.raises(HarnessError, match="unknown attention kernel 'fa4'"):
        kernels.kernel_available("fa4")
    with pytest.raises(HarnessError, match="only triton-fp8 can keep P·V in bf16"):
        kernels.attend(q, q, q, "cudnn-fp8", pv_fp8=False)


def test_every_kernel_of_the_table_has_a_call():
    """harness.kernels says what each kernel is; engines/attention/kernels.py calls it by the same name."""
    from harness.kernels import KERNELS

    assert set(kernels.CALLS) == set(KERNELS)


def test_centring_adds_no_bias():
    """V's token mean is added back to the output, so the centred fp8 V must keep it: centring in bf16
    dropped it from large elements (rel bias 0.11 here, 6-10% rel L2 of attention on the H100)."""
    gen = torch.Generator().manual_seed(2)
    v = torch.randn(1, 32768, 2, 64, generator=gen).bfloat16()
    x = recipe.quantize_qkv(v, v, v)
    bias = (x.v.float() * x.descale_v + x.v_mean - v.float()).mean(dim=1)
    assert (bias.norm() / x.v_mean.norm()).item() < 0.06  # fp8 rounding noise alone: 0.03
