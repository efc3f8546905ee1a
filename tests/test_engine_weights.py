"""Weight-stripped TensorRT plans, bounded host memory, and a skeleton component exported in its own process.

Everything up to the built plan runs here on the CPU with the real TensorRT-RTX builder and ONNX Runtime: the
weights-as-inputs graph computes the same function, the plan holds no weights, the cache keys on the graph's
content and a stripped plan refuses other weights. Loading a plan (refit or bind) needs a GPU TensorRT runs on:
cases/test_export.py's gpu case covers it there.
"""
from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from engines import tensorrt
from engines.tensorrt import TensorRTRTXBuilder, WeightsMismatch, plan_weights
from harness import models
from harness.backends import BackendOptions
from harness.cache import DiskCache, entry_key
from harness.case import Case
from harness.components import Component, dit_component
from harness.export import export_case
from harness.memory import resident_bytes
from harness.models import TINY_TRANSFORMER
from harness.shapes import parse_shape
from harness.weight_inputs import weight_bytes_view, weight_inputs

pytestmark = pytest.mark.export

SHAPE = parse_shape("16x16x9")
NUMPY = {"FLOAT": np.float32, "FLOAT16": np.float16}


def tiny_dit(device: str = "cpu", seed: int = 0) -> Component:
    """The tiny DiT expert alone; on device "meta" a skeleton whose recipe builds it on the CPU (module-level, so
    a spawned process can unpickle the recipe)."""
    from diffusers import WanTransformer3DModel

    expert = models._build(WanTransformer3DModel, TINY_TRANSFORMER, seed, device, torch.float32)
    component = dit_component(expert, "tiny-dit-under-test", text_len=16)
    component.recipe = partial(tiny_dit, "cpu", seed)
    return component


def _ort(path, feeds: dict) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.parametrize("dynamic", [False, True], ids=["static-torchscript", "dynamic-dynamo"])
def test_weights_as_inputs_graph_computes_the_same_function(dynamic, tmp_path):
    """The TorchScript graph holds its weights inline, the dynamo one as external data: both derive."""
    cache = DiskCache(tmp_path)
    component, case = tiny_dit(), Case("transformer", SHAPE, dynamic=dynamic)
    graph = export_case(component, case, cache)
    derived = weight_inputs(graph, cache)
    feeds = {name: t.numpy() for name, t in zip(component.input_names, component.inputs(case))}
    weights = {w.name: weight_bytes_view(derived.folder, w).view(NUMPY[w.dtype]).reshape(w.shape)
               for w in derived.weights}
    assert len(weights) >= sum(p.dim() >= 2 for p in component.module.parameters())
    assert derived.weight_bytes >= 0.9 * graph.weight_bytes  # the vectors stay: 4% of the tiny DiT, 0.1% at A14B width
    expected, actual = _ort(graph.path, feeds), _ort(derived.path, {**feeds, **weights})
    assert np.array_equal(actual, expected) or np.linalg.norm(actual - expected) <= 1e-6 * np.linalg.norm(expected)
    assert weight_inputs(graph, cache).content == derived.content, "a second derivation is a cache hit"


def test_stripped_plan_holds_no_weights_and_refuses_other_weights(tmp_path):
    """Two graphs of one export spec with other weights (seed 1 under seed 0's fingerprint) get other engine keys,
    and a stripped plan built from one is refused the other's weights."""
    case = Case("transformer", SHAPE)
    caches = DiskCache(tmp_path / "a"), DiskCache(tmp_path / "b")
    graph_a, stripped = TensorRTRTXBuilder(cache=caches[0]).build(tiny_dit(seed=0), case)
    graph_b, other = TensorRTRTXBuilder(cache=caches[1]).build(tiny_dit(seed=1), case)
    _, full = TensorRTRTXBuilder(BackendOptions(engine_weights="full"), caches[0]).build(tiny_dit(seed=0), case)
    assert (stripped.weights, full.weights) == ("inputs", "full")
    assert graph_a.fingerprint == graph_b.fingerprint and graph_a.content != graph_b.content
    assert stripped.key != other.key and stripped.onnx_content != other.onnx_content
    assert stripped.size_bytes < full.size_bytes
    assert plan_weights(stripped, graph_a, caches[0]).mode == "inputs"
    with pytest.raises(WeightsMismatch, match="other weights"):
        plan_weights(stripped, graph_b, caches[1])
    assert plan_weights(full, graph_b, caches[1]) is None, "a plan with its own weights needs none"


def test_engine_key_covers_the_weights_mode_and_the_graph_content():
    base = dict(module_name="tensorrt_rtx", module_version="1.7.1.116", onnx_fingerprint="f", profiles=[])
    specs = [tensorrt.engine_spec(**base, weights=w, onnx_content=c)
             for w, c in (("full", "a"), ("refit", "a"), ("inputs", "a"), ("full", "b"))]
    assert len({entry_key("x", s) for s in specs}) == 4
    assert "STRIP_PLAN" in specs[1]["flags"] and "STRIP_PLAN" not in specs[0]["flags"]


@pytest.mark.unit
def test_only_dit_experts_are_stripped_and_refit_needs_cuda():
    mode = tensorrt.plan_weights_mode
    assert [mode("stripped", "transformer", cuda) for cuda in (False, True)] == ["inputs", "refit"]
    assert mode("inputs", "transformer_2", True) == "inputs" and mode("full", "transformer", True) == "full"
    assert mode("stripped", "vae_decoder", True) == mode("stripped", "text_encoder", False) == "full"


def test_isolated_build_holds_only_tensorrt(tmp_path, monkeypatch):
    """A graph past ISOLATE_BYTES is built in a spawned process that imports TensorRT but not torch: its peak is
    below what this process holds at rest; the network and the stages come back through the entry."""
    monkeypatch.setattr(tensorrt, "ISOLATE_BYTES", 0)
    cache = DiskCache(tmp_path)
    case = Case("text_encoder", SHAPE)
    from harness.components import make_component

    component = make_component(models.load_model("tiny"), "text_encoder")
    _, engine = TensorRTRTXBuilder(cache=cache).build(component, case)
    assert [s.stage for s in engine.stages] == ["parse", "build+serialize"] and engine.layers > 0
    assert max(s.peak_bytes for s in engine.stages) < resident_bytes()


def test_skeleton_is_exported_in_its_own_process(tmp_path):
    """A meta skeleton's export builds the real module from its recipe in a spawned process: the graph is the one
    an in-process export of the real module writes, and the model build is measured as a stage of its own."""
    case = Case("transformer", SHAPE)
    skeleton = tiny_dit("meta")
    assert not skeleton.holds_weights
    isolated = export_case(skeleton, case, DiskCache(tmp_path / "isolated"))
    direct = export_case(tiny_dit(), case, DiskCache(tmp_path / "direct"))
    assert [s.stage for s in isolated.stages] == ["model build", "export"]
    assert [s.stage for s in direct.stages] == ["export"]
    assert isolated.key == direct.key and isolated.weight_bytes == direct.weight_bytes > 0
    assert isolated.content == direct.content, "the same graph bytes, whichever process wrote them"


def test_a_broken_derived_entry_is_rebuilt(tmp_path):
    cache = DiskCache(tmp_path)
    graph = export_case(tiny_dit(), Case("transformer", SHAPE), cache)
    derived = weight_inputs(graph, cache)
    (derived.folder / "weights.json").write_text("[]")
    again = weight_inputs(graph, cache)
    assert again.weights == derived.weights and cache.outcomes("onnx-weight-inputs", derived.folder.name)[-1] == "rebuild"



@pytest.mark.unit
def test_engine_builds_of_a_proxy_expert_start_from_a_skeleton():
    """`harness build` needs no eager model: a proxy expert's engine starts from a skeleton whose recipe builds the
    very component (same export key, same seeded inputs) the session's model would give."""
    from harness.export import OPSET, export_spec
    from harness.session import Session
    from harness.settings import settings_from

    settings = settings_from({"model_source": "proxy", "proxy_layers": 1, "device": "cpu", "shapes": "16x16x9"})
    case = Case("transformer_2", settings.shapes[0], "bf16", source="proxy")
    skeleton = Session(settings).engine_component(case)
    real = skeleton.recipe()
    assert not skeleton.holds_weights and real.holds_weights and real.name == "transformer_2"
    specs = [export_spec(c, case, c.fingerprint, OPSET, "torchscript", c.inputs(case)) for c in (skeleton, real)]
    assert specs[0] == specs[1]
    assert real.inputs(case)[1].tolist() == [500], "the low-noise expert's timestep"
