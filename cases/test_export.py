"""ONNX export of every component, proven by ONNX Runtime and by TensorRT-RTX's own parser and builder.

The matrix shares one disk cache (--cache-dir), so a rerun only re-validates; cache behaviour itself is
checked in tests/test_cache.py, in a private temporary cache so the outcomes recorded there are that test's own.
"""
from __future__ import annotations

import collections
import re

import pytest
import torch

from harness.case import COMPONENTS, QUANTIZED, Case, is_dit, is_quantized
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
