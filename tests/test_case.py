"""What a case is judged against (harness/case.py)."""
import pytest

from harness.case import quality_reference

pytestmark = pytest.mark.unit


def test_fp8_and_int8_are_judged_against_the_bf16_eager_video_and_the_rest_against_fp32():
    assert quality_reference("fp8") == quality_reference("int8") == "bf16"
    assert [quality_reference(p) for p in ("fp32", "fp16", "bf16")] == ["fp32"] * 3
