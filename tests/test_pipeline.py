"""The harness's own denoising loop against diffusers' WanPipeline, on the tiny source."""
import pytest
import torch

from engines.torch_eager import TorchEager
from harness.case import COMPONENTS, Case
from harness.errors import HarnessError
from harness.components import make_component
from harness.models import load_model
from harness.pipeline import (NEGATIVE_PROMPT, PROMPTS, Runners, check_finite, expert_for, generate,
                              initial_latents)
from harness.shapes import parse_shape

pytestmark = pytest.mark.unit
SHAPE = parse_shape("16x16x9")
STEPS = 4


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


def eager_runners(model) -> Runners:
    build = TorchEager().build
    return Runners(**{name: build(make_component(model, name), Case(name, SHAPE)) for name in COMPONENTS})


def diffusers_video(model, latents, calls):
    """WanPipeline's own output, counting which expert ran at each step through forward hooks."""
    hooks = [getattr(model, n).register_forward_hook(lambda *_, n=n: calls.append(n))
             for n in ("transformer", "transformer_2")]
    try:
        pipe = model.pipeline()
        pipe.set_progress_bar_config(disable=True)
        out = pipe(PROMPTS[0], negative_prompt=NEGATIVE_PROMPT, height=SHAPE.height, width=SHAPE.width,
                   num_frames=SHAPE.frames, num_inference_steps=STEPS, latents=latents.clone(), output_type="pt",
                   guidance_scale=model.guidance_scale, guidance_scale_2=model.guidance_scale_2)
    finally:
        for h in hooks:
            h.remove()
    return out.frames[0].permute(0, 2, 3, 1)  # [F, C, H, W] -> [F, H, W, C]


def test_loop_matches_wan_pipeline(tiny):
    latents = initial_latents(tiny, SHAPE, seed=0, device="cpu")
    calls = []
    expected = diffusers_video(tiny, latents, calls)
    ours = generate(tiny, eager_runners(tiny), PROMPTS[0], shape=SHAPE, steps=STEPS, latents=latents)
    assert ours.frames.shape == (SHAPE.frames, SHAPE.height, SHAPE.width, 3)
    # A few fp32 steps of [0, 1] apart, not bit-equal: diffusers un-normalises the latents in its own op order.
    torch.testing.assert_close(ours.frames, expected.float(), rtol=0, atol=1e-5)
    # CFG: each step runs the chosen expert twice (cond, uncond), in the same order as ours.
    assert calls[::2] == ours.experts and calls[1::2] == ours.experts


def test_both_experts_run_on_either_side_of_the_boundary(tiny):
    run = generate(tiny, eager_runners(tiny), PROMPTS[1], shape=SHAPE, steps=STEPS)
    assert run.experts[0] == "transformer", "the first (noisiest) step must use the high-noise expert"
    assert run.experts[-1] == "transformer_2", "the last step must use the low-noise expert"
    switch = run.experts.index("transformer_2")
    assert set(run.experts[:switch]) == {"transformer"} and set(run.experts[switch:]) == {"transformer_2"}
    assert expert_for(tiny, 875)[0] == "transformer" and expert_for(tiny, 874)[0] == "transformer_2"


def test_experts_differ(tiny):
    a = tiny.transformer.blocks[0].attn1.to_q.weight
    b = tiny.transformer_2.blocks[0].attn1.to_q.weight
    assert not torch.equal(a, b), "the two experts must have different random weights"


def test_one_batch2_forward_per_cfg_step_gives_the_same_video(tiny):
    """--cfg-batch 2 runs both CFG branches in one forward: the same function, other reduction order."""
    two_calls = generate(tiny, eager_runners(tiny), PROMPTS[0], shape=SHAPE, steps=STEPS)
    one_call = generate(tiny, eager_runners(tiny), PROMPTS[0], shape=SHAPE, steps=STEPS, cfg_batch=2)
    torch.testing.assert_close(one_call.frames, two_calls.frames, rtol=0, atol=1e-5)
    assert one_call.experts == two_calls.experts


# (component, one of its weights) -> the line's start: a NaN is blamed on the component that made it, not on a later
# one; the low-noise expert first runs at step 3 of 4 (t = 999, 900 | 750, 500).
NAN_WEIGHTS = {
    "text_encoder": ("encoder.final_layer_norm.weight", "the text encoder produced non-finite values (NaN or Inf): "),
    "transformer": ("proj_out.weight", f"the transformer expert produced non-finite values (NaN or Inf) at step 1 "
                                       f"(of {STEPS}, t=999): "),
    "transformer_2": ("proj_out.weight", f"the transformer_2 expert produced non-finite values (NaN or Inf) at step 3 "
                                         f"(of {STEPS}, t=750): "),
    "vae": ("decoder.conv_out.weight", "the VAE decoder produced non-finite values (NaN or Inf): "),
}


@pytest.mark.parametrize("component", NAN_WEIGHTS)
def test_a_nan_weight_stops_the_pipeline_at_the_component_that_made_it(component):
    """One NaN weight would otherwise run to the end and give an all-black video, reported as a result."""
    model = load_model("tiny")  # its own: the NaN must not reach the module's shared model
    weight, start = NAN_WEIGHTS[component]
    getattr(model, component).get_parameter(weight).data.view(-1)[0] = float("nan")
    with pytest.raises(HarnessError) as caught:
        generate(model, eager_runners(model), PROMPTS[0], shape=SHAPE, steps=STEPS)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(start), message


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_check_finite_names_the_step_and_timestep_only_inside_the_loop(value):
    bad = torch.tensor([0.0, value])
    with pytest.raises(HarnessError, match=r"^the scheduler step produced non-finite values \(NaN or Inf\) at step 2 "
                                           r"\(of 4, t=900\): "):
        check_finite(bad, "the scheduler step", step=2, steps=4, timestep=torch.tensor(900))
    with pytest.raises(HarnessError, match=r"^the VAE decoder produced non-finite values \(NaN or Inf\): "):
        check_finite(bad, "the VAE decoder")
    check_finite(torch.zeros(3), "the VAE decoder")  # finite: nothing to say
