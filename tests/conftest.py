"""Fixtures several of the harness's tests share (the root conftest.py applies here as well)."""
import pytest
import torch

from harness.case import Case
from harness.shapes import parse_shape


@pytest.fixture
def tiny():
    """The tiny model's text encoder case, whatever --model-source the run uses: the cache checks need a small graph."""
    from harness.components import make_component
    from harness.models import load_model

    model = load_model("tiny")
    return Case("text_encoder", parse_shape("16x16x9")), lambda precision="fp32": make_component(
        model if precision == "fp32" else load_model("tiny", dtype=torch.float16), "text_encoder")
