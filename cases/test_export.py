"""ONNX export of every component, proven by ONNX Runtime and by TensorRT-RTX's own parser and builder.

The matrix shares one disk cache (--cache-dir), so a rerun only re-validates; cache behaviour itself is
checked in a private temporary cache so the outcomes recorded there are this run's own.
"""
from __future__ import annotations

import collections
import logging
import re

import pytest
import torch

from engines.tensorrt import TensorRT, TensorRTRTX, engine_spec, import_trt, profile_from
from harness.backends import make_backend
from harness.cache import DiskCache, entry_key, spec_hash
from harness.case import COMPONENTS, QUANTIZED, Case, is_dit, is_quantized
from harness.errors import HarnessError
from harness.export import OPSET, assert_plain_types, default_exporter, export_case, export_friendly, export_spec
from harness.results import Measured
from harness.shapes import parse_shape

pytestmark = pytest.mark.export

SHAPE = parse_shape("16x16x9")
EXPORT_PRECISIONS = ("fp32", "fp16", "bf16", *QUANTIZED)
TABLE_HEADER = ("| component | precision | shape mode | shape | export s | ORT rel err | TRT layers | plan weights | "
                "engine MB | build s | target | block GEMM FLOPs in fp8/int8 | self-attention |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")


def pytest_generate_tests(metafunc):
    """The export matrix: every component x the run's shapes x each exportable precision x static/dynamic;
    fp8/int8 for the DiT experts at static shapes (ModelOpt's Q/DQ export is TorchScript's)."""
    if "export_case_" in metafunc.fixturenames:
        s = metafunc.config.wan_session.settings
        cases = [Case(c, shape, p, source=s.source, dynamic=d) for c in COMPONENTS for shape in s.shapes
                 for p in s.precisions if p in EXPORT_PRECISIONS for d in (False, True)
                 if not is_quantized(p) or (is_dit(c) and not d)]
        metafunc.parametrize("export_case_", cases, ids=[c.id for c in cases])


@pytest.fixture(scope="module")
def export_table(session):
    """Collects a table line and the engine's layer summary per matrix case; written to the run
    folder's export-cpu.md when the module ends (results/export-cpu.md is a curated copy of one: a
    test run never rewrites a committed file)."""
    rows: dict[str, tuple[Case, str, object]] = {}
    yield rows
    if rows:
        from harness.machine import device_name, versions_string
        from harness.cache import atomic_write_text

        s = session.settings
        text = (f"# ONNX export and TensorRT-RTX build ({s.source} source, {', '.join(x.id for x in s.shapes)})\n\n"
                f"Command: `{session.recorder.command}`; device: {device_name(s.device)}; {versions_string()}\n\n"
                + TABLE_HEADER + "".join(line for _, line, _ in rows.values())
                + _layer_notes([(case, engine) for case, _, engine in rows.values()]))
        session.recorder.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(session.recorder.path / "export-cpu.md", text)


def _short(reason: str) -> str:
    """ORT's refusal without the cache path, for a table cell."""
    return re.sub(r"Load model from \S+ failed:", "", reason.split(": ", 1)[-1]).replace("|", "/")


def _layer_notes(rows) -> str:
    """Which TensorRT layer kinds each component's ops became, and any plugin layers (none expected)."""
    kinds: dict[str, set[str]] = {}
    plugins: dict[str, set[str]] = {}
    for case, engine in rows:
        kinds.setdefault(case.component, set()).update(engine.layer_types)
        plugins.setdefault(case.component, set()).update(engine.plugin_layers)
    text = "\n## How TensorRT-RTX took each component's ops (from the parsed networks)\n\n"
    for component, names in kinds.items():
        found = ", ".join(sorted(plugins[component])) or "none"
        text += f"- {component}: plugin layers: {found}; layer kinds: {', '.join(sorted(names))}\n"
    return text


def test_export_check_and_trt_build(export_case_, session, export_table):
    """Every graph passes the checker and ONNX Runtime, and TensorRT-RTX must build it here: no skip."""
    case = export_case_
    graph, check = session.checked_export(case)
    assert check, str(check)
    if case.dynamic:
        assert check.parity_skipped or len(check.parity) == 2, "a dynamic graph is checked at two shapes"
    _, engine = session.build_engine("tensorrt_rtx", case)
    assert engine.layers > 0 and engine.size_bytes > 0, str(engine)
    assert all(engine.checks().values()), f"not a {case.precision} engine: {engine}"
    session.record("export", case, "onnx", check)
    session.record("export", case, "tensorrt_rtx", engine)
    ort = f"{check.worst_rel_l2:.2e}" if check.parity else f"skipped: {_short(check.parity_skipped)}"
    plugins = f" (plugins: {', '.join(engine.plugin_layers)})" if engine.plugin_layers else ""
    export_table[case.id] = (case, f"| {case.component} | {case.precision} | {'dynamic' if case.dynamic else 'static'} | "
                                   f"{case.shape.id} | "
                                   f"{graph.export_s:.2f} | {ort} | {engine.layers}{plugins} | {engine.weights} | "
                                   f"{engine.size_bytes / 2 ** 20:.2f} | {engine.build_s:.2f} | {engine.target} | "
                                   f"{_quantized_columns(engine)} |\n", engine)


def _quantized_columns(engine) -> str:
    """A quantized engine's proof as two table cells: the block GEMM FLOPs share, and how self-attention ran."""
    if not is_quantized(engine.precision):
        return "- | -"
    proof = engine.proof()
    kinds = collections.Counter(proof.self_attention)
    attention = "fused fp8 MHA" if proof.fused_self_attention else ", ".join(f"{n} x {k}" for k, n in kinds.items())
    return f"{proof.share:.1%} | {attention}"


@pytest.fixture
def tiny():
    """The tiny model's text encoder case, whatever --model-source the run uses: the cache checks need a small graph."""
    from harness.components import make_component
    from harness.models import load_model

    model = load_model("tiny")
    return Case("text_encoder", SHAPE), lambda precision="fp32": make_component(
        model if precision == "fp32" else load_model("tiny", dtype=torch.float16), "text_encoder")


def test_second_export_is_a_cache_hit(tiny, tmp_path):
    case, component = tiny
    cache = DiskCache(tmp_path)
    first = export_case(component(), case, cache)
    second = export_case(component(), case, cache)
    assert cache.outcomes("onnx", first.key) == ["miss", "hit"]
    assert second.hit and second.path == first.path and second.fetch_s < first.fetch_s


def test_truncated_cache_file_is_rebuilt(tiny, tmp_path, caplog):
    case, component = tiny
    cache = DiskCache(tmp_path)
    graph = export_case(component(), case, cache)
    data = graph.path.read_bytes()
    graph.path.write_bytes(data[: len(data) // 3])  # truncated on purpose
    with caplog.at_level(logging.WARNING, logger="harness.cache"):
        again = export_case(component(), case, cache)
    assert cache.outcomes("onnx", graph.key) == ["miss", "rebuild"]
    assert "rebuilding" in caplog.text and "bytes, expected" in caplog.text
    assert again.path.read_bytes() == data


def test_engine_cache_hit_and_key_changes(tiny, tmp_path):
    from engines.tensorrt import TensorRTRTXBuilder

    case, component = tiny
    cache = DiskCache(tmp_path)
    builder = TensorRTRTXBuilder(cache=cache)
    graph, first = builder.build(component(), case)
    _, second = builder.build(component(), case)
    assert cache.outcomes("engines", first.key) == ["miss", "hit"] and second.hit
    inputs = component().inputs(case)
    names = component().input_names
    static = profile_from(names, [inputs])
    wider = profile_from(names, [inputs, tuple(t[:, :64] for t in inputs)])
    base = engine_spec("tensorrt_rtx", "1.7.1.116", graph.fingerprint, [static])
    fp16 = case.with_precision("fp16")
    fp16_fingerprint = spec_hash(export_spec(component("fp16"), fp16, "tiny-weights", OPSET, default_exporter(fp16),
                                             component("fp16").inputs(fp16)))
    assert fp16_fingerprint != spec_hash(export_spec(component(), case, "tiny-weights", OPSET, default_exporter(case),
                                                     inputs))
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


def test_onnxruntime_backend_runs_the_exported_graph(tiny, tmp_path):
    from harness.backends import BackendOptions

    case, component = tiny
    runner = make_backend("onnxruntime", BackendOptions(cache_dir=tmp_path)).build(component(), case)
    inputs = component().inputs(case)
    with torch.no_grad():
        expected = component().module(*inputs)
    assert torch.allclose(runner(*inputs), expected, rtol=1e-4, atol=1e-5)


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
@pytest.mark.parametrize("engine_backend", ["tensorrt", "tensorrt_rtx"])
@pytest.mark.parametrize("cuda_graph", [False, True], ids=["eager-enqueue", "cuda-graph"])
@pytest.mark.parametrize("engine_weights", ["stripped", "inputs", "full"])
def test_engine_runner_matches_eager(engine_backend, cuda_graph, engine_weights, session):
    """A refitted (stripped), a bound (inputs) and a full plan each compute the eager output; the load time of
    the weights is recorded (export table, weights_s)."""
    case = Case("transformer", SHAPE)
    options = dict(cuda_graph=cuda_graph, engine_weights=engine_weights)
    session.backend(engine_backend, **options)  # unavailable here (no runnable TensorRT): skips with why
    component = session.component(case, device="cuda")
    runner = session.build(engine_backend, component, case, **options)
    inputs = component.inputs(case)
    with torch.no_grad():
        expected = component.module(*inputs)
    for _ in range(2):  # the second call reuses the output buffer (and replays the graph)
        assert torch.allclose(runner(*inputs), expected, rtol=1e-3, atol=1e-3)
    if not cuda_graph:
        session.record("export", case, engine_backend, Measured({f"weights_s_{engine_weights}": runner.weights_s}))
