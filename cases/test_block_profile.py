"""Where one A14B block's time goes, per backend: attention, GEMMs and the rest, from CUDA kernel times.

A 1-layer proxy expert forward (one block plus the patch embedding, time embedding and unpatchify around
it), built through the session. Each region's achieved TFLOP/s is recorded against the best rate measured
for its kind of work (thresholds.toml [floors]). The rows land in the run's perf table, so
`python -m harness compare` gates a slower region like any other timing. Each variant's slowest kernels go
beside them in the run folder (kernels-*.md): what to fuse or replace next.
"""
import dataclasses
import re

import pytest
import torch

from harness.case import Case
from harness.clocks import ClockSampler
from harness.components import proxy_expert, seeded_loop
from harness.kernels import KERNELS
from harness.profile import floor_tflops, region_times
from harness.shapes import block_flops_by_region
from harness.timing import summarize, timed_call

pytestmark = [pytest.mark.perf, pytest.mark.gpu]
STATIC, WHOLE = {"fp8_scales": "static"}, {"compile_scope": "forward"}
# (backend, self-attention kernel, options other than their defaults, named in the label): eager, the best bf16
# PyTorch, and the fp8 stacks, with static fp8 scales and (bf16 only) the whole forward compiled as the levers.
VARIANTS = [("torch", "sdpa", {}), ("inductor", "sdpa", {}), ("inductor", "fa3", {}), ("inductor", "fa3", WHOLE),
            ("torch-fp8", "cudnn-fp8", {}), ("torch-fp8", "fa3-fp8", {}), ("torch-fp8", "fa3-fp8", STATIC)]
WARMUP = 3  # compile, autotune, cuDNN plan build


def label(backend: str, kernel: str, options: dict) -> str:
    """e.g. torch-fp8[fa3-fp8+static+forward]"""
    return f"{backend}[{kernel}{''.join('+' + v for v in options.values())}]"


@pytest.fixture(scope="module")
def block(session):
    if session.settings.device != "cuda":
        pytest.skip("the block profile sorts CUDA kernel times into regions; this run has no CUDA device")
    block = proxy_expert(1, device="cuda", dtype=torch.bfloat16)
    # Static fp8 scales calibrate on the loop's inputs, which a lone expert has not got: the block is timed,
    # not judged, so its own seeded inputs stand in (same kernels, other scale values).
    return dataclasses.replace(block, loop_inputs=seeded_loop(block, 2))


@pytest.mark.parametrize("stack", VARIANTS, ids=[label(*v) for v in VARIANTS])
def test_block_profile(stack, shape, block, session):
    backend, kernel, options = stack
    variant = label(*stack)
    precision = "fp8" if backend == "torch-fp8" else "bf16"
    # Built as what it is, a (1-layer) high-noise expert, so every backend takes it; recorded as "block".
    expert = Case("transformer", shape, precision, source="proxy")
    case = dataclasses.replace(expert, component="block")
    runner = session.build(backend, block, expert, attention=kernel, **options)
    inputs = block.inputs(expert)
    for _ in range(WARMUP):
        runner(*inputs)
    rounds = session.settings.perf_rounds
    flops = block_flops_by_region(shape.tokens)
    # The clock beside the rates: the same kernel runs slower in a stack that holds the card at its power limit.
    with ClockSampler() as clocks:
        forward = summarize(variant, [timed_call(runner, *inputs, device="cuda")[1] for _ in range(rounds)],
                            "cuda", flops=sum(flops.values()))
        profile = region_times(lambda: runner(*inputs), rounds)
    session.record("perf", dataclasses.replace(case, variant="forward"), variant, forward)
    if clocks.result:
        session.record("perf", dataclasses.replace(case, variant="clock"), variant, clocks.result)
    kernel_ms = 0.0
    session.attach(f"kernels-{case.id}-{re.sub(r'[][+]+', '-', variant).strip('-')}.md",
                   profile.markdown(f"{variant}, {case.id}") + f"\n{clocks.describe()}\n")
    for region, times in profile.regions.items():
        result = summarize(f"{variant} {region}", times, "cuda", flops=flops.get(region),
                           floor_tflops=floor_tflops(region, KERNELS[kernel].precision if region == "attention" else precision))
        session.record("perf", dataclasses.replace(case, variant=region), variant, result)
        kernel_ms += result.median_ms
    # One stream: the regions' kernel times add up to the forward, less the launch gaps between kernels.
    assert 0.5 * forward.median_ms < kernel_ms < 1.1 * forward.median_ms, (
        f"{variant}: kernels {kernel_ms:.1f} ms against a {forward.median_ms:.1f} ms forward")
