"""The parity judge catches what it must (a 1e-2 perturbation, NaN/Inf) and passes eager vs eager."""
import math
import re

import pytest
import torch

from engines.torch_eager import TorchEager
from harness.case import Case
from harness.compare import compare, drift_tolerance, judge_parity, min_cosine, rel_l2
from harness.components import make_component
from harness.errors import HarnessError
from harness.models import load_model
from harness.shapes import parse_shape
from harness.thresholds import thresholds

pytestmark = pytest.mark.unit
SHAPE = parse_shape("16x16x9")
# The one message format: "<n> of <N> elements mismatch (<share>; ...), <k> non-finite; worst at [i, ...]:
# actual <a> vs expected <e>; rel L2 <r> needs tolerance >= <r>, allowed <t>; ..."
MESSAGE = re.compile(r"parity FAILED: [\d,]+ of [\d,]+ elements mismatch \(\d+\.\d+%; .*\), [\d,]+ non-finite; "
                     r"worst at \[[\d, ]+\]: actual \S+ vs expected \S+; rel L2 \S+ needs tolerance >= \S+, "
                     r"allowed \S+; ")


@pytest.fixture(scope="module")
def dit_outputs():
    """Tiny DiT outputs: fp32 reference, a second fp32 eager run, and eager fp16 and bf16 (same weights up to rounding)."""
    out = {}
    for precision, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        model = load_model("tiny", dtype=dtype)
        case = Case("transformer", SHAPE, precision)
        runner = TorchEager().build(make_component(model, "transformer"), case)
        out[precision] = runner(*make_component(model, "transformer").inputs(case))
        if precision == "fp32":
            out["fp32_again"] = runner(*make_component(model, "transformer").inputs(case))
    return out


def perturbed(output: torch.Tensor, rel: float, seed: int = 0) -> torch.Tensor:
    """`output` plus seeded noise whose L2 norm is `rel` times the output's: a broken runner's result."""
    noise = torch.randn(output.shape, generator=torch.Generator().manual_seed(seed)).to(output.dtype)
    return output + noise * (rel * output.float().norm() / noise.float().norm()).to(output.dtype)


def test_eager_vs_eager_passes(dit_outputs):
    result = compare(dit_outputs["fp32_again"], dit_outputs["fp32"], tolerance=drift_tolerance(0.0, "fp32"))
    assert result, result.message()
    assert result.rel_l2 == 0.0 and result.max_abs == 0.0 and result.mismatched == 0
    assert result.cosine == pytest.approx(1.0)


def test_one_percent_perturbation_fails_at_fp32_with_the_fixed_message(dit_outputs):
    reference = dit_outputs["fp32"]
    eager_error = rel_l2(dit_outputs["fp32_again"], reference)
    tolerance = drift_tolerance(eager_error, "fp32")
    result = compare(perturbed(reference, 1e-2), reference, tolerance=tolerance)
    assert not result
    assert result.rel_l2 == pytest.approx(1e-2, rel=1e-3)
    assert MESSAGE.match(result.message()), result.message()
    assert result.mismatched > 0 and 0 < result.mismatched_share <= 1
    w = result.worst_index
    assert result.worst_actual == pytest.approx(float(perturbed(reference, 1e-2)[w]))
    assert result.worst_expected == pytest.approx(float(reference[w]))


def test_one_percent_perturbation_fails_at_fp16(dit_outputs):
    reference, eager = dit_outputs["fp32"], dit_outputs["fp16"]
    tolerance = drift_tolerance(rel_l2(eager, reference), "fp16")
    assert compare(eager, reference, tolerance=tolerance), "eager fp16 must pass its own band"
    result = compare(perturbed(eager, 1e-2), reference, tolerance=tolerance)
    assert not result, result.message()


def test_bf16_band_is_wider_than_a_one_percent_perturbation(dit_outputs):
    """At bf16 parity cannot catch 1e-2: eager bf16 already drifts ~6e-3 from fp32 on the tiny DiT, so
    k=3 allows ~1.8e-2 (torch/_dynamo/utils.py::same). This pins that known limit so a threshold change
    that alters it is seen; the quality cases and fp32/fp16 parity are what catch such a slip."""
    reference, eager = dit_outputs["fp32"], dit_outputs["bf16"]
    eager_error = rel_l2(eager, reference)
    tolerance = drift_tolerance(eager_error, "bf16")
    assert 1e-3 < eager_error < 1e-2
    assert compare(perturbed(eager, 1e-2), reference, tolerance=tolerance)
    assert not compare(perturbed(eager, 3e-2), reference, tolerance=tolerance)


def test_fp8_band_hides_a_one_percent_slip_and_catches_three(dit_outputs):
    """torch-fp8's error is 3.2x eager bf16's (proxy, H100: 0.0195 vs 0.0061), and its band is k x bf16's
    drift + 0.01. An independent 1e-2 slip beside that error passes, as at bf16; 3e-2 fails. Pins the
    limit (harness/thresholds.toml [parity.fp8]) so a threshold change that moves it is seen."""
    reference, eager = dit_outputs["fp32"], dit_outputs["bf16"]
    eager_error = rel_l2(eager, reference)
    tolerance = drift_tolerance(eager_error, "fp8")
    fp8_like = perturbed(reference, 3.2 * eager_error, seed=2)
    assert compare(fp8_like, reference, tolerance=tolerance), "an fp8-sized error must pass its band"
    assert compare(perturbed(fp8_like, 1e-2, seed=3), reference, tolerance=tolerance)
    assert not compare(perturbed(fp8_like, 3e-2, seed=3), reference, tolerance=tolerance)


def test_judge_parity_carries_its_band_and_the_eager_error(dit_outputs):
    """The verdict a case asserts is the one its rows record: band, eager error and per-metric checks."""
    reference, eager = dit_outputs["fp32"], dit_outputs["bf16"]
    slipped = judge_parity(perturbed(eager, 3e-2, seed=4), reference, "bf16", eager)
    assert not slipped and slipped.eager_rel_l2 == rel_l2(eager, reference)
    assert slipped.tolerance == drift_tolerance(rel_l2(eager, reference), "bf16")
    assert slipped.checks() == {"rel_l2": False, "cosine": None}
    assert slipped.thresholds()["rel_l2"] == slipped.tolerance and "eager_rel_l2" in slipped.metrics()
    exact = judge_parity(dit_outputs["fp32_again"], reference, "fp32")
    assert exact and exact.eager_rel_l2 is None and exact.tolerance == drift_tolerance(0.0, "fp32")
    fp8 = judge_parity(perturbed(reference, 0.02, seed=5), reference, "fp8", eager)
    assert fp8 and fp8.min_cosine == min_cosine("fp8") and fp8.checks()["cosine"]


def test_a_nan_in_eager_fails_the_band_too(dit_outputs):
    reference, eager = dit_outputs["fp32"], dit_outputs["bf16"].clone()
    eager[0, 0, 0, 0, 0] = math.nan
    assert not judge_parity(dit_outputs["bf16"], reference, "bf16", eager)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_always_fails(dit_outputs, bad):
    reference = dit_outputs["fp32"]
    broken = reference.clone()
    broken[0, 3, 1, 1, 0] = bad
    result = compare(broken, reference, tolerance=math.inf)
    assert not result
    assert result.nonfinite == 1 and result.worst_index == (0, 3, 1, 1, 0)
    assert "1 non-finite" in result.message()


def test_fp8_band_has_a_cosine_floor():
    assert min_cosine("fp8") == 0.99 and min_cosine("bf16") is None
    expected = torch.ones(1000)
    flipped = expected.clone()
    flipped[:10] = -1.0  # rel L2 0.2 but cosine 0.98: the cosine floor alone fails it
    assert compare(flipped, expected, tolerance=1.0)
    assert not compare(flipped, expected, tolerance=1.0, min_cosine=min_cosine("fp8"))


@pytest.mark.parametrize("damage, needle", [(b"[parity\n", "TOMLDecodeError"), (b"\xff\xfe", "UnicodeDecodeError")])
def test_a_damaged_thresholds_file_is_one_line_naming_it(tmp_path, damage, needle):
    path = tmp_path / "thresholds.toml"
    path.write_bytes(damage)
    with pytest.raises(HarnessError) as error:
        thresholds(path)
    message = str(error.value)
    assert message.startswith(f"{path}: unreadable ({needle}") and message.endswith("restore it from git"), message
    assert "\n" not in message
