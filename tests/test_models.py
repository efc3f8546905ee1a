"""The three model sources: tiny is deterministic and fast, proxy has A14B width, checkpoint errors help; the random
sources hold what a checkpoint loads as; each expert's example timestep lies on its own side of the boundary."""
import json
import os
import shutil
import time

import pytest
import torch

from harness import models
from harness.case import DIT_COMPONENTS, Case
from harness.components import DiT
from harness.errors import HarnessError
from harness.models import SUBFOLDERS, TINY_TRANSFORMER, TINY_UMT5, TINY_VAE, load_expert, load_model, seeded_init
from harness.pipeline import expert_for
from harness.session import Session
from harness.settings import settings_from
from harness.shapes import parse_shape

WEIGHTED = ("text_encoder", "transformer", "transformer_2", "vae")


def _old_recipe(cls, config: dict, seed: int, dtype: torch.dtype):
    """How the random sources were built before construction went through meta parameters and chunked draws:
    default construction and initialisation, each tensor in the dtype from_pretrained loads it in, then one whole
    seeded_init draw per parameter."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        module = cls(**config)
    finally:
        torch.set_default_dtype(previous)
    return seeded_init(models.as_loaded(module, dtype), seed).eval().requires_grad_(False)


def _tiny_parts():
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    return [(WanTransformer3DModel, TINY_TRANSFORMER), (AutoencoderKLWan, TINY_VAE),
            (lambda **c: UMT5EncoderModel(UMT5Config(**c)), TINY_UMT5)]


@pytest.mark.unit
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fast_construction_is_bit_identical_to_the_old_recipe(dtype, monkeypatch):
    """Chunks of 64 elements (plus tails folded into the last chunk) give the very numbers of one whole draw, in
    the same dtypes, the fp32-kept tensors included."""
    monkeypatch.setattr(models, "FILL_CHUNK", 64)
    for cls, config in _tiny_parts():
        old = _old_recipe(cls, config, 3, dtype).state_dict()
        new = models._build(cls, config, 3, "cpu", dtype).state_dict()
        assert old.keys() == new.keys()
        for name in old:
            assert old[name].dtype == new[name].dtype and torch.equal(old[name], new[name]), name


@pytest.mark.unit
def test_bf16_build_holds_the_fp32_build_rounded():
    """Each parameter of a bf16 build is the fp32 build's cast to its own dtype: rounded to bf16, or the fp32 value
    where from_pretrained keeps it in fp32."""
    for cls, config in _tiny_parts():
        full = models._build(cls, config, 0, "cpu", torch.float32)
        half = dict(models._build(cls, config, 0, "cpu", torch.bfloat16).named_parameters())
        for name, param in full.named_parameters():
            assert half[name].dtype in (torch.bfloat16, torch.float32), name
            assert torch.equal(param.to(half[name].dtype), half[name]), name


def _floating(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every floating parameter and buffer of `module`, by name."""
    return {name: t for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_floating_point()}


@pytest.mark.unit
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_tiny_holds_what_its_checkpoint_loads_as(dtype, tiny_checkpoint):
    """The tiny source in `dtype` against save_pretrained + from_pretrained(torch_dtype=dtype) of the same model
    (the fp32 tiny): every parameter and floating buffer has the same dtype and the same value. fp32 is what the
    libraries keep so: the DiT's own scale_shift_table (a root parameter) beside its norms and time embedder, UMT5's
    wo in fp16 only."""
    built, loaded = load_model("tiny", dtype=dtype), load_model("checkpoint", path=tiny_checkpoint, dtype=dtype)
    kept = set()
    for part in WEIGHTED:
        ours, theirs = _floating(getattr(built, part)), _floating(getattr(loaded, part))
        assert ours.keys() == theirs.keys(), part
        for name, tensor in theirs.items():
            assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), f"{part}.{name}"
        kept |= {f"{part}.{name}" for name, tensor in theirs.items() if tensor.dtype == torch.float32}
    assert {"transformer.scale_shift_table", "transformer.blocks.0.scale_shift_table",
            "transformer_2.condition_embedder.time_embedder.linear_1.weight"} <= kept
    assert ("text_encoder.encoder.block.0.layer.1.DenseReluDense.wo.weight" in kept) == (dtype == torch.float16)


def _diffusers_load_dtypes(module: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The dtype diffusers' own loader (load_model_dict_into_meta, as from_pretrained calls it) gives each floating
    state-dict entry of a twin of `module`, loading fp32 tensors with torch_dtype=dtype; all on meta."""
    from accelerate import init_empty_weights
    from diffusers.models.model_loading_utils import load_model_dict_into_meta

    with init_empty_weights():
        twin = type(module).from_config(module.config)
    state = {name: torch.empty(t.shape, dtype=torch.float32, device="meta") for name, t in twin.state_dict().items()}
    load_model_dict_into_meta(twin, state, dtype=dtype, keep_in_fp32_modules=type(module)._keep_in_fp32_modules,
                              device_map={"": "meta"})
    return {name: t.dtype for name, t in twin.state_dict().items() if t.is_floating_point()}


@pytest.mark.unit
def test_proxy_skeleton_holds_what_a_checkpoint_loads_as(tiny_checkpoint):
    """The proxy source on meta (2 layers, no weights): its DiT and VAE tensors have the dtypes diffusers' loader
    gives, and its UMT5's those transformers gave the tiny checkpoint's bf16 load (its names do not depend on width)."""
    proxy = load_model("proxy", device="meta", dtype=torch.bfloat16, layers=2)
    for part in ("transformer", "transformer_2", "vae"):
        module = getattr(proxy, part)
        ours = {name: t.dtype for name, t in module.state_dict().items() if t.is_floating_point()}
        assert ours == _diffusers_load_dtypes(module, torch.bfloat16), part
    assert proxy.transformer.scale_shift_table.dtype == torch.float32
    loaded = load_model("checkpoint", path=tiny_checkpoint, dtype=torch.bfloat16).text_encoder
    ours, theirs = _floating(proxy.text_encoder), _floating(loaded)
    assert ours.keys() == theirs.keys()
    assert all(ours[name].dtype == tensor.dtype for name, tensor in theirs.items())


@pytest.mark.unit
def test_each_expert_is_fed_a_timestep_on_its_own_side_of_a_checkpoints_boundary(tiny_checkpoint, tmp_path,
                                                                                 monkeypatch):
    """At boundary_ratio 0.95 the high-noise expert runs at t >= 950 only: its example inputs (what export, engines
    and parity take) and the CFG step of the perf cases use a timestep the pipeline's switch gives that expert, and so
    do the low-noise expert's; A14B's 0.875 keeps 937 and 500."""
    folder = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "boundary_ratio": 0.95}))
    session = Session(settings_from({"model_source": "checkpoint", "model_path": str(folder), "backends": "torch",
                                     "shapes": "16x16x9", "cache_dir": str(tmp_path / "cache")}))
    model, shape = session.model(), session.settings.shapes[0]
    seen = {name: session.inputs(Case(name, shape, source="checkpoint"))[1].tolist() for name in DIT_COMPONENTS}
    assert seen == {"transformer": [975], "transformer_2": [542]}
    assert all(expert_for(model, t[0])[0] == name for name, t in seen.items())
    steps = []
    monkeypatch.setattr("harness.session.cfg_noise", lambda runner, latents, timestep, *rest: steps.append(timestep))
    session.cfg_step("torch", "fp32", shape)()
    assert expert_for(model, steps[0])[0] == "transformer" and int(steps[0]) == 975
    tiny = load_model("tiny")
    assert [tiny.expert_timestep(name) for name in DIT_COMPONENTS] == [937, 500]


@pytest.mark.unit
def test_a_meta_skeleton_holds_the_structure_and_no_weights():
    skeleton = load_expert(40, device="meta")
    assert skeleton.config.num_layers == 40 and len(skeleton.blocks) == 40
    assert {p.device.type for p in skeleton.parameters()} == {"meta"}


@pytest.mark.unit
def test_tiny_is_deterministic_across_builds_and_close_across_dtypes():
    a, b = load_model("tiny"), load_model("tiny")
    for (name, pa), pb in zip(a.transformer.named_parameters(), b.transformer.parameters()):
        assert torch.equal(pa, pb), name
    half = load_model("tiny", dtype=torch.bfloat16)
    weight = a.transformer.blocks[0].ffn.net[0].proj.weight
    assert torch.allclose(half.transformer.blocks[0].ffn.net[0].proj.weight.float(), weight, rtol=1e-2, atol=1e-3)
    assert a.fingerprints == b.fingerprints and a.fingerprints["transformer"] != a.fingerprints["transformer_2"]


@pytest.mark.unit
def test_proxy_expert_has_a14b_width_and_runs_a_forward_on_the_cpu():
    expert = load_expert(2, device="cpu", dtype=torch.float32)
    cfg = expert.config
    assert (cfg.num_layers, cfg.num_attention_heads * cfg.attention_head_dim, cfg.ffn_dim) == (2, 5120, 13824)
    shape = parse_shape("16x16x9")
    latents = torch.randn(shape.latent_shape())
    with torch.inference_mode():
        out = DiT(expert)(latents, torch.tensor([937]), torch.randn(1, 512, 4096))
    assert out.shape == latents.shape and torch.isfinite(out).all()


@pytest.mark.unit
def test_missing_checkpoint_folder_says_what_to_do(tmp_path):
    with pytest.raises(HarnessError, match="does not exist"):
        load_model("checkpoint", path=tmp_path / "nope")
    with pytest.raises(HarnessError, match="--model-path or WAN_MODEL_PATH"):
        load_model("checkpoint", path="")


@pytest.mark.unit
def test_a_checkpoint_path_that_is_no_folder_says_what_it_is(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(HarnessError, match="is a file, not a folder"):
        load_model("checkpoint", path=tmp_path / "file")
    with pytest.raises(HarnessError, match="is a symlink loop"):
        load_model("checkpoint", path=tmp_path / "loop")


@pytest.mark.unit
def test_incomplete_checkpoint_lists_the_missing_parts(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    for sub in SUBFOLDERS[:3]:
        (tmp_path / sub).mkdir()
    with pytest.raises(HarnessError) as err:
        load_model("checkpoint", path=tmp_path)
    for missing in SUBFOLDERS[3:]:
        assert missing in str(err.value).split("lacks")[1].split(";")[0]


@pytest.mark.unit
def test_unknown_source_and_bad_layer_count():
    with pytest.raises(HarnessError, match="unknown model source"):
        load_model("huge")
    with pytest.raises(HarnessError, match="between 1 and 40"):
        load_model("proxy", layers=41)


@pytest.mark.perf
def test_tiny_build_and_two_step_pipeline(benchmark):
    """The tiny build-and-generate budget (< 10 s on the CPU) is read from this benchmark's numbers, not asserted."""
    def build_and_generate():
        pipe = load_model("tiny").pipeline()
        pipe.set_progress_bar_config(disable=True)
        return pipe("a cat", height=16, width=16, num_frames=9, num_inference_steps=2, output_type="np",
                    generator=torch.Generator().manual_seed(0)).frames

    frames = benchmark.pedantic(build_and_generate, rounds=3, iterations=1, warmup_rounds=1)
    assert frames.shape == (1, 9, 16, 16, 3)


@pytest.mark.unit
def test_a_checkpoint_fingerprint_changes_with_content_that_keeps_name_size_and_mtime(tmp_path):
    weights = tmp_path / "a" / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"\0" * 64)
    before = models._checkpoint_fingerprint(weights.parent)
    stat = weights.stat()
    time.sleep(0.01)
    weights.write_bytes(b"\1" * 64)  # new weights of the same size, the old mtime put back as `cp -p` would
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert models._checkpoint_fingerprint(weights.parent) != before
    twin = tmp_path / "b" / "transformer"
    shutil.copytree(weights.parent, twin, copy_function=shutil.copy2)  # another folder, same names, sizes, mtimes
    assert models._checkpoint_fingerprint(twin) != models._checkpoint_fingerprint(weights.parent)


def _umt5_drift(config: dict, layers: int, device: str) -> float:
    """rel L2 of the random sources' seeded UMT5 encoder's bf16 embeddings of quality prompt 0 against its fp32 ones."""
    from transformers import UMT5Config, UMT5EncoderModel

    from harness.components import TextEncoder
    from harness.pipeline import PROMPTS, tokenize

    ids, mask = tokenize(load_model("tiny"), [PROMPTS[0]], device)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        encoder = TextEncoder(models._build(lambda **c: UMT5EncoderModel(UMT5Config(**c)),
                                            {**config, "num_layers": layers}, 3, device, dtype))
        with torch.inference_mode():
            out[dtype] = encoder(ids, mask).double().cpu()
        del encoder
    return float((out[torch.bfloat16] - out[torch.float32]).norm() / out[torch.float32].norm())


NARROW_UMT5 = {**models.UMT5_XXL, "vocab_size": 1000, "d_model": 512, "d_ff": 1280, "num_heads": 8}  # d_kv 64, as XXL


@pytest.mark.parametrize("config, device", [
    pytest.param(NARROW_UMT5, "cpu", marks=pytest.mark.unit, id="d_model512-cpu"),
    pytest.param(models.UMT5_XXL, "cuda", marks=[pytest.mark.gpu, pytest.mark.slow], id="umt5-xxl-cuda")])
def test_the_random_text_encoder_rounds_like_a_trained_one(config, device):
    """bf16 rounding stays small through UMT5-XXL's 24 layers and grows slower than depth, as in a trained encoder,
    because the queries are initialised as T5's (std (d_model x d_kv)^-1/2). With fan-in queries the attention logits
    are d_kv^1/2 = 8x too large and the embeddings drift apart: 0.18 at 6 layers, 0.82 at 24 (width 512, measured)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device: UMT5-XXL's 24 layers are 22.7 GB in fp32 beside 11.4 GB in bf16")
    shallow, deep = _umt5_drift(config, 6, device), _umt5_drift(config, 24, device)
    assert deep <= 0.03, (shallow, deep)
    assert deep < 4 * shallow, (shallow, deep)  # 4x the depth, less than 4x the error


@pytest.mark.unit
def test_the_identity_read_without_building_is_the_built_models(tiny_checkpoint):
    """Stored videos are keyed on model_identity (no model built), calibrations on WanModel.identity(): one identity."""
    assert models.model_identity("tiny") == load_model("tiny").identity()
    assert models.model_identity("checkpoint", path=tiny_checkpoint) == load_model("checkpoint", path=tiny_checkpoint).identity()
