"""Shape arithmetic and validation, property-tested."""
import pytest
from hypothesis import given, strategies as st

from harness.errors import HarnessError
from harness.shapes import block_flops, parse_shape, step_split, validate

pytestmark = pytest.mark.unit

valid_side = st.integers(1, 128).map(lambda k: 16 * k)
valid_frames = st.integers(0, 255).map(lambda k: 4 * k + 1)


@given(valid_side, valid_side, valid_frames)
def test_token_count_formula(h, w, f):
    shape = validate(h, w, f)
    assert shape.tokens == ((f - 1) // 4 + 1) * (h // 16) * (w // 16)
    assert shape.latent_shape(2) == (2, 16, (f - 1) // 4 + 1, h // 8, w // 8)


@given(st.integers(1, 2048).filter(lambda v: v % 16), valid_side, valid_frames)
def test_side_not_multiple_of_16_is_rejected(bad, w, f):
    with pytest.raises(HarnessError, match="multiple of 16"):
        validate(bad, w, f)


@given(valid_side, valid_side, st.integers(2, 1021).filter(lambda f: (f - 1) % 4))
def test_frames_not_4k_plus_1_is_rejected(h, w, f):
    with pytest.raises(HarnessError, match="4k\\+1"):
        validate(h, w, f)


def test_presets_match_the_model_card():
    assert parse_shape("480p").latent_shape() == (1, 16, 21, 60, 104)
    assert parse_shape("480p").tokens == 32_760
    assert parse_shape("720p").tokens == 75_600


@pytest.mark.parametrize("spec", ["0x16x9", "16x16", "480p81", "-16x16x9", "4096x16x9"])
def test_bad_specs_raise_our_error(spec):
    with pytest.raises(HarnessError):
        parse_shape(spec)


def test_block_flops_match_facts():
    # docs/hardware.md: ~41.9 TFLOP per block at 480p, ~163 at 720p.
    assert block_flops(32_760) / 1e12 == pytest.approx(41.9, abs=0.1)
    assert block_flops(75_600) / 1e12 == pytest.approx(163.0, abs=0.5)


@pytest.mark.parametrize("steps", [1, 2, 10, 40, 50])
def test_step_split_covers_every_step(steps):
    high, low = step_split(steps)
    assert high + low == steps and high >= 1
