"""Timing at full depth: one 40-layer A14B expert against the extrapolation from a 2-layer slice, and the
real-config VAE decode. The proxy tables time 2 of 40 layers; this says whether that extrapolates."""
import pytest
import torch

from harness.case import Case
from harness.components import proxy_expert
from harness.results import Measured
from harness.shapes import A14B_LAYERS
from harness.timing import RoundRecorder

pytestmark = [pytest.mark.perf, pytest.mark.gpu, pytest.mark.slow]
SLICE = 2


@pytest.fixture(scope="module")
def cuda(session):
    if session.settings.device != "cuda":
        pytest.skip("full-depth timing needs a CUDA device (one 40-layer expert is 28.6 GB in bf16)")


def time_expert(session, layers: int, shape, rounds: int):
    """Eager bf16 forwards of a `layers`-deep expert, built alone and freed afterwards."""
    component = proxy_expert(layers)
    case = Case("transformer", shape, "bf16", source="proxy", variant=f"{layers}-layers")
    runner, inputs = session.build("torch", component, case), component.inputs(case)
    for _ in range(2):
        runner(*inputs)
    recorder = RoundRecorder("torch", runner, inputs, device="cuda")
    for _ in range(rounds):
        recorder()
    del component, runner
    torch.cuda.empty_cache()
    result = recorder.result()
    session.record("perf", case, "torch", result)
    return result


def test_full_expert_matches_the_slice_extrapolation(shape, cuda, session):
    rounds = max(3, session.settings.perf_rounds // 3)
    slice_ms = time_expert(session, SLICE, shape, 3 * rounds).median_ms
    full_ms = time_expert(session, A14B_LAYERS, shape, rounds).median_ms
    ratio = full_ms / (slice_ms / SLICE * A14B_LAYERS)
    case = Case("transformer", shape, "bf16", source="proxy", variant="40-layers")
    session.record("perf", case, "torch", Measured({"measured_over_extrapolated": ratio}))
    # The blocks are identical, so depth scales linearly but for the embeddings a 2-layer slice carries (~2%).
    assert 0.8 < ratio < 1.2, f"40 layers took {full_ms:.0f} ms, {ratio:.3f}x the {slice_ms:.0f} ms slice's extrapolation"


def test_real_vae_decode(shape, cuda, session):
    if session.settings.source == "tiny":
        pytest.skip("the tiny source's VAE is a toy; the proxy and checkpoint sources carry the real-config VAE")
    case = Case("vae_decoder", shape, "bf16", source=session.settings.source)
    runner, inputs = session.runner("torch", case), session.inputs(case)
    runner(*inputs)
    recorder = RoundRecorder("torch", runner, inputs, device="cuda")
    for _ in range(3):
        recorder()
    result = recorder.result()
    session.record("perf", case, "torch", result)
    assert result.median_ms > 0 and result.peak_mem_gib > 0
