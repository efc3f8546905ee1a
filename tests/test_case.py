"""What a pipeline run is judged against: which components a candidate runs, and in which precision every component
runs beside it (harness/pipeline.py Precisions)."""
import pytest

from harness.pipeline import REFERENCE, Precisions, under_test

pytestmark = pytest.mark.unit


def test_a_candidate_runs_the_experts_and_for_unquantized_precisions_the_text_encoder_never_the_vae():
    assert under_test("fp8") == under_test("int8") == ("transformer", "transformer_2")
    assert under_test("bf16") == under_test("fp16") == ("text_encoder", "transformer", "transformer_2")


def test_a_judged_pipeline_differs_from_the_fp32_reference_only_in_the_components_under_test():
    assert Precisions.judged("fp8") == Precisions("fp32", "fp8", "fp32")
    assert Precisions.judged("bf16") == Precisions("bf16", "bf16", "fp32")
    assert Precisions.judged("fp32") == REFERENCE
    # eager PyTorch stands in with bf16 where fp8 and int8 have no eager run, the rest as in the reference
    assert Precisions.judged("fp8").eager == Precisions.judged("int8").eager == Precisions("fp32", "bf16", "fp32")


def test_a_users_pipeline_runs_everything_but_the_experts_in_the_eager_precision():
    assert Precisions.as_run("fp8") == Precisions("bf16", "fp8", "bf16")
    assert Precisions.as_run("fp16").id == "fp16"
    assert Precisions.as_run("fp8").id == "te-bf16+dit-fp8+vae-bf16"


def test_one_part_at_a_time_for_the_attribution():
    assert Precisions.only("vae_decoder", "bf16") == Precisions("fp32", "fp32", "bf16")
    assert Precisions.only("experts", "bf16").of("transformer_2") == "bf16"
    assert Precisions.only("text_encoder", "fp16").of("vae_decoder") == "fp32"
