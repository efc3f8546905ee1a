"""Options validated once into Settings: the attention choice per backend, the candidate, and what rows record."""
import pytest

from harness.case import Case
from harness.errors import HarnessError
from harness.results import Measured, RunRecorder, load_run
from harness.session import Session
from harness.settings import settings_from
from harness.shapes import parse_shape

pytestmark = pytest.mark.unit
BACKENDS = "torch,inductor,torch-fp8"


def attention(text: str | None, backends: str = BACKENDS) -> dict[str, str]:
    return dict(settings_from({"backends": backends, "attention": text, "device": "cpu"}).attention)


def test_every_backend_with_a_kernel_choice_records_its_kernel_by_default():
    assert attention(None) == {"torch": "sdpa", "inductor": "sdpa", "torch-fp8": "cudnn-fp8"}
    assert attention(None, "torch,onnxruntime,tensorrt") == {"torch": "sdpa"}


def test_a_bare_kernel_goes_to_each_backend_of_its_precision():
    assert attention("fa3,fa3-fp8") == {"torch": "sdpa", "inductor": "fa3", "torch-fp8": "fa3-fp8"}
    assert attention("fa3")["torch-fp8"] == "cudnn-fp8", "a bf16 kernel does not change the fp8 backend"
    assert attention("torch-fp8=fa3")["torch-fp8"] == "fa3", "backend=kernel sets bf16 attention beside fp8 GEMMs"


@pytest.mark.parametrize("text, needle", [
    ("torch=fa3", "the eager baseline keeps stock SDPA"),
    ("flash4", "unknown kernel 'flash4'"),
    ("inductor=cudnn-fp8", "inductor takes sdpa, fa3"),
    ("tensorrt=fa3", "tensorrt is not among --backends"),
])
def test_impossible_choices_are_one_clear_error(text, needle):
    with pytest.raises(HarnessError, match=needle):
        attention(text)


def test_an_fp8_kernel_without_an_fp8_backend_says_what_to_do():
    with pytest.raises(HarnessError, match="no backend among --backends torch,inductor runs fp8 attention"):
        attention("fa3-fp8", "torch,inductor")


def test_default_precisions_add_the_quantized_ones_a_backend_runs():
    def precisions(backends: str) -> tuple[str, ...]:
        return settings_from({"backends": backends, "device": "cpu"}).precisions

    assert precisions("torch,inductor") == ("fp32", "fp16", "bf16")
    assert precisions("torch,torch-fp8") == ("fp32", "fp16", "bf16", "fp8")
    assert precisions("torch,modelopt") == ("fp32", "fp16", "bf16", "fp8", "int8")


def test_candidate_defaults_and_must_be_a_backend():
    assert settings_from({"backends": "torch,tensorrt", "device": "cpu"}).candidate == "tensorrt"
    assert settings_from({"backends": "torch,inductor", "device": "cpu"}).candidate == "inductor"
    assert settings_from({"backends": "torch", "device": "cpu"}).candidate is None
    with pytest.raises(HarnessError, match="--candidate torch-fp8 is not among --backends"):
        settings_from({"backends": "torch,inductor", "candidate": "torch-fp8", "device": "cpu"})
    with pytest.raises(HarnessError, match="unknown backend 'foo'"):
        settings_from({"backends": "torch,foo", "device": "cpu"})


def test_rows_record_the_attention_kernel_and_the_options_their_backend_reads(tmp_path):
    settings = settings_from({"backends": BACKENDS, "attention": "fa3", "compile_scope": "forward",
                              "fp8_scales": "static", "device": "cpu"})
    session = Session(settings, RunRecorder(tmp_path, "run-x"))
    case = Case("cfg_step", parse_shape("16x16x9"), "bf16")
    for backend in ("inductor", "torch-fp8", "onnxruntime"):
        session.record("perf", case, backend, Measured({"median_ms": 1.0}))
    rows = {r.backend: r.versions for r in load_run(tmp_path / "run-x")}
    assert rows["inductor"].endswith(";attention=fa3;compile_scope=forward")
    assert rows["torch-fp8"].endswith(";attention=cudnn-fp8;fp8_scales=static")
    assert "attention=" not in rows["onnxruntime"] and "scope" not in rows["onnxruntime"]
    assert {"fp8 scales": "static", "compile scope": "forward"}.items() <= settings.summary().items()
    assert session.recorded("perf", case, "inductor", Measured).metrics() == {"median_ms": 1.0}
