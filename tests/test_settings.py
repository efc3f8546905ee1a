"""Options validated once into Settings: the attention choice per backend, the candidate, and what rows record."""
import re

import pytest

from harness.case import Case
from harness.errors import HarnessError
from harness.memory import GiB, meminfo
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
    ("inductor=fa3,inductor=sdpa", "gives inductor two kernels, fa3 and sdpa"),
    ("=sdpa", "names no backend before '='"),
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
    assert rows["torch-fp8"].endswith(";attention=cudnn-fp8;fp8_scales=static;fp8_recipe=all-blocks;"
                                      "calibration_prompts=3")
    assert "attention=" not in rows["onnxruntime"] and "scope" not in rows["onnxruntime"]
    assert {"fp8 scales": "static", "compile scope": "forward"}.items() <= settings.summary().items()
    assert session.recorded("perf", case, "inductor", Measured).metrics() == {"median_ms": 1.0}


@pytest.mark.parametrize("values, needle", [
    ({"backends": "torch,onnxruntime", "precisions": "fp8"}, "--precisions fp8: no backend among --backends "
                                                              "torch,onnxruntime runs it; add torch-fp8"),
    ({"backends": "torch,onnxruntime", "perf_precision": "int8"}, "--perf-precision int8: no backend"),
    ({"backends": "torch,inductor", "candidate": "torch"}, "--candidate torch is the eager baseline"),
    ({"model_path": "/somewhere"}, "--model-path is read by --model-source checkpoint only"),
    ({"proxy_layers": 3}, "--proxy-layers is read by --model-source proxy only"),
    ({"results_dir": " "}, "--results-dir is empty"),
    ({"cache_dir": ""}, "--cache-dir is empty"),
    ({"parallel": "ring1"}, "--parallel ring1 splits nothing"),
    ({"steps": 1001}, "--steps 1001 must be a whole number from 1 to 1000"),
    ({"opt_level": 6}, "--opt-level 6: TensorRT's builder optimization levels are 0 to 5"),
    ({"backends": "torch,onnxruntime", "engine_weights": "full"}, "--engine-weights full: no backend among --backends "
                                                                  "torch,onnxruntime builds a TensorRT engine"),
    ({"backends": "torch,onnxruntime", "fp8_recipe": "nvidia"}, "--fp8-recipe nvidia: no backend among --backends "
                                                               "torch,onnxruntime reads it; add one of torch-fp8, "
                                                               "modelopt, tensorrt, tensorrt_rtx"),
    ({"fp8_recipe": "middle"}, "--fp8-recipe 'middle': choose one of all-blocks, nvidia"),
    ({"video_gate": 0.0}, "--video-gate 0.0 must be a finite number > 0"),
    ({"video_gate": float("nan")}, "--video-gate nan must be a finite number > 0"),
    ({"attribution": "fp8"}, "--attribution fp8: the drift attributed is eager PyTorch's against fp32"),
    ({"attribution": "fp32"}, "--attribution fp32: the drift attributed is eager PyTorch's against fp32"),
    ({"fp8_recipe": "nvidia"}, "--fp8-recipe nvidia keeps blocks 0-2 and the last 3 of each expert in high precision, "
                               "so an expert of 2 layers would quantize nothing; use --fp8-recipe all-blocks"),
])
def test_an_option_that_would_change_nothing_or_skip_everything_is_refused(values, needle):
    with pytest.raises(HarnessError, match=re.escape(needle)):
        settings_from({"device": "cpu", **values})


def test_a_cpu_run_cannot_be_held_to_more_memory_than_the_machine_has():
    """--gpu-memory names the budget a --device cpu run plans against: above the machine's memory it would switch the
    plan's refusal off and build what does not fit. `plan` (what_if) builds nothing, so it may name any card."""
    total = meminfo("MemTotal") / GiB
    with pytest.raises(HarnessError, match=re.escape(f"--gpu-memory 1e+09: a --device cpu run has this machine's "
                                                     f"memory, {total:.1f} GiB; give at most that")):
        settings_from({"device": "cpu", "gpu_memory": 1e9})
    assert settings_from({"device": "cpu", "gpu_memory": 1e9, "what_if": True}).gpu_memory == 1e9
    assert settings_from({"device": "cpu", "gpu_memory": 4}).gpu_memory == 4


def test_rows_and_the_summary_name_the_fp8_recipe_of_each_backend_that_quantizes(tmp_path):
    settings = settings_from({"backends": "torch,torch-fp8,modelopt,tensorrt", "model_source": "proxy",
                              "proxy_layers": 7, "fp8_recipe": "nvidia", "device": "cpu"})
    assert settings.backend_options.fp8_recipe == "nvidia" and settings.summary()["fp8 recipe"] == "nvidia"
    session = Session(settings, RunRecorder(tmp_path, "run-r"))
    case = Case("transformer", parse_shape("16x16x9"), "fp8", source="proxy")
    for backend in ("torch", "torch-fp8", "modelopt", "tensorrt"):
        session.record("parity", case, backend, Measured({"rel_l2": 0.01}))
    rows = {r.backend: r.versions for r in load_run(tmp_path / "run-r")}
    assert all(rows[b].endswith("fp8_recipe=nvidia;calibration_prompts=3")
               for b in ("torch-fp8", "modelopt", "tensorrt")), rows
    assert "fp8_recipe" not in rows["torch"]
    default = settings_from({"backends": "torch,modelopt", "device": "cpu"})
    assert default.backend_options.fp8_recipe == "all-blocks" and default.summary()["fp8 recipe"] == "all-blocks"


def test_a_file_where_a_folder_goes_is_refused_and_nothing_is_made(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for dest, flag in (("results_dir", "--results-dir"), ("cache_dir", "--cache-dir")):
        with pytest.raises(HarnessError, match=f"{flag} .*a-file is a file, not a folder"):
            settings_from({"device": "cpu", dest: str(blocker / "below")})
    settings = settings_from({"device": "cpu", "results_dir": str(tmp_path / "new" / "runs")})
    assert settings.results_dir == tmp_path / "new" / "runs" and not (tmp_path / "new").exists()
    assert list(tmp_path.iterdir()) == [blocker]  # the folder that proved tmp_path writable is gone again


def test_the_environment_supplies_defaults_the_options_override(tmp_path, monkeypatch):
    monkeypatch.setenv("WAN_BENCH_CACHE", str(tmp_path / "env-cache"))
    monkeypatch.setenv("WAN_MODEL_PATH", str(tmp_path / "no-checkpoint"))
    assert settings_from({"device": "cpu"}).cache_dir == tmp_path / "env-cache"
    assert settings_from({"device": "cpu", "cache_dir": str(tmp_path / "c")}).cache_dir == tmp_path / "c"
    assert settings_from({"device": "cpu"}).model_path is None, "a tiny run neither reads nor records the variable"
    with pytest.raises(HarnessError, match="no-checkpoint does not exist"):
        settings_from({"device": "cpu", "model_source": "checkpoint"})


def test_one_shape_named_twice_runs_once():
    assert settings_from({"device": "cpu", "shapes": "16x16x9,16x16x9, 16x16x9"}).shapes == (parse_shape("16x16x9"),)
