"""ModelOpt PTQ to fp8/int8 engines on the CPU, with real ModelOpt, ONNX Runtime and TensorRT-RTX: loop-captured
calibration and its cache, the simulated `modelopt` backend judged against bf16 eager in the fp8 and int8 bands,
the Q/DQ graph against the simulation on ONNX Runtime, and strongly typed TensorRT-RTX builds for a named
compute capability whose own layer information proves the GEMMs (and self-attention) quantized.

The tiny DiT runs at 128x128x9 (192 tokens): at the CI shape 16x16x9 (3 tokens) static scales from the
calibration prompts do not cover held-out prompts (harness/thresholds.toml [parity.int8]), and TensorRT does
not fuse self-attention into one kernel. The saved-and-loaded checkpoint's engines, which prove the GEMMs alone, are
built at the CI shape.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import torch

from engines.layer_precision import markdown_table
from engines.modelopt import calibrate, quantized_module, restore
from engines.modelopt_export import export_quantized, qdq_cpu_runner
from engines.tensorrt import EngineBuildError, TensorRTRTXBuilder, import_trt, min_quantized_share
from harness.__main__ import main
from harness.backends import BackendOptions
from harness.cache import DiskCache
from harness.case import DIT_COMPONENTS, QUANTIZED, Case
from harness.compare import compare
from harness.components import dit_component, make_component, seeded_loop
from harness.errors import BackendUnavailable, HarnessError
from harness.models import TINY_TRANSFORMER, load_expert, load_model, random_fingerprint
from harness.recipes import block_index
from harness.pipeline import CALIBRATION_PROMPTS, CALIBRATION_STEPS
from harness.session import Session
from harness.settings import settings_from
from harness.shapes import parse_shape
from harness.thresholds import thresholds
from harness.weight_inputs import weight_bytes_view, weight_inputs

from tests.helpers import cli_error

pytestmark = pytest.mark.export
SHAPE = parse_shape("128x128x9")
CHECKPOINT_SHAPE = parse_shape("16x16x9")
# How ONNX Runtime takes each moved weight's bytes (fp8 as its raw bytes, typed by the OrtValue)
WEIGHT_NUMPY = {"FLOAT": np.float32, "FLOAT16": np.float16, "FLOAT8E4M3FN": np.uint8, "INT8": np.int8}


@pytest.fixture(scope="module")
def tiny_bf16():
    return load_model("tiny", dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def modelopt_ready(session):
    session.backend("modelopt")  # unavailable (modelopt not importable): skips with why


def test_each_expert_calibrates_on_its_own_timesteps_of_the_real_loop(tiny_bf16):
    calls = {name: make_component(tiny_bf16, name).loop_inputs(Case(name, SHAPE, "fp8"), False)
             for name in DIT_COMPONENTS}
    per_expert = len(CALIBRATION_PROMPTS) * CALIBRATION_STEPS  # half the steps each, two CFG branches per step
    assert [len(c) for c in calls.values()] == [per_expert, per_expert]
    boundary = tiny_bf16.boundary_ratio * tiny_bf16.scheduler.config.num_train_timesteps
    assert all(int(t) >= boundary for _, t, _ in calls["transformer"])
    assert all(int(t) < boundary for _, t, _ in calls["transformer_2"])
    latents, _, text = calls["transformer"][0]
    assert latents.dtype == text.dtype == torch.bfloat16 and tuple(latents.shape) == SHAPE.latent_shape(1)
    held_out = make_component(tiny_bf16, "transformer").loop_inputs(Case("transformer", SHAPE, "fp8"), True)
    assert not torch.equal(held_out[0][2], text), "the held-out prompts are not the calibration prompts"


@pytest.mark.parametrize("precision", QUANTIZED)
def test_calibration_is_cached_and_leaves_the_shared_expert_alone(precision, tiny_bf16, modelopt_ready, tmp_path):
    component = make_component(tiny_bf16, "transformer")
    before = {k: v.clone() for k, v in tiny_bf16.transformer.state_dict().items()}
    case = Case("transformer", SHAPE, precision)
    cache = DiskCache(tmp_path)
    first, second = calibrate(component, case, cache), calibrate(component, case, cache)
    assert cache.outcomes("calibration", first.path.name) == ["miss", "hit"] and second.hit
    inputs = component.loop_inputs(case, True)[0]
    with torch.inference_mode():
        outputs = [restore(component, c.value["scales"])(*inputs) for c in (first, second)]
        eager = component.module(*inputs)
    assert torch.equal(*outputs), "a restored copy computes the same whether the scales were just made or loaded"
    assert not torch.equal(outputs[0], eager), "the restored copy is quantized"
    after = tiny_bf16.transformer.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any("quantizer" in name for name, _ in tiny_bf16.transformer.named_modules())
    other = calibrate(component, Case("transformer", parse_shape("64x64x9"), precision), cache)
    assert other.path.name != first.path.name, "other calibration inputs make another entry"


@pytest.mark.parametrize("precision", QUANTIZED)
@pytest.mark.parametrize("component", DIT_COMPONENTS)
def test_modelopt_parity_in_the_quantized_band(component, precision, session, modelopt_ready):
    """The fake-quantized expert against fp32 eager, within k x bf16 eager's drift + atol, on held-out loop calls."""
    case = Case(component, SHAPE, precision, source=session.settings.source)
    result = session.parity("modelopt", case)
    session.record("parity", case, "modelopt", result)
    assert result, result.message()


@pytest.mark.unit
def test_modelopt_says_what_it_cannot_quantize(session, modelopt_ready):
    case = Case("transformer", SHAPE, "fp8")
    alone = dit_component(load_model("tiny", dtype=torch.bfloat16).transformer, "tiny-weights")
    with pytest.raises(BackendUnavailable, match="carries no denoising-loop inputs to calibrate modelopt-fp8 on"):
        session.build("modelopt", alone, case)
    text = Case("text_encoder", SHAPE, "fp8")
    with pytest.raises(BackendUnavailable, match="modelopt cannot run text_encoder-.*: fp8 quantization covers the DiT experts"):
        session.build("modelopt", session.component(text), text)
    with pytest.raises(BackendUnavailable, match=r"modelopt has no bf16 path \(it runs fp8, int8\)"):
        session.build("modelopt", alone, case.with_precision("bf16"))


@pytest.mark.parametrize("scheme", QUANTIZED)
def test_qdq_graph_passes_the_checker_and_matches_the_simulation_on_onnxruntime(scheme, session, modelopt_ready):
    """An fp16 graph (ORT's CPU provider has no bf16 Conv), graph optimizations off (they break fp8 Q/DQ)."""
    model = load_model("tiny", dtype=torch.float16)
    component, case = make_component(model, "transformer"), Case("transformer", SHAPE, "fp16")
    cache = DiskCache(session.settings.cache_dir)
    graph = export_quantized(component, case, cache, scheme)
    onnx.checker.check_model(str(graph.path), full_check=True)
    proto = onnx.load(str(graph.path))
    assert {n.domain for n in proto.graph.node} == {""}, "every Q/DQ is a standard ONNX op"
    stored = {onnx.TensorProto.DataType.Name(i.data_type) for i in proto.graph.initializer}
    assert {"fp8": "FLOAT8E4M3FN", "int8": "INT8"}[scheme] in stored
    conv = next(n for n in proto.graph.node if n.op_type == "Conv")
    assert conv.input[1] == "transformer.patch_embedding.weight", "the patch embedding keeps its own weight"
    simulated, _ = quantized_module(component, case, cache, scheme)
    inputs = component.loop_inputs(case, True)[0]
    with torch.inference_mode():
        expected = simulated(*inputs)
    result = compare(qdq_cpu_runner(graph.path)(*inputs), expected,
                     tolerance=thresholds()["qdq_graph"][f"ort_rel_l2_{scheme}"])
    assert result, result.message()


@pytest.mark.parametrize("scheme", QUANTIZED)
def test_weights_as_inputs_keep_the_quantized_weights_quantized(scheme, session, modelopt_ready):
    """The weights-as-inputs twin of a Q/DQ graph (a weight-stripped plan's graph on a CPU-only machine) takes each
    fp8/int8 weight as an input of its own type, and computes what the Q/DQ graph computes (ONNX Runtime CPU)."""
    import onnxruntime

    model = load_model("tiny", dtype=torch.float16)
    component, case = make_component(model, "transformer"), Case("transformer", SHAPE, "fp16")
    cache = DiskCache(session.settings.cache_dir)
    graph = export_quantized(component, case, cache, scheme)
    derived = weight_inputs(graph, cache)
    stored = {"fp8": "FLOAT8E4M3FN", "int8": "INT8"}[scheme]
    quantized = [i.name for i in onnx.load(str(graph.path)).graph.initializer
                 if onnx.TensorProto.DataType.Name(i.data_type) == stored and len(i.dims) >= 2]
    moved = {w.name: w.dtype for w in derived.weights}
    assert quantized and all(moved.get(name) == stored for name in quantized), "every quantized weight moved as it is"
    feeds = {name: t.numpy() for name, t in zip(component.input_names, component.loop_inputs(case, True)[0])}
    weights = {w.name: onnxruntime.OrtValue.ortvalue_from_numpy_with_onnx_type(
        weight_bytes_view(derived.folder, w).reshape(-1).view(WEIGHT_NUMPY[w.dtype]).reshape(w.shape),
        onnx.TensorProto.DataType.Value(w.dtype)) for w in derived.weights}
    expected = qdq_cpu_runner(graph.path).session.run(None, feeds)[0]
    actual = qdq_cpu_runner(derived.path).session.run(None, {**feeds, **weights})[0]
    assert np.array_equal(actual, expected)


@pytest.fixture(scope="module")
def rtx(modelopt_ready):
    module, reason = import_trt("tensorrt_rtx")
    if module is None:
        pytest.skip(reason)


def block_linear_flops(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], blocks=None) -> int:
    """2 x rows x in x out of every Linear inside the DiT blocks (those numbered in `blocks`; None: all), from one
    forward: what the engine must run."""
    flops, hooks = [0], []
    for name, sub in module.named_modules():
        index = block_index(name)
        if isinstance(sub, torch.nn.Linear) and index is not None and (blocks is None or index in blocks):
            hooks.append(sub.register_forward_hook(
                lambda m, args, out: flops.__setitem__(0, flops[0] + 2 * args[0].numel() * m.out_features)))
    with torch.inference_mode():
        module(*inputs)
    for hook in hooks:
        hook.remove()
    return flops[0]


def engine_for(session, precision: str, compute_capability: str, engine_weights: str = "stripped"):
    case = Case("transformer", SHAPE, precision, source=session.settings.source)
    options = BackendOptions(cache_dir=session.settings.cache_dir, compute_capability=compute_capability,
                             engine_weights=engine_weights)
    component = session.component(case)
    _, engine = TensorRTRTXBuilder(options).build(component, case)
    return engine, block_linear_flops(component.module, component.inputs(case))


@pytest.mark.parametrize("precision, compute_capability, engine_weights",
                         [("fp8", "8.9", "stripped"), ("fp8", "8.9", "full"), ("int8", "8.6", "stripped")])
def test_quantized_engine_runs_its_block_gemms_quantized(precision, compute_capability, engine_weights, session, rtx):
    """Strongly typed TensorRT-RTX build for a named target; the builder's own layer log is the proof, whether the
    plan holds the fp8/int8 weights or takes them as graph inputs (a stripped plan on a CPU-only machine)."""
    engine, expected = engine_for(session, precision, compute_capability, engine_weights)
    rows = engine.gemms()
    proof = engine.proof(precision, expected)
    assert engine.target == "sm" + compute_capability.replace(".", "")
    assert (engine.weights == "full") == (engine_weights == "full") and (engine.weights == "inputs") == bool(engine.weight_inputs)
    assert sum(g.flops for g in rows if g.block and g.kind == "linear") == expected, "every block GEMM was seen"
    assert proof.share >= min_quantized_share(), str(proof)
    if precision == "fp8":  # int8 attention stays 16-bit: ModelOpt exports fp8 attention only
        assert proof.fused_self_attention, f"self-attention is not one fused fp8 MHA kernel: {proof}"
    case = Case("transformer", SHAPE, precision, source=session.settings.source)
    session.record("export", case, "tensorrt_rtx", engine)
    assert proof.target_blocks == proof.quantized_blocks == (0, 1), str(proof)
    assert engine.checks() == {"quantized_gemm_share": True, "quantized_blocks": True}


def test_an_nvidia_recipe_engine_runs_fp8_only_in_the_blocks_it_quantizes(session, rtx):
    """A tiny-width expert of 8 layers under --fp8-recipe nvidia keeps blocks 0-2 and 5-7 bf16: TensorRT-RTX's own
    layer log shows fp8 GEMMs in blocks 3-4 only, all of their linear GEMM work in fp8 with fused fp8
    self-attention, and 16-bit GEMMs in every block kept high. Calibrated on three seeded forwards: the proof is
    about which kernels run in which precision, which the scale values do not change."""
    expert = dit_component(load_expert(8, device="cpu", dtype=torch.bfloat16, config=TINY_TRANSFORMER),
                           random_fingerprint({**TINY_TRANSFORMER, "num_layers": 8}, 0))
    component = dataclasses.replace(expert, loop_inputs=seeded_loop(expert, 3))
    case = Case("transformer", SHAPE, "fp8", source="tiny")
    options = BackendOptions(cache_dir=session.settings.cache_dir, compute_capability="8.9", fp8_recipe="nvidia")
    _, engine = TensorRTRTXBuilder(options).build(component, case)
    proof = engine.proof("fp8", block_linear_flops(component.module, component.inputs(case), blocks=(3, 4)))
    assert proof.quantized_blocks == proof.target_blocks == (3, 4), str(proof)
    assert proof.share >= min_quantized_share() and proof.fused_self_attention, str(proof)
    kept = [g for g in engine.gemms() if g.block and block_index(g.block) not in (3, 4)]
    assert {block_index(g.block) for g in kept} == {0, 1, 2, 5, 6, 7}, "every kept block's GEMMs are in the log"
    assert all("fp8" not in g.precision for g in kept), [g for g in kept if "fp8" in g.precision]
    assert engine.checks() == {"quantized_gemm_share": True, "quantized_blocks": True}
    assert "fp8 GEMMs in blocks 3-4;" in str(engine), str(engine)


def test_a_plain_bf16_engine_fails_the_fp8_proof(session, rtx):
    engine, expected = engine_for(session, "bf16", "8.9")
    proof = engine.proof("fp8", expected)
    assert proof.block_gemm_flops == expected and proof.share < min_quantized_share()
    assert not proof.fused_self_attention and proof.target_blocks == () and not proof.blocks_as_meant, str(proof)


def test_fp8_for_a_gpu_without_fp8_fails_loudly(session, rtx):
    with pytest.raises(EngineBuildError, match="HW-specific datatypes: fp8_e4m3"):
        engine_for(session, "fp8", "8.6")


def test_a_compute_capability_is_major_minor_and_one_the_builder_targets(session, rtx):
    with pytest.raises(HarnessError, match="write it as major.minor"):
        settings_from({"compute_capability": "sm89", "device": "cpu", "backends": "torch"})
    with pytest.raises(HarnessError, match=r"cannot target compute capability 9.0; it targets .*8\.9"):
        engine_for(session, "fp8", "9.0")


def test_harness_build_makes_an_fp8_engine_for_a_named_target(session, rtx, capsys):
    code = main(["build", "--precision", "fp8", "--compute-capability", "8.9", "--component", "transformer",
                 "--shape", SHAPE.id, "--model-source", "tiny", f"--cache-dir={session.settings.cache_dir}"])
    out = capsys.readouterr().out
    assert code == 0 and "target sm89" in out and "100.0% of" in out and "fused_mha fp8" in out, out
    assert "fp8 GEMMs in blocks 0-1;" in out, out
    assert main(["build", "--precision", "fp8", "--compute-capability", "8.9.1", "--component", "transformer"]) == 2


def _quantizers_off(monkeypatch, blocks) -> None:
    """A fault after ModelOpt restores the expert: every quantizer of the blocks `blocks` numbers (None: all) off."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    def restored(*args, **kwargs):
        module, calibration = quantized_module(*args, **kwargs)
        for name, sub in module.named_modules():
            if isinstance(sub, TensorQuantizer) and (blocks is None or block_index(name) in blocks):
                sub.disable()
        return module, calibration

    monkeypatch.setattr("engines.modelopt_export.quantized_module", restored)


@pytest.mark.parametrize("blocks, needle", [
    ((1,), "the fp8 engine is not the one --fp8-recipe asks for: fp8 GEMMs in blocks 0, where the recipe means blocks "
           "0-1; 50.0% of their GEMM FLOPs in fp8 (at least 95% needed); "),
    (None, "nothing was quantized: every weight quantizer of the expert is off after ModelOpt restored it, where "
           "--fp8-recipe all-blocks means blocks 0-1; an engine of it would run no GEMM in fp8"),
], ids=["block-1-left-high", "every-quantizer-off"])
def test_harness_build_fails_an_engine_its_layer_proof_fails(blocks, needle, modelopt_ready, rtx, monkeypatch, capsys,
                                                             tmp_path):
    """The proof decides the build, not only the builder: an engine with fewer quantized blocks than the recipe means
    is exit 2 in one line. Its own cache: the fault is in no cache key, so it must not reach the run's cache."""
    _quantizers_off(monkeypatch, blocks)
    line = cli_error(["build", "--precision", "fp8", "--compute-capability", "8.9", "--component", "transformer",
                      "--shape", CHECKPOINT_SHAPE.id, "--model-source", "tiny", f"--cache-dir={tmp_path}"], capsys)
    assert needle in line, line
    assert blocks is None or line.endswith("layers.txt lists each GEMM's precision"), line


@pytest.mark.unit
def test_a_qdq_graph_outside_16_bit_names_its_cause(tiny_bf16, modelopt_ready, tmp_path, monkeypatch):
    """An fp32 case is refused before calibrating; so is a quantized layer held in fp32 beside the bf16 ones, as the
    time embedder diffusers keeps in fp32 would be if it were not kept high (HIGH_PRECISION_MODULES)."""
    cache = DiskCache(tmp_path)
    fp32 = Case("transformer", CHECKPOINT_SHAPE, "fp32")
    with pytest.raises(HarnessError, match="this case computes in torch.float32; quantize beside an fp16 or bf16"):
        export_quantized(make_component(load_model("tiny"), "transformer"), fp32, cache, "fp8")
    monkeypatch.setattr("engines.modelopt.HIGH_PRECISION_MODULES", ("patch_embedding", "proj_out"))
    with pytest.raises(HarnessError, match="quantizes hold torch.bfloat16 and torch.float32 weights, not the case's "
                                           "torch.bfloat16"):
        export_quantized(make_component(tiny_bf16, "transformer"), fp32.with_precision("fp8"), cache)


@pytest.fixture(scope="module")
def checkpoint_session(tiny_checkpoint, session):
    """A run of the tiny checkpoint folder through --model-source checkpoint, on this run's cache."""
    return Session(settings_from({"model_source": "checkpoint", "model_path": str(tiny_checkpoint),
                                  "shapes": CHECKPOINT_SHAPE.id, "cache_dir": str(session.settings.cache_dir)}))


@pytest.mark.parametrize("precision", QUANTIZED)
def test_a_saved_checkpoints_experts_build_quantized_engines(precision, checkpoint_session, rtx, capsys):
    """from_pretrained(torch_dtype=bf16) keeps diffusers' fp32 tensors beside the bf16 layers, the expert's own
    scale_shift_table first among its parameters: `harness build` and the export behind it take the graph's dtype from
    the case, and each expert's engine runs its block GEMMs in fp8/int8, where a bf16 engine of the same checkpoint
    runs none."""
    s = checkpoint_session.settings
    code = main(["build", "--precision", precision, "--model-source", "checkpoint", f"--model-path={s.model_path}",
                 "--shape", CHECKPOINT_SHAPE.id, f"--cache-dir={s.cache_dir}"])
    out = capsys.readouterr()
    assert code == 0 and out.out.count(f"block GEMM FLOPs in {precision}") == len(DIT_COMPONENTS), out
    for name in DIT_COMPONENTS:
        case = Case(name, CHECKPOINT_SHAPE, precision, source="checkpoint")
        component = checkpoint_session.component(case)
        assert component.module.transformer.scale_shift_table.dtype == torch.float32, "as from_pretrained loads it"
        expected = block_linear_flops(component.module, component.inputs(case))
        _, engine = checkpoint_session.build_engine("tensorrt_rtx", case)
        assert engine.hit, "the engine harness build made"
        proof = engine.proof(precision, expected)
        assert proof.share >= min_quantized_share() and proof.block_gemm_flops == expected, str(proof)
        _, plain = checkpoint_session.build_engine("tensorrt_rtx", case.with_precision("bf16"))
        assert plain.proof(precision, expected).share == 0, str(plain.proof(precision, expected))


def test_real_width_fp8_engine_layer_table(session, rtx):
    """One A14B-width expert of --proxy-layers layers, fp8 for 8.9 at the run's first shape: the layer-precision
    table and build time go to the run folder (fp8-engine-proxy.md).

    The expert is built alone, without a WanModel: the whole proxy model does not fit a 24 GB CPU machine
    (its bf16 load alone passed 10 GB), so there is no loop to calibrate on, and three seeded forwards stand in.
    That is no calibration for accuracy (every accuracy case calibrates on the loop); this build proves which
    kernels and precisions TensorRT picks at real width, which the scale values do not change.
    """
    s = session.settings
    if s.source != "proxy":
        pytest.skip("builds a real-width expert: run with --model-source proxy (2 layers at 64x64x5 peaked at "
                    "about 8 GB here)")
    from harness.components import proxy_expert
    from harness.machine import versions_string
    from harness.cache import atomic_write_text

    case = Case("transformer", s.shapes[0], "fp8", source="proxy")
    expert = proxy_expert(s.proxy_layers, device="cpu", dtype=torch.bfloat16)
    component = dataclasses.replace(expert, loop_inputs=seeded_loop(expert, 3))
    expected = block_linear_flops(component.module, component.inputs(case))
    options = BackendOptions(cache_dir=s.cache_dir, compute_capability="8.9")
    graph, engine = TensorRTRTXBuilder(options).build(component, case)
    rows = engine.gemms()
    proof = engine.proof("fp8", expected)
    table = (f"# fp8 TensorRT-RTX engine at A14B width (proxy, {s.proxy_layers} of 40 layers, {case.shape.id}, "
             f"{case.shape.tokens} tokens)\n\nCommand: `{session.recorder.command}`; {versions_string()}\n\n"
             f"Engine {engine.key}: target {engine.target}, build {engine.build_s:.1f} s, {engine.size_bytes / 2 ** 20:.0f} MB, "
             f"graph export {graph.export_s:.1f} s; {proof}\n\n" + markdown_table([g for g in rows if g.block]))
    session.recorder.path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(session.recorder.path / "fp8-engine-proxy.md", table)
    session.record("export", case, "tensorrt_rtx", engine)
    assert proof.share >= min_quantized_share() and proof.block_gemm_flops == expected, str(proof)
    assert proof.fused_self_attention, str(proof)
