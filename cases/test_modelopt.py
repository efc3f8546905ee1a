"""ModelOpt PTQ on the CPU: loop-captured calibration, the calibration cache, and the simulated `modelopt` backend
judged against bf16 eager in the fp8 and int8 bands.

The tiny DiT is judged at 128x128x9 (192 tokens): at the CI shape 16x16x9 (3 tokens) static scales from the
calibration prompts do not cover held-out prompts (harness/thresholds.toml [parity.int8]).
"""
from __future__ import annotations

import pytest
import torch

from engines.modelopt import calibrate, restore
from harness.cache import DiskCache
from harness.case import DIT_COMPONENTS, QUANTIZED, Case
from harness.components import dit_component, make_component
from harness.errors import BackendUnavailable
from harness.models import load_model
from harness.pipeline import CALIBRATION_PROMPTS, CALIBRATION_STEPS
from harness.shapes import parse_shape

pytestmark = pytest.mark.export
SHAPE = parse_shape("128x128x9")
BOUNDARY = 875  # harness.models.WanModel.boundary_ratio x 1000 train timesteps


@pytest.fixture(scope="module")
def tiny_bf16():
    return load_model("tiny", dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def modelopt_ready(session):
    session.backend("modelopt")  # unavailable (modelopt not importable): skips with why


def test_each_expert_calibrates_on_its_own_timesteps_of_the_real_loop(tiny_bf16):
    calls = {name: make_component(tiny_bf16, name).loop_inputs(Case(name, SHAPE, "fp8"), False)
             for name in DIT_COMPONENTS}
    per_expert = len(CALIBRATION_PROMPTS) * CALIBRATION_STEPS  # half the steps each, two CFG branches per step
    assert [len(c) for c in calls.values()] == [per_expert, per_expert]
    assert all(int(t) >= BOUNDARY for _, t, _ in calls["transformer"])
    assert all(int(t) < BOUNDARY for _, t, _ in calls["transformer_2"])
    latents, _, text = calls["transformer"][0]
    assert latents.dtype == text.dtype == torch.bfloat16 and tuple(latents.shape) == SHAPE.latent_shape(1)
    held_out = make_component(tiny_bf16, "transformer").loop_inputs(Case("transformer", SHAPE, "fp8"), True)
    assert not torch.equal(held_out[0][2], text), "the held-out prompts are not the calibration prompts"


@pytest.mark.parametrize("precision", QUANTIZED)
def test_calibration_is_cached_and_leaves_the_shared_expert_alone(precision, tiny_bf16, modelopt_ready, tmp_path):
    component = make_component(tiny_bf16, "transformer")
    before = {k: v.clone() for k, v in tiny_bf16.transformer.state_dict().items()}
    case = Case("transformer", SHAPE, precision)
    cache = DiskCache(tmp_path)
    first, second = calibrate(component, case, cache), calibrate(component, case, cache)
    assert cache.outcomes("calibration", first.path.name) == ["miss", "hit"] and second.hit
    inputs = component.loop_inputs(case, True)[0]
    with torch.inference_mode():
        outputs = [restore(component, c.value)(*inputs) for c in (first, second)]
        eager = component.module(*inputs)
    assert torch.equal(*outputs), "a restored copy computes the same whether the scales were just made or loaded"
    assert not torch.equal(outputs[0], eager), "the restored copy is quantized"
    after = tiny_bf16.transformer.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any("quantizer" in name for name, _ in tiny_bf16.transformer.named_modules())
    other = calibrate(component, Case("transformer", parse_shape("64x64x9"), precision), cache)
    assert other.path.name != first.path.name, "other calibration inputs make another entry"


@pytest.mark.parametrize("precision", QUANTIZED)
@pytest.mark.parametrize("component", DIT_COMPONENTS)
def test_modelopt_parity_in_the_quantized_band(component, precision, session, modelopt_ready):
    """The fake-quantized expert against fp32 eager, within k x bf16 eager's drift + atol, on held-out loop calls."""
    case = Case(component, SHAPE, precision, source=session.settings.source)
    result = session.parity("modelopt", case)
    session.record("parity", case, "modelopt", result)
    assert result, result.message()


@pytest.mark.unit
def test_modelopt_says_what_it_cannot_quantize(session, modelopt_ready):
    case = Case("transformer", SHAPE, "fp8")
    alone = dit_component(load_model("tiny", dtype=torch.bfloat16).transformer, "tiny-weights")
    with pytest.raises(BackendUnavailable, match="carries no denoising-loop inputs to calibrate on"):
        session.build("modelopt", alone, case)
    text = Case("text_encoder", SHAPE, "fp8")
    with pytest.raises(BackendUnavailable, match="modelopt cannot run text_encoder-.*: ModelOpt quantization covers the DiT experts"):
        session.build("modelopt", session.component(text), text)
    with pytest.raises(BackendUnavailable, match=r"modelopt has no bf16 path \(it runs fp8, int8\)"):
        session.build("modelopt", alone, case.with_precision("bf16"))
