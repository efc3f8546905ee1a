"""Real-width export and TensorRT-RTX build with bounded host memory: an A14B expert slice of --scale-layers layers.

The expert is a skeleton here, so this process never holds its weights: export builds it from its recipe in a
process of its own, and a build that holds the weights runs in another. Each stage's peak resident memory is
measured where it ran and judged against the weights ([scale] in harness/thresholds.toml); a weight-stripped plan
(the default, --engine-weights) is judged by its size. The rows go to the export table, and the stage table to
scale-cpu.md in the run folder (results/scale-cpu.md is a curated copy of two runs).

Skipped unless --scale-layers asks for it: 10 layers are 7 GB of bf16 weights and take minutes on 2 cores.
"""
from __future__ import annotations

import pytest
import torch

from engines.tensorrt import TensorRTRTXBuilder
from harness.cache import atomic_write_text
from harness.case import Case
from harness.components import proxy_expert
from harness.memory import GiB, StageTable, StageUsage, resident_bytes
from harness.shapes import parse_shape
from harness.thresholds import thresholds

pytestmark = [pytest.mark.export, pytest.mark.slow]

# Latents 1x16x2x8x8 and 512 text tokens: small activations, so the weights are what the memory holds.
SHAPE = parse_shape("64x64x5")
HEADER = ("| process | stage | s | peak GiB | anon GiB | file GiB | x weights |\n"
          "|---|---|---|---|---|---|---|\n")


@pytest.fixture(scope="module")
def scale_layers(request) -> int:
    layers = request.config.getoption("wan_scale_layers")
    if not layers:
        pytest.skip("the real-width scale run is asked for with --scale-layers N (10: 7 GB of bf16 weights, "
                    "minutes on 2 cores; peak host memory about 1.2x the weights)")
    return layers


def _rows(process: str, stages: list[StageUsage], weight_bytes: int) -> str:
    gib = lambda b: "" if b is None else f"{b / GiB:.2f}"  # noqa: E731
    return "".join(f"| {process} | {s.stage} | {s.seconds:.1f} | {gib(s.peak_bytes)} | {gib(s.anon_bytes)} | "
                   f"{gib(s.file_bytes)} | {s.peak_bytes / weight_bytes:.2f}x |\n" for s in stages)


def test_real_width_export_and_build(scale_layers, session):
    limits = thresholds()["scale"]
    component = proxy_expert(scale_layers, device="cpu", dtype=torch.bfloat16, skeleton=True)
    case = Case("transformer", SHAPE, "bf16", source="proxy", variant=f"{scale_layers}-layers")
    builder = TensorRTRTXBuilder(session.settings.backend_options)
    resident_before = resident_bytes()
    graph, engine = builder.build(component, case)
    weights = graph.weight_bytes
    export_stages = StageTable(tuple(graph.stages), weights, limits["max_peak_over_weights"])
    build_stages = StageTable(tuple(engine.stages), weights, limits["max_peak_over_weights"])
    session.record("export", case, "onnx", export_stages)
    session.record("export", case, "tensorrt_rtx", build_stages)
    session.record("export", case, "tensorrt_rtx", engine)
    build_process = "build (this process)" if engine.weights == "inputs" else "build (own process)"
    text = (f"# Real-width export and TensorRT-RTX build: proxy, {scale_layers} of 40 layers, bf16, {SHAPE.id}\n\n"
            f"Command: `{session.recorder.command}`\n\n"
            f"Weights {weights / 1e9:.2f} GB ({weights / GiB:.2f} GiB); ONNX {graph.size_bytes / 1e9:.2f} GB "
            f"({'cache hit: stages from the original export' if graph.hit else 'exported'}); plan "
            f"{engine.size_bytes / 1e6:.1f} MB = {100 * engine.size_bytes / weights:.2f}% of the weights, "
            f"{engine.weights} weights ({'cache hit' if engine.hit else 'built'}), {engine.layers} layers. "
            f"This process (pytest, torch imported, the expert a meta skeleton) held {resident_before / GiB:.2f} GiB "
            f"before and {resident_bytes() / GiB:.2f} GiB after.\n\n"
            + HEADER + _rows("export (own process)", graph.stages, weights) + _rows(build_process, engine.stages, weights))
    session.recorder.path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(session.recorder.path / "scale-cpu.md", text)
    over = {s.stage: round(s.peak_bytes / weights, 2) for s in (*graph.stages, *engine.stages)
            if s.peak_bytes > limits["max_peak_over_weights"] * weights}
    assert not over, f"stages past {limits['max_peak_over_weights']}x the weights: {over}\n{text}"
    if engine.weights != "full":
        assert engine.size_bytes <= limits["max_stripped_plan_share"] * weights, text
