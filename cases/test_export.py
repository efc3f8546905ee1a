"""ONNX export of every tiny component, proven by ONNX Runtime and by TensorRT-RTX's own parser and builder.

The matrix shares one disk cache (--cache-dir), so a rerun only re-validates; cache behaviour itself is
checked in a private temporary cache so the outcomes recorded there are this run's own.
"""
from __future__ import annotations

import logging
import re

import pytest
import torch

from engines.base import BackendUnavailable, get_backend
from engines.tensorrt import TensorRT, TensorRTRTX, engine_spec, import_trt, profile_from
from harness.cache import DiskCache, entry_key, spec_hash
from harness.case import COMPONENTS, Case
from harness.components import example_inputs, make_component
from harness.errors import HarnessError
from harness.export import (OPSET, assert_plain_types, default_exporter, export_case, export_friendly, export_spec,
                             validate_graph)
from harness.shapes import parse_shape

pytestmark = pytest.mark.export

SHAPE = parse_shape("16x16x9")
MATRIX = [Case(c, SHAPE, p, dynamic=d) for c in COMPONENTS for p in ("fp32", "fp16", "bf16") for d in (False, True)]
TABLE_HEADER = ("| component | precision | shape mode | export s | ORT rel err | TRT layers | engine MB | build s |\n"
                "|---|---|---|---|---|---|---|---|\n")


@pytest.fixture(scope="module")
def disk_cache(cache_dir) -> DiskCache:
    return DiskCache(cache_dir)


@pytest.fixture(scope="module")
def cpu_models(models):
    return lambda dtype=torch.float32: models.get(dtype, device="cpu")


@pytest.fixture(scope="module")
def rtx(cpu_models, cache_dir):
    """The tensorrt_rtx backend per precision; the build must work here (FACTS.md §1), so no skip."""
    backend = TensorRTRTX(cache_dir=cache_dir)
    ok, reason = backend.can_build()
    assert ok, f"TensorRT-RTX must build engines on this machine: {reason}"
    return lambda dtype: TensorRTRTX(model=cpu_models(dtype), cache_dir=cache_dir)


@pytest.fixture(scope="module")
def export_table(request, recorder):
    """Collects a table line and the engine's layer summary per matrix case; written to the run
    folder's export-cpu.md when the module ends (results/export-cpu.md is a curated copy of one: a
    test run never rewrites a committed file)."""
    rows: dict[str, tuple[str, object]] = {}
    yield rows
    if rows:
        from harness.machine import device_name, versions_string
        from harness.results import atomic_write_text

        text = (f"# ONNX export and TensorRT-RTX build on the CPU (tiny source, {SHAPE.id})\n\n"
                f"Command: `pytest -m export`; device: {device_name('cpu')}; {versions_string()}\n\n"
                + TABLE_HEADER + "".join(rows[c.id][0] for c in MATRIX if c.id in rows)
                + _layer_notes([rows[c.id] for c in MATRIX if c.id in rows]))
        recorder.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(recorder.path / "export-cpu.md", text)


def _short(reason: str) -> str:
    """ORT's refusal without the cache path, for a table cell."""
    return re.sub(r"Load model from \S+ failed:", "", reason.split(": ", 1)[-1]).replace("|", "/")


def _layer_notes(rows) -> str:
    """Which TensorRT layer kinds each component's ops became, and any plugin layers (none expected)."""
    kinds: dict[str, set[str]] = {}
    plugins: dict[str, set[str]] = {}
    for line, engine in rows:
        component = line.split("|")[1].strip()
        kinds.setdefault(component, set()).update(engine.layer_types)
        plugins.setdefault(component, set()).update(engine.plugin_layers)
    text = "\n## How TensorRT-RTX took each component's ops (from the parsed networks)\n\n"
    for component, names in kinds.items():
        found = ", ".join(sorted(plugins[component])) or "none"
        text += f"- {component}: plugin layers: {found}; layer kinds: {', '.join(sorted(names))}\n"
    return text


@pytest.mark.parametrize("case", MATRIX, ids=[c.id for c in MATRIX])
def test_export_check_and_trt_build(case, cpu_models, disk_cache, rtx, record, export_table):
    model = cpu_models(case.dtype)
    graph = export_case(model, case, disk_cache)
    check = validate_graph(graph, model, cpu_models())
    assert check, str(check)
    if case.dynamic:
        assert check.parity_skipped or len(check.parity) == 2, "a dynamic graph is checked at two shapes"
    _, engine = rtx(case.dtype).build_engine(case)
    assert engine.layers > 0 and engine.size_bytes > 0, str(engine)
    metrics = {"export_s": graph.export_s, "ort_rel_l2": check.worst_rel_l2, "trt_layers": engine.layers,
               "engine_mb": engine.size_bytes / 2 ** 20, "build_s": engine.build_s}
    record("export", case, "tensorrt_rtx", metrics, passed={"ort_rel_l2": bool(check)})
    ort = f"{check.worst_rel_l2:.2e}" if check.parity else f"skipped: {_short(check.parity_skipped)}"
    plugins = f" (plugins: {', '.join(engine.plugin_layers)})" if engine.plugin_layers else ""
    export_table[case.id] = (f"| {case.component} | {case.precision} | {'dynamic' if case.dynamic else 'static'} | "
                             f"{graph.export_s:.2f} | {ort} | {engine.layers}{plugins} | "
                             f"{engine.size_bytes / 2 ** 20:.2f} | {engine.build_s:.2f} |\n", engine)


def test_second_export_is_a_cache_hit(cpu_models, tmp_path, record):
    cache = DiskCache(tmp_path)
    case = Case("text_encoder", SHAPE)
    first = export_case(cpu_models(), case, cache)
    second = export_case(cpu_models(), case, cache)
    assert cache.outcomes("onnx", first.key) == ["miss", "hit"]
    assert second.hit and second.path == first.path
    record("export", case, "onnx", {"export_s": first.fetch_s, "cache_hit_s": second.fetch_s,
                                    "cache_speedup": first.fetch_s / max(second.fetch_s, 1e-9)})


def test_truncated_cache_file_is_rebuilt(cpu_models, tmp_path, caplog):
    cache = DiskCache(tmp_path)
    case = Case("text_encoder", SHAPE)
    graph = export_case(cpu_models(), case, cache)
    data = graph.path.read_bytes()
    graph.path.write_bytes(data[: len(data) // 3])  # truncated on purpose
    with caplog.at_level(logging.WARNING, logger="harness.cache"):
        again = export_case(cpu_models(), case, cache)
    assert cache.outcomes("onnx", graph.key) == ["miss", "rebuild"]
    assert "rebuilding" in caplog.text and "bytes, expected" in caplog.text
    assert again.path.read_bytes() == data and validate_graph(again, cpu_models())


def test_engine_cache_hit_and_key_changes(cpu_models, tmp_path):
    cache = DiskCache(tmp_path)
    backend = TensorRTRTX(model=cpu_models(), cache_dir=tmp_path)
    backend.cache = cache
    case = Case("text_encoder", SHAPE)
    graph, first = backend.build_engine(case)
    _, second = backend.build_engine(case)
    assert cache.outcomes("engines", first.key) == ["miss", "hit"] and second.hit
    names = make_component(cpu_models(), "text_encoder").input_names
    inputs = example_inputs(cpu_models(), case)
    static = profile_from(names, [inputs])
    wider = profile_from(names, [inputs, tuple(t[:, :64] for t in inputs)])
    base = engine_spec("tensorrt_rtx", "1.7.1.116", graph.fingerprint, [static])
    fp16 = case.with_precision("fp16")
    fp16_inputs = example_inputs(cpu_models(torch.float16), fp16)
    fp16_fingerprint = spec_hash(export_spec(make_component(cpu_models(torch.float16), "text_encoder"), fp16,
                                             "tiny-weights", OPSET, default_exporter(fp16), fp16_inputs))
    assert fp16_fingerprint != spec_hash(export_spec(make_component(cpu_models(), "text_encoder"), case,
                                                     "tiny-weights", OPSET, default_exporter(case), inputs))
    variants = [engine_spec("tensorrt_rtx", "1.7.1.116", graph.fingerprint, [wider]),
                engine_spec("tensorrt_rtx", "1.8.0.0", graph.fingerprint, [static]),
                engine_spec("tensorrt_rtx", "1.7.1.116", fp16_fingerprint, [static])]
    keys = {entry_key(case.id, spec) for spec in [base, *variants]}
    assert len(keys) == 4, "profile, TensorRT version and precision must each change the engine key"
    assert static.static and not wider.static


@pytest.mark.parametrize("bad", ["unknown_component", "bad_shape"])
def test_bad_input_is_a_harness_error(bad):
    with pytest.raises(HarnessError, match="unknown component|not a multiple of 16"):
        Case("vae_encoder", SHAPE) if bad == "unknown_component" else Case("transformer", parse_shape("20x16x9"))


def test_float64_graph_is_refused(tmp_path):
    class Widening(torch.nn.Module):
        def forward(self, x):
            return (x.double() * 2).float()

    path = tmp_path / "wide.onnx"
    torch.onnx.export(Widening(), (torch.ones(2),), str(path), dynamo=False, opset_version=20)
    with pytest.raises(ValueError, match="float64"):
        assert_plain_types(path)


def test_export_patches_are_restored():
    forward = torch.nn.RMSNorm.forward
    with export_friendly():
        assert torch.nn.RMSNorm.forward is not forward
    assert torch.nn.RMSNorm.forward is forward


def test_rms_norm_decomposition_keeps_the_math():
    norm = torch.nn.RMSNorm(24, eps=1e-6).eval()
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(2, 7, 24)
    expected = norm(x)
    with export_friendly():
        assert torch.allclose(norm(x), expected, rtol=1e-6, atol=1e-6)


def test_onnxruntime_backend_runs_the_exported_graph(cpu_models, cache_dir):
    case = Case("text_encoder", SHAPE)
    component = make_component(cpu_models(), "text_encoder")
    runner = get_backend("onnxruntime", model=cpu_models(), cache_dir=cache_dir).build(component, case)
    inputs = example_inputs(cpu_models(), case)
    with torch.no_grad():
        expected = component.module(*inputs)
    assert torch.allclose(runner(*inputs), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.unit
def test_onnx_backends_without_a_model_skip_with_the_reason():
    component_case = Case("text_encoder", SHAPE)
    with pytest.raises(BackendUnavailable, match="needs the model"):
        get_backend("onnxruntime").build(None, component_case)


@pytest.mark.unit
def test_available_reasons():
    module, reason = import_trt("tensorrt_no_such_module")
    assert module is None and reason.startswith("tensorrt_no_such_module not importable:")
    ok, reason = TensorRT().available()
    if import_trt("tensorrt")[0] is None:
        assert not ok and reason.startswith("tensorrt not importable:")
    ok, reason = TensorRTRTX().available()
    if not torch.cuda.is_available():
        assert not ok and "build-only" in reason and "no CUDA device" in reason
    elif torch.cuda.get_device_capability() == (9, 0):
        assert not ok and reason.startswith("TensorRT-RTX cannot run on compute capability 9.0")


@pytest.mark.gpu
@pytest.mark.parametrize("backend_cls", [TensorRT, TensorRTRTX], ids=["tensorrt", "tensorrt_rtx"])
@pytest.mark.parametrize("cuda_graph", [False, True], ids=["eager-enqueue", "cuda-graph"])
def test_engine_runner_matches_eager(backend_cls, cuda_graph, models, cache_dir):
    ok, reason = backend_cls().available()
    if not ok:
        pytest.skip(f"{backend_cls.name} unavailable: {reason}")
    model = models.get(torch.float32, device="cuda")
    case = Case("transformer", SHAPE)
    component = make_component(model, case.component)
    runner = backend_cls(model=model, cache_dir=cache_dir, cuda_graph=cuda_graph).build(component, case)
    inputs = example_inputs(model, case, device="cuda")
    with torch.no_grad():
        expected = component.module(*inputs)
    for _ in range(2):  # the second call reuses the output buffer (and replays the graph)
        assert torch.allclose(runner(*inputs), expected, rtol=1e-3, atol=1e-3)
