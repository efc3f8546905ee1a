"""The torch-side backends: Inductor matches eager within drift on the tiny DiT; availability reasons are concrete."""
import dataclasses
import sys

import pytest
import torch

from harness.backends import BackendOptions, make_backend
from harness.case import Case
from harness.compare import compare, judge_parity, min_cosine
from harness.components import make_component
from harness.errors import BackendUnavailable, HarnessError
from harness.models import load_model
from harness.shapes import parse_shape

CASE = Case("transformer", parse_shape("16x16x9"), "fp32")


@pytest.mark.parity
@pytest.mark.parametrize("scope", ["blocks", "forward"])
def test_inductor_matches_eager_on_the_tiny_dit_and_leaves_eager_alone(scope):
    """The tiny DiT compiled per block, or whole with nested block regions: ~35 s cold on 2 CPU cores each,
    ~6 s with Inductor's on-disk cache warm."""
    inductor = make_backend("inductor", BackendOptions(compile_scope=scope))
    ok, reason = inductor.available()
    if not ok:
        pytest.skip(reason)
    model = load_model("tiny")
    component = make_component(model, "transformer")
    inputs = component.inputs(CASE)
    eager = make_backend("torch").build(component, CASE)
    expected = eager(*inputs)
    tuned_before = torch._inductor.config.coordinate_descent_tuning
    result = judge_parity(inductor.build(component, CASE)(*inputs), expected, "fp32")
    assert result, result.message()
    # its tuning went to its own compiles, not into the process-wide config other backends compile under
    assert torch._inductor.config.coordinate_descent_tuning == tuned_before
    # the eager backend shares the module: it must still run its own, uncompiled blocks
    assert all(type(b).__name__ == "WanTransformerBlock" for b in model.transformer.blocks)
    assert torch.equal(eager(*inputs), expected)


@pytest.mark.unit
def test_whole_forward_compile_refuses_a_token_split():
    from harness.case import Layout

    component = make_component(load_model("tiny"), "transformer")
    with pytest.raises(BackendUnavailable, match="--compile-scope forward would trace diffusers' context-parallel"):
        make_backend("inductor", BackendOptions(compile_scope="forward")).build(
            component, dataclasses.replace(CASE, layout=Layout(ulysses=2)))


@pytest.mark.unit
def test_unknown_inductor_mode_is_a_user_error():
    with pytest.raises(HarnessError, match="unknown inductor mode 'fastest'; choose one of default, "):
        make_backend("inductor", BackendOptions(compile_mode="fastest"))


@pytest.mark.unit
@pytest.mark.parametrize("mode", ["default", "max-autotune-no-cudagraphs", "reduce-overhead"])
def test_inductor_compiles_with_its_modes_settings_and_its_tuning(mode):
    from torch._inductor import list_mode_options

    from engines.inductor import TUNING

    options = make_backend("inductor", BackendOptions(compile_mode=mode)).compile_options()
    assert options == {**list_mode_options(mode), **TUNING} and options["coordinate_descent_tuning"] is True


@pytest.mark.unit
def test_inductor_on_cpu_needs_a_cxx_compiler(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("engines.inductor.shutil.which", lambda name: None)
    ok, reason = make_backend("inductor").available()
    assert not ok and "no C++ compiler" in reason


@pytest.mark.unit
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_torch_fp8_on_cpu_says_it_needs_a_cuda_device(session):
    ok, reason = make_backend("torch-fp8").available()
    assert not ok and reason.startswith("no CUDA device: fp8 matmuls need compute capability >= 8.9")
    with pytest.raises(BackendUnavailable, match="torch-fp8 unavailable: no CUDA device"):
        session.build("torch-fp8", make_component(load_model("tiny", dtype=torch.bfloat16), "transformer"),
                      CASE.with_precision("fp8"))


@pytest.mark.unit
def test_torch_fp8_without_torchao_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # `import torchao...` now raises ImportError
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    ok, reason = make_backend("torch-fp8").available()
    assert not ok and "torchao not importable: ModuleNotFoundError" in reason


@pytest.mark.unit
def test_torch_fp8_picks_block_linears_with_fp8_friendly_dims():
    """The tiny DiT (width 24) has no linear with dims that are multiples of 16: nothing would run in fp8."""
    from engines.torch_fp8 import fp8_linear

    model = load_model("tiny")
    picked = [name for name, m in model.transformer.named_modules() if fp8_linear(m, name)]
    assert picked == []
    wide = torch.nn.Module()
    wide.blocks = torch.nn.ModuleList([torch.nn.Linear(32, 64)])
    wide.proj_out = torch.nn.Linear(64, 32)
    assert [n for n, m in wide.named_modules() if fp8_linear(m, n)] == ["blocks.0"]


@pytest.mark.gpu
def test_torch_fp8_quantizes_a_copy_and_keeps_the_bf16_weights():
    ok, reason = make_backend("torch-fp8").available()
    if not ok:
        pytest.skip(reason)
    from engines.torch_fp8 import quantized_copy

    wide = torch.nn.Module()
    wide.blocks = torch.nn.ModuleList([torch.nn.Linear(64, 128)]).to("cuda", torch.bfloat16)
    before = wide.blocks[0].weight.detach().clone()
    clone, count = quantized_copy(wide)
    assert count == 1 and type(clone.blocks[0].weight) is not type(wide.blocks[0].weight)
    assert type(wide.blocks[0].weight) is torch.nn.Parameter and torch.equal(wide.blocks[0].weight, before)
    x = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16)
    # e4m3 keeps 3 mantissa bits: ~3.6% rms rounding on x and on w gives ~5% rel L2 per matmul
    result = compare(clone.blocks[0](x), wide.blocks[0](x), tolerance=0.1, min_cosine=min_cosine("fp8"))
    assert result, result.message()


@pytest.mark.unit
def test_static_fp8_scales_are_the_calibration_amax_and_keep_fp8_accuracy():
    """torchao's observers on the CPU (its fp8 matmul has a CPU path): one scale per activation, amax/448 of what the
    calibration calls fed that linear, and a forward within fp8's rounding of the bf16 one."""
    from engines.torch_fp8 import quantized_copy, static_scales

    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(64, 128), torch.nn.Linear(128, 64)])
            self.proj_out = torch.nn.Linear(64, 64)

        def forward(self, x):
            return self.proj_out(self.blocks[1](self.blocks[0](x)))

    torch.manual_seed(0)
    stack = Stack().bfloat16()
    calls = [(torch.randn(1, 32, 64).bfloat16(),), (3 * torch.randn(1, 32, 64).bfloat16(),)]
    clone, count = quantized_copy(stack, static_scales(stack, calls))
    assert not any(m._forward_pre_hooks for m in stack.modules()), "the observers leave the shared module as it was"
    assert count == 2 and type(clone.proj_out.weight) is torch.nn.Parameter  # the output projection stays bf16
    scale = clone.blocks[0].weight.act_quant_scale.float().flatten()
    assert torch.allclose(scale, max(x.abs().amax().float() for (x,) in calls) / 448, rtol=1e-2)
    x = torch.randn(1, 32, 64).bfloat16()
    with torch.inference_mode():
        result = compare(clone(x), stack(x), tolerance=0.1, min_cosine=min_cosine("fp8"))
    assert result, result.message()


@pytest.mark.unit
def test_static_fp8_scales_need_the_loop_to_calibrate_on():
    """An expert with fp8-fit linears (tiny, but 32 wide) held without a WanModel has no loop to calibrate on."""
    from engines.torch_fp8 import TorchFp8
    from harness.components import dit_component
    from harness.models import TINY_TRANSFORMER, load_expert

    wide = {**TINY_TRANSFORMER, "attention_head_dim": 16}
    component = dit_component(load_expert(2, device="cpu", dtype=torch.bfloat16, config=wide), "tiny-32-wide")
    with pytest.raises(BackendUnavailable, match="carries no denoising-loop inputs to calibrate torch-fp8-static on"):
        TorchFp8(BackendOptions(fp8_scales="static")).build(component, CASE.with_precision("fp8"))


@pytest.mark.unit
def test_cuda_graph_replays_the_eager_forward_and_refuses_another_shape():
    """engines/cuda_graph.py on the tiny DiT: replay equals the plain call for new inputs; another shape is refused."""
    if not torch.cuda.is_available():
        pytest.skip("a CUDA graph needs a CUDA device; this machine has none")
    from engines.cuda_graph import GraphedRunner

    model = load_model("tiny", device="cuda")
    component = make_component(model, "transformer")
    plain = make_backend("torch").build(component, CASE)
    graphed = GraphedRunner(plain)
    first, second = (component.inputs(CASE, seed) for seed in (0, 1))
    assert torch.equal(graphed(*first), plain(*first))
    assert torch.equal(graphed(*second), plain(*second))  # new inputs reach the captured graph
    other = component.inputs(CASE, shape=parse_shape("32x32x9"))
    with pytest.raises(ValueError, match="build one runner per static shape"):
        graphed(*other)
