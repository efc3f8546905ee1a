"""Wan2.2-T2V-A14B components from three sources: tiny (CI), proxy (A14B width, few layers), checkpoint."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib
import json
import logging
import math
import os
import re
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import torch

from harness.errors import HarnessError

log = logging.getLogger(__name__)

SOURCES = ("tiny", "proxy", "checkpoint")
SUBFOLDERS = ("text_encoder", "tokenizer", "transformer", "transformer_2", "vae", "scheduler")
# The files each checkpoint component needs besides its weights (config.json where not listed).
REQUIRED_FILES = {"scheduler": ("scheduler_config.json",), "tokenizer": ("tokenizer_config.json",)}
# A UMT5 tokenizer's vocabulary: the fast tokenizer's file, or the SentencePiece model the slow one reads.
TOKENIZER_VOCABULARIES = ("tokenizer.json", "spiece.model")
# The weighted components' [library, class] as model_index.json names them, and the names from_pretrained looks
# for their weights under.
LOADED_CLASSES = {"text_encoder": ["transformers", "UMT5EncoderModel"],
                  "transformer": ["diffusers", "WanTransformer3DModel"],
                  "transformer_2": ["diffusers", "WanTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"]}
WEIGHT_STEMS = {"text_encoder": "model", "transformer": "diffusion_pytorch_model",
                "transformer_2": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model"}
# DiT config fields the shape check and the loader read as sizes, and those the two experts must share: the same
# latents, prompt embeddings and head split go through both.
DIT_SIZES = ("in_channels", "out_channels", "num_attention_heads", "attention_head_dim", "text_dim", "freq_dim",
             "ffn_dim", "num_layers", "rope_max_seq_len")
EXPERTS_AGREE_ON = ("patch_size", "in_channels", "out_channels", "num_attention_heads", "attention_head_dim",
                    "text_dim")
# Bumped whenever the random sources' recipe changes (their weights' initialisation, tokenizer or scheduler), so
# cached exports, engines, calibrations and videos of the old models are not reused.
INIT_RECIPE = "seeded-normal-v3"
# Seeds of the random sources' experts: they differ, as the real high- and low-noise experts do.
EXPERT_SEEDS = {"transformer": 0, "transformer_2": 1}
# CPU parameters are drawn this many fp32 elements at a time (16 MiB of scratch per thread), by this many threads.
FILL_CHUNK = 1 << 22
FILL_THREADS = max(1, torch.get_num_threads())

A14B_TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
    out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40,
    cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
TINY_TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
    out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32)
# 16 channels, not the 3 of diffusers' own Wan tests: the VAE's RMS norms normalise over the channels, and over 3
# random ones a point near zero turns a rounding difference of 1e-10 (one CPU's bf16 kernels against another's)
# into a 10 dB change of the decoded video. At 16 the tiny bf16 video moves by 0.3 dB between those kernels.
TINY_VAE = dict(base_dim=16, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                temperal_downsample=[False, True, True])
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, feed_forward_proj="gated-gelu")
TINY_UMT5 = dict(vocab_size=1000, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                 relative_attention_num_buckets=8, feed_forward_proj="gated-gelu")
# A small fixed corpus: the offline tokenizer is trained on it, so token ids are deterministic.
TOKENIZER_CORPUS = (
    "A cat walks on the grass, realistic, soft light. "
    "Two astronauts ride horses across a red desert at sunset. "
    "A drone shot over a snowy mountain ridge with clouds moving fast. "
    "Close-up of raindrops falling into a puddle in slow motion. "
    "Low quality, blurry, static, overexposed, worst quality, jpeg artifacts."
)


# Wan2.2-T2V-A14B's model_index.json: the high-noise expert runs while t >= 0.875 x the scheduler's 1000 timesteps.
A14B_BOUNDARY_RATIO = 0.875
# The WanModel fields beside its components that its outputs depend on.
PIPELINE_SETTINGS = ("boundary_ratio", "guidance_scale", "guidance_scale_2", "max_sequence_length")


def expert_timestep(name: str, boundary_ratio: float = A14B_BOUNDARY_RATIO, train_timesteps: int = 1000) -> int:
    """The timestep of expert `name`'s example inputs: one it really runs at, on its own side of the boundary
    (boundary_ratio x train_timesteps; harness.pipeline.expert_for). The high-noise expert gets the middle of
    [boundary, train_timesteps], the low-noise one 4/7 of the boundary, both rounded down: 937 and 500 at A14B's 875
    (the values every recorded number was taken at), 975 and 542 at 950."""
    boundary = boundary_ratio * train_timesteps
    return int((boundary + train_timesteps) / 2) if name == "transformer" else int(boundary * 4 / 7)


@dataclass
class WanModel:
    """Everything a Wan2.2 T2V run needs, with the pipeline settings of the A14B model card."""

    source: str
    label: str
    tokenizer: object
    text_encoder: torch.nn.Module
    transformer: torch.nn.Module
    transformer_2: torch.nn.Module
    vae: torch.nn.Module
    scheduler: object
    fingerprints: dict[str, str] = field(default_factory=dict)
    boundary_ratio: float = A14B_BOUNDARY_RATIO
    guidance_scale: float = 4.0
    guidance_scale_2: float = 3.0
    max_sequence_length: int = 512

    def pipeline(self):
        """A diffusers WanPipeline over these very modules (no copies)."""
        from diffusers import WanPipeline

        return WanPipeline(tokenizer=self.tokenizer, text_encoder=self.text_encoder, vae=self.vae,
                           scheduler=self.scheduler, transformer=self.transformer,
                           transformer_2=self.transformer_2, boundary_ratio=self.boundary_ratio)

    def expert_timestep(self, name: str) -> int:
        """The timestep of expert `name`'s example inputs, from this model's boundary (see expert_timestep)."""
        return expert_timestep(name, self.boundary_ratio, self.scheduler.config.num_train_timesteps)

    def identity(self) -> dict:
        """What this model's outputs depend on, read from the model itself: each component's fingerprint (a random
        one's covers its config, seed and INIT_RECIPE; a checkpoint's its files) and the pipeline settings.
        Calibrated scales are keyed on it (harness.calibration)."""
        return {"fingerprints": dict(self.fingerprints), **{name: getattr(self, name) for name in PIPELINE_SETTINGS}}


def make_scheduler(flow_shift: float = 3.0):
    """The A14B model card's scheduler: flow-matching UniPC with shift 3."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                   num_train_timesteps=1000, flow_shift=flow_shift)


def make_tokenizer():
    """A UMT5-style tokenizer (pad 0, eos 1, unk 2) trained in memory; nothing is downloaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "</s>", "<unk>"], show_progress=False)
    tok.train_from_iterator([TOKENIZER_CORPUS], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def _param_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63)


@dataclass(frozen=True)
class Init:
    """How one parameter's values come from its N(0, 1) draw: mean + std x draw."""

    std: float
    mean: float = 0.0

    def apply(self, draw: torch.Tensor) -> torch.Tensor:
        """In place and element by element, so a chunk of a draw gets exactly the values the whole draw would."""
        return draw.mul_(self.std).add_(self.mean) if self.mean else draw.mul_(self.std)


NORM_WEIGHT = Init(0.02, 1.0)  # a norm's scale starts at 1, as every norm layer initialises it
SMALL = Init(0.02)  # biases and other vectors: near their zero start, but not exactly, so a dropped term shows


def _generic_init(name: str, shape: torch.Size) -> Init:
    """By shape: fan-in scaling keeps activations O(1) through depth; embeddings are N(0, 1) rows."""
    if len(shape) >= 2 and "embed_tokens" not in name and name != "shared.weight":
        return Init(math.prod(shape[1:]) ** -0.5)
    if "norm" in name and name.endswith("weight"):
        return NORM_WEIGHT
    return Init(1.0) if len(shape) >= 2 else SMALL


def _architecture_inits(module: torch.nn.Module) -> dict[str, Init]:
    """The scales each architecture's own initialisation sets where generic fan-in scaling would be wrong, by module
    class and with the config at hand.

    UMT5 (transformers' UMT5PreTrainedModel._init_weights, Mesh TensorFlow's): attention logits carry no 1/sqrt(d_kv),
    the scale lives in the query weights (std (d_model x d_kv)^-1/2) and the relative position bias starts at std
    d_model^-1/2. With fan-in queries the logits are d_kv^1/2 = 8x too large, softmax saturates, and a random encoder
    turns bf16 rounding into unrelated embeddings within 24 layers (docs/hardware.md, "A random model that rounds like
    a trained one"). The Wan VAE's RMS norms start at gamma 1, bias 0 (WanRMS_norm), not as a matrix. The DiT's
    modulation tables start at std dim^-1/2 (WanTransformerBlock, WanTransformer3DModel).
    """
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm
    from diffusers.models.transformers.transformer_wan import WanTransformer3DModel, WanTransformerBlock
    from transformers.models.umt5.modeling_umt5 import UMT5Attention

    inits: dict[str, Init] = {}
    for prefix, sub in module.named_modules():
        at = f"{prefix}." if prefix else ""
        if isinstance(sub, UMT5Attention):
            d_model, d_kv = sub.d_model, sub.key_value_proj_dim
            inits[f"{at}q.weight"] = Init((d_model * d_kv) ** -0.5)
            if sub.has_relative_attention_bias:
                inits[f"{at}relative_attention_bias.weight"] = Init(d_model ** -0.5)
        elif isinstance(sub, WanRMS_norm):
            inits[f"{at}gamma"] = NORM_WEIGHT
            inits[f"{at}bias"] = SMALL
        elif isinstance(sub, (WanTransformerBlock, WanTransformer3DModel)):
            inits[f"{at}scale_shift_table"] = Init(sub.scale_shift_table.shape[-1] ** -0.5)
    return inits


def init_plan(module: torch.nn.Module) -> dict[str, Init]:
    """Every parameter's Init, by the name seeded_init draws it by (tied parameters appear once)."""
    special = _architecture_inits(module)
    return {name: special.get(name) or _generic_init(name, param.shape) for name, param in module.named_parameters()}


@torch.no_grad()
def seeded_init(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill every parameter from an fp32 draw seeded by (seed, name), whatever the module's dtype.

    Building in bf16 or fp32 therefore gives the same weights up to rounding, which the parity
    cases rely on, and 40 A14B layers can be initialised directly in bf16 on the GPU.
    """
    plan = init_plan(module)
    for name, param in module.named_parameters():
        gen = torch.Generator(device=param.device).manual_seed(_param_seed(seed, name))
        draw = torch.randn(param.shape, generator=gen, device=param.device, dtype=torch.float32)
        param.copy_(plan[name].apply(draw))
        del draw
    return module


@torch.no_grad()
def _fill_in_chunks(name: str, param: torch.Tensor, init: Init, seed: int) -> None:
    """seeded_init's values for one CPU parameter, drawn FILL_CHUNK elements at a time (a small fp32 scratch).

    The same numbers as one whole draw: the CPU normal_ fills uniforms in order and transforms them in blocks of
    16, redrawing a tail shorter than 16 from fresh uniforms; so chunks of a multiple of 16 elements, of which the
    last holds at least 16, consume and transform the generator's stream exactly as one draw of the whole does.
    """
    flat, total = param.view(-1), param.numel()
    gen = torch.Generator().manual_seed(_param_seed(seed, name))
    scratch = torch.empty(min(total, FILL_CHUNK + 16), dtype=torch.float32)
    start = 0
    while start < total:
        size = min(FILL_CHUNK, total - start)
        if total - start - size < 16:  # never leave a last chunk shorter than 16: fold it into this one
            size = total - start
        draw = scratch[:size].normal_(generator=gen)
        flat[start:start + size].copy_(init.apply(draw))
        start += size


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Register every new nn.Parameter on the meta device, as accelerate's init_empty_weights(include_buffers=False).

    The default initialisation (reset_parameters) then costs nothing; buffers stay real, so tables such as the
    DiT's RoPE frequencies are computed as usual.
    """
    original = torch.nn.Module.register_parameter

    def register(self, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


def _materialize(module: torch.nn.Module, device: str) -> list[tuple[str, torch.Tensor]]:
    """Give each meta parameter uninitialised storage on `device` in its dtype; tied parameters stay tied.

    Returns (name, parameter) in named_parameters order, the names seeded_init draws by.
    """
    real = {id(p): torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device), requires_grad=False)
            for p in module.parameters()}
    for sub in module.modules():
        for name, param in sub._parameters.items():
            if param is not None:
                sub._parameters[name] = real[id(param)]
    return list(module.named_parameters())


def _build(cls, config: dict, seed: int, device: str, dtype: torch.dtype):
    """Construct with parameters on meta, allocate each in the dtype from_pretrained(torch_dtype=dtype) gives it on the
    target device, fill it seeded.

    The values are seeded_init's whichever way they are filled: on the CPU in chunks, FILL_THREADS parameters at a
    time (the draws hold the GIL only between chunks); on CUDA with one draw per parameter, as Philox offsets move
    per call, so a chunked draw would change them. On device "meta" nothing is allocated: a skeleton that holds
    the module's structure and config, not its weights.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # as from_pretrained constructs: buffers outside the state dict keep what this makes
    try:
        with torch.device(device), _parameters_on_meta():
            module = cls(**config)
    finally:
        torch.set_default_dtype(previous)
    as_loaded(module, dtype)
    if torch.device(device).type != "meta":
        params = _materialize(module, device)
        if torch.device(device).type == "cpu":
            plan = init_plan(module)
            params.sort(key=lambda item: -item[1].numel())  # largest first, so the threads finish together
            with ThreadPoolExecutor(FILL_THREADS) as pool:
                list(pool.map(lambda item: _fill_in_chunks(item[0], item[1], plan[item[0]], seed), params))
        else:
            seeded_init(module, seed)
    return module.eval().requires_grad_(False)


def as_loaded(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast each floating state-dict entry of `module` to the dtype from_pretrained(torch_dtype=dtype) loads it in:
    `dtype`, or fp32 where the library keeps it so (kept_in_fp32). Buffers outside the state dict (the DiT's RoPE
    tables) are not loaded, so they keep the dtype their constructor gave them."""
    fp32 = kept_in_fp32(module, dtype)
    for name, tensor in module.state_dict(keep_vars=True).items():
        if tensor.is_floating_point():  # in place, so tied parameters stay one tensor
            tensor.data = tensor.data.to(torch.float32 if name in fp32 else dtype)
    return module


def kept_in_fp32(module: torch.nn.Module, dtype: torch.dtype) -> set[str]:
    """The floating state-dict entries of `module` that from_pretrained(torch_dtype=dtype) of its class holds in fp32,
    by its library's own rule, so that a random source holds what a checkpoint loads.

    diffusers (ModelMixin.from_pretrained, then load_model_dict_into_meta) keeps, whatever torch_dtype, every entry
    with one of the class's _keep_in_fp32_modules among the dotted parts of its name: a root parameter such as the
    DiT's scale_shift_table as well as a submodule's. transformers keeps the entries its dtype plan names
    (PreTrainedModel._get_dtype_plan, globs searched in the name): for UMT5 none in bf16, `wo` in fp16.
    """
    names = [name for name, tensor in module.state_dict(keep_vars=True).items() if tensor.is_floating_point()]
    if dtype == torch.float32:
        return set(names)
    dtype_plan = getattr(module, "_get_dtype_plan", None)
    if dtype_plan is not None:
        globs = [re.compile(glob.replace("*", ".*")) for glob, kept in dtype_plan(dtype).items() if kept == torch.float32]
        return {name for name in names if any(glob.search(name) for glob in globs)}
    keep = set(getattr(module, "_keep_in_fp32_modules", None) or ())
    return {name for name in names if keep.intersection(name.split("."))}


def random_fingerprint(config: dict, seed: int) -> str:
    """What seeded random weights are: the config, the seed and the init recipe (the export cache keys on it)."""
    blob = json.dumps(dict(config), sort_keys=True, default=str) + f"{INIT_RECIPE}/seed{seed}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _random_parts(source: str, layers: int = 2) -> tuple[str, dict[str, tuple[Callable, dict, int]]]:
    """A random source's label and, per weighted component, (class, config, seed): what its weights are drawn from."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    if source == "tiny":
        label, dit, vae, umt5 = "tiny (random weights)", TINY_TRANSFORMER, TINY_VAE, TINY_UMT5
    else:
        if not 1 <= layers <= A14B_TRANSFORMER["num_layers"]:
            raise HarnessError(f"--proxy-layers {layers} must be between 1 and 40")
        # The text encoder takes as many layers as the experts, up to the real UMT5-XXL's 24: at 40 it would be
        # bigger than the encoder it stands for.
        label, dit, vae = f"proxy, {layers} of 40 layers", {**A14B_TRANSFORMER, "num_layers": layers}, {}
        umt5 = {**UMT5_XXL, "num_layers": min(layers, UMT5_XXL["num_layers"])}
    return label, {"transformer": (WanTransformer3DModel, dit, EXPERT_SEEDS["transformer"]),
                   "transformer_2": (WanTransformer3DModel, dit, EXPERT_SEEDS["transformer_2"]),
                   "vae": (AutoencoderKLWan, vae, 2),
                   "text_encoder": (lambda **c: UMT5EncoderModel(UMT5Config(**c)), umt5, 3)}


def model_identity(source: str, *, layers: int = 2, path=None) -> dict:
    """WanModel.identity() of the model `load_model` would give, read without building it (a stored video is
    served without the 57 GB of a 40-layer fp32 expert): the same fingerprints and pipeline settings."""
    pipeline = {f.name: f.default for f in fields(WanModel) if f.name in PIPELINE_SETTINGS}
    if source == "checkpoint":
        root = Path(path).expanduser()
        pipeline["boundary_ratio"] = _read_json(root / "model_index.json")["boundary_ratio"]
        return {"fingerprints": {sub: _checkpoint_fingerprint(root / sub) for sub in SUBFOLDERS}, **pipeline}
    _, parts = _random_parts(source, layers)
    return {"fingerprints": {name: random_fingerprint(cfg, seed) for name, (_, cfg, seed) in parts.items()}, **pipeline}


def _random_model(source: str, layers: int, device: str, dtype: torch.dtype) -> WanModel:
    label, parts = _random_parts(source, layers)
    built = {name: _build(cls, cfg, seed, device, dtype) for name, (cls, cfg, seed) in parts.items()}
    return WanModel(source=source, label=label, tokenizer=make_tokenizer(), scheduler=make_scheduler(),
                    fingerprints={name: random_fingerprint(cfg, seed) for name, (_, cfg, seed) in parts.items()},
                    **built)


def _rebuild(cls, config: dict, seed: int, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """A random component's recipe: the same seeded weights, built on `device`."""
    return _build(cls, config, seed, str(device), dtype)


def skeletons(source: str, dtype: torch.dtype, *, layers: int = 2, path=None) -> dict[str, torch.nn.Module]:
    """Each weighted component on the meta device (structure, config and dtypes, no weights), built in no time:
    what the memory plan counts and what a managed model starts from."""
    if source == "checkpoint":
        root = Path(path).expanduser()
        index = _read_json(root / "model_index.json")
        return {sub: _checkpoint_skeleton(root, sub, index[sub][1], dtype) for sub in LOADED_CLASSES}
    _, parts = _random_parts(source, layers)
    return {name: _build(cls, cfg, seed, "meta", dtype) for name, (cls, cfg, seed) in parts.items()}


def managed_model(source: str, residency, *, dtype: torch.dtype, layers: int = 2, path=None) -> WanModel:
    """A WanModel whose weighted components take turns on the device under `residency` (harness.residency): each
    starts without weights and gets them, from its seed or its checkpoint files, when it first runs."""
    precision = str(dtype).removeprefix("torch.")
    if source == "checkpoint":
        root = check_checkpoint_folder(path)
        index = _read_json(root / "model_index.json")
        with _quiet_libraries():
            small = {sub: _load_component(root, sub, *index[sub], dtype) for sub in ("tokenizer", "scheduler")}
        parts = {sub: residency.manage(module, f"{sub} {precision}",
                                       partial(_load_onto, root, sub, tuple(index[sub]), dtype))
                 for sub, module in skeletons(source, dtype, path=root).items()}
        return WanModel(source="checkpoint", label=f"checkpoint {root.name}", **small, **parts,
                        fingerprints={s: _checkpoint_fingerprint(root / s) for s in SUBFOLDERS},
                        boundary_ratio=index["boundary_ratio"])
    label, specs = _random_parts(source, layers)
    parts = {name: residency.manage(_build(cls, cfg, seed, "meta", dtype), f"{name} {precision}",
                                    partial(_rebuild, cls, cfg, seed, dtype))
             for name, (cls, cfg, seed) in specs.items()}
    return WanModel(source=source, label=label, tokenizer=make_tokenizer(), scheduler=make_scheduler(),
                    fingerprints={name: random_fingerprint(cfg, seed) for name, (_, cfg, seed) in specs.items()},
                    **parts)


def load_expert(layers: int = 40, *, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                config: dict = A14B_TRANSFORMER):
    """One A14B-width expert alone (the proxy's `transformer` at `layers` depth), for timing-only cases; with
    `config` TINY_TRANSFORMER, a tiny-width one of `layers` layers (deeper than the tiny source's 2).

    The full 40-layer expert is 28.6 GB in bf16: it fits an H100 only without the second expert,
    the text encoder and an fp32 reference beside it.
    """
    from diffusers import WanTransformer3DModel

    return _build(WanTransformer3DModel, {**config, "num_layers": layers}, seed, device, dtype)


def check_checkpoint_folder(path: str | os.PathLike | None) -> Path:
    """Raise HarnessError naming what is missing, damaged or mismatched in a diffusers Wan folder, without loading
    weights.

    Every JSON file is parsed, every safetensors header read and the components' dimensions compared, so a file
    cut short by a failed copy or a folder of another model is named here, before any case runs, rather than
    failing each case inside from_pretrained.
    """
    if not path:
        raise HarnessError("model source 'checkpoint' needs --model-path or WAN_MODEL_PATH pointing at a "
                           "local diffusers Wan2.2-T2V-A14B folder")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise HarnessError(f"checkpoint folder {root} {_not_there(root)}; point --model-path at a local "
                           f"diffusers folder with model_index.json and {', '.join(SUBFOLDERS)}/")
    missing = [s for s in ("model_index.json", *SUBFOLDERS) if not (root / s).exists()]
    if missing:
        raise HarnessError(f"checkpoint folder {root} lacks {', '.join(missing)}; a diffusers Wan2.2 "
                           f"folder holds model_index.json and the subfolders {', '.join(SUBFOLDERS)}/")
    _check_pipeline_index(root / "model_index.json")
    for sub in SUBFOLDERS:
        if not (root / sub).is_dir():
            raise HarnessError(f"{root / sub} is not a folder; a diffusers checkpoint keeps each component in a "
                               "folder of its name: copy the component's folder again")
        for required in REQUIRED_FILES.get(sub, ("config.json",)):
            if not (root / sub / required).is_file():
                raise HarnessError(f"{root / sub / required} {_not_there(root / sub / required)}; the "
                                   f"checkpoint's {sub} needs it: copy the file again")
    if not any((root / "tokenizer" / name).is_file() for name in TOKENIZER_VOCABULARIES):
        raise HarnessError(f"{root / 'tokenizer'} holds neither {' nor '.join(TOKENIZER_VOCABULARIES)}; copy the "
                           "tokenizer folder again")
    for json_file in sorted(root.glob("*/*.json")):
        _read_json(json_file)
    headers = {weights: check_safetensors(weights) for weights in sorted(root.glob("*/*.safetensors"))}
    for index in sorted(root.glob("*/*.index.json")):
        weight_map = _read_json(index).get("weight_map")
        if not (isinstance(weight_map, dict) and weight_map
                and all(isinstance(v, str) for v in weight_map.values())):
            raise HarnessError(f"{index} has no weight_map of tensor names to shard files; the checkpoint is "
                               "damaged: copy the file again")
        absent = sorted(s for s in set(weight_map.values()) if not (index.parent / s).is_file())
        if absent:
            raise HarnessError(f"{index} names shards that are not there: {', '.join(absent)}; copy them again")
    for sub, stem in WEIGHT_STEMS.items():
        names = [stem + ext for ext in (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")]
        if not any((root / sub / name).is_file() for name in names):
            raise HarnessError(f"{root / sub} holds none of {', '.join(names)}; copy the component's weights "
                               "(and the index of sharded ones) again")
    _check_dimensions(root)
    for sub in LOADED_CLASSES:
        _check_tensors(root, sub, headers)
    return root


def _not_there(path: Path) -> str:
    """Why a path that should be a folder (or a file) is not one."""
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symlink loop"
        return "is a dangling symlink" if path.is_symlink() else "does not exist"
    return "is a file, not a folder" if not path.is_dir() else "is a folder, not a file"


def _check_pipeline_index(index_path: Path) -> None:
    """model_index.json must describe the pipeline this harness runs: a two-expert WanPipeline, text to video."""
    index = _read_json(index_path)
    if index.get("_class_name") != "WanPipeline":
        raise HarnessError(f"{index_path} names the pipeline {index.get('_class_name')!r}; this harness runs "
                           "Wan2.2-T2V-A14B checkpoints, whose _class_name is WanPipeline")
    if not _is_entry(index.get("transformer_2")) or index.get("expand_timesteps"):
        raise HarnessError(f"{index_path.parent} is a single-expert checkpoint (no transformer_2, or "
                           "expand_timesteps); this harness needs the two-expert A14B layout (Wan2.2-T2V-A14B): "
                           "single-expert Wan2.1 and Wan2.2-TI2V-5B checkpoints are not supported")
    for sub in SUBFOLDERS:
        expected = LOADED_CLASSES.get(sub)
        if not _is_entry(index.get(sub)) or index[sub] != (expected or index[sub]):
            raise HarnessError(f"{index_path} gives {sub} as {index.get(sub)!r}; a Wan2.2-T2V-A14B checkpoint names "
                               f"each component as [library, class]{f', here {expected}' if expected else ''}")
    ratio = index.get("boundary_ratio")
    if not (isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and 0 < ratio < 1):
        raise HarnessError(f"{index_path} has boundary_ratio {ratio!r}; it must be a number strictly between 0 "
                           "and 1 (Wan2.2-T2V-A14B's is 0.875)")


def _is_entry(entry) -> bool:
    """A model_index.json component: [library, class], both named."""
    return isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)


def _check_dimensions(root: Path) -> None:
    """The sizes that flow from one component into the next must agree, and those the shape check and the loader
    read must be positive whole numbers: otherwise the first forward fails far from the cause."""
    experts = dit_configs("checkpoint", root)
    for name, config in experts.items():
        for key in DIT_SIZES:
            if not _positive_int(config[key]):
                raise HarnessError(f"{root / name / 'config.json'} has {key} {config[key]!r}; it must be a whole "
                                   "number >= 1")
        patch = config["patch_size"]
        if not (isinstance(patch, (list, tuple)) and len(patch) == 3 and all(_positive_int(p) for p in patch)):
            raise HarnessError(f"{root / name / 'config.json'} has patch_size {patch!r}; it must be 3 whole "
                               "numbers >= 1 (frames, height, width), as Wan2.2's [1, 2, 2]")
        config["patch_size"] = tuple(patch)  # JSON gives a list, the defaults a tuple: compare them as equals
    first, second = experts["transformer"], experts["transformer_2"]
    for key in EXPERTS_AGREE_ON:
        _agree(f"transformer {key}", first[key], f"transformer_2 {key}", second[key])
    vae = _read_json(root / "vae" / "config.json")
    text = _read_json(root / "text_encoder" / "config.json")
    for key in ("in_channels", "out_channels"):
        _agree(f"the experts' {key}", first[key], "the vae's z_dim", vae.get("z_dim"))
    _agree("the experts' text_dim", first["text_dim"], "the text encoder's d_model", text.get("d_model"))
    if not (root / "tokenizer" / "tokenizer.json").is_file():
        return  # a SentencePiece model only: its ids are checked when the tokenizer loads and encodes
    ids = _tokenizer_ids(root / "tokenizer" / "tokenizer.json")
    if not isinstance(text.get("vocab_size"), int) or max(ids) >= text["vocab_size"]:
        raise HarnessError(f"the tokenizer's ids reach {max(ids)} but the text encoder's vocab_size is "
                           f"{text.get('vocab_size')!r}; {root} mixes components of different models: copy "
                           "tokenizer/ and text_encoder/ from the same checkpoint")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _agree(what: str, value, other: str, other_value) -> None:
    if value != other_value:
        raise HarnessError(f"checkpoint components disagree: {what} is {value!r} but {other} is {other_value!r}; "
                           "the folder mixes components of different models: copy them from one Wan2.2-T2V-A14B "
                           "checkpoint")


def _tokenizer_ids(path: Path) -> list[int]:
    """Every token id a tokenizer.json can produce: its model's vocabulary and its added tokens."""
    doc = _read_json(path)
    vocab = doc.get("model", {}).get("vocab") if isinstance(doc.get("model"), dict) else None
    added = doc.get("added_tokens")
    try:
        ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
        ids += [token["id"] for token in added]
    except (TypeError, KeyError, AttributeError):
        ids = []
    if not ids or not all(isinstance(i, int) for i in ids):
        raise HarnessError(f"{path} has no model vocabulary and added_tokens list; the checkpoint is damaged: "
                           "copy the file again")
    return ids


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise HarnessError(f"{path} is unreadable ({type(exc).__name__}: {exc}); the checkpoint is damaged: "
                           "copy the file again") from None
    if not isinstance(doc, dict):
        raise HarnessError(f"{path} is not a JSON object; the checkpoint is damaged: copy the file again")
    return doc


def check_safetensors(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """A safetensors file is an 8-byte little-endian header length, a JSON header, then the tensor data at the
    offsets the header declares: the file must hold the header and end exactly at the largest declared offset (the
    safetensors loader refuses a file longer than that). Returns each tensor's dtype and shape, by name."""
    if not path.is_file():
        raise HarnessError(f"{path} {_not_there(path)}; copy the weights file again")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else None
        if length is None or 8 + length > size:
            raise HarnessError(f"{path} is cut short: its {size} bytes do not hold the safetensors header "
                               "it declares; copy the file again")
        try:
            header = json.loads(f.read(length))
            tensors = {k: (t["dtype"], tuple(t["shape"])) for k, t in header.items() if k != "__metadata__"}
            end = max((header[k]["data_offsets"][1] for k in tensors), default=0)
            # Every Wan weight is floating point; from_pretrained would cast an integer tensor silently.
            integral = sorted(k for k, (dtype, _) in tensors.items() if not dtype.startswith(("F", "BF")))
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise HarnessError(f"{path} has a damaged safetensors header ({type(exc).__name__}: {exc}); "
                               "copy the file again") from None
    if integral:
        raise HarnessError(f"{path} holds non-floating tensors where weights belong: {', '.join(integral[:5])} "
                           f"({tensors[integral[0]][0]}); the file is not these weights: copy it again")
    if 8 + length + end > size:
        raise HarnessError(f"{path} is cut short: its header declares {8 + length + end:,} bytes, the file holds "
                           f"{size:,}; copy the file again")
    if 8 + length + end < size:
        raise HarnessError(f"{path} has {size - 8 - length - end:,} bytes past the {8 + length + end:,} its header "
                           "declares (written over a longer file?), which safetensors refuses to load; copy the file "
                           "again")
    return tensors


def _check_tensors(root: Path, sub: str, headers: dict[Path, dict[str, tuple[str, tuple[int, ...]]]]) -> None:
    """Every tensor from_pretrained needs for `sub` must be in its safetensors headers, in the shape its config.json
    builds: a missing or misshapen tensor is named here rather than minutes into loading, in every case. Tensors
    the model does not use are left to the loader, which logs them; .bin weights have no header to read."""
    library, cls_name = LOADED_CLASSES[sub]
    where, files = _weight_files(root / sub, WEIGHT_STEMS[sub], library)
    if not files:
        log.debug("checkpoint %s has no safetensors weights; its tensors are checked when it loads", sub)
        return
    held = {name: (path, shape) for path in files
            for name, (_, shape) in (headers[path] if path in headers else check_safetensors(path)).items()}
    needed = _needed_tensors(root / sub, library, cls_name)
    missing = sorted(names[0] for names, _ in needed if not any(n in held for n in names))
    if missing:
        raise HarnessError(f"{where} lacks {len(missing)} of the {len(needed)} tensors {sub}/config.json needs: "
                           f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; the weights are incomplete "
                           "or of another model: copy the component again")
    for names, shape in needed:
        for name in (n for n in names if n in held and held[n][1] != shape):
            path, found = held[name]
            raise HarnessError(f"{path} holds {name} as {list(found)} where {sub}/config.json builds "
                               f"{list(shape)}; the weights and the config are of different models: copy the "
                               "component again")


def _weight_files(folder: Path, stem: str, library: str) -> tuple[Path, list[Path]]:
    """The safetensors files from_pretrained reads for a component, and the file that names them (the single file,
    or the index of shards); no files where the weights are .bin. Where both a single file and an index are there,
    transformers reads the single file and diffusers the index."""
    single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
    chosen = next((p for p in ((single, index) if library == "transformers" else (index, single)) if p.is_file()),
                  None)
    if chosen == index:  # check_checkpoint_folder has vetted the weight_map and that its shards are there
        return index, sorted({folder / shard for shard in _read_json(index)["weight_map"].values()})
    return single, [single] if chosen else []


def _needed_tensors(folder: Path, library: str, cls_name: str) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    """What from_pretrained fills from the weights: the state_dict the config builds (non-persistent buffers such as
    the DiT's RoPE tables are not in it), built on the meta device so nothing is allocated, less what the class says
    may be missing. Each entry is one tensor's names and shape: a tied tensor (UMT5's shared.weight, also
    encoder.embed_tokens.weight) has several, and a checkpoint may store it under any of them."""
    cls = getattr(importlib.import_module(library), cls_name)
    config = _read_json(folder / "config.json")
    try:
        with torch.device("meta"):
            module = cls(cls.config_class.from_dict(config)) if library == "transformers" else cls.from_config(config)
    except Exception as exc:  # whatever a bad config makes the constructor raise: one line, no traceback
        cause = (str(exc).strip().splitlines() or [""])[0][:300]
        raise HarnessError(f"{folder / 'config.json'} does not build a {cls_name} ({type(exc).__name__}: {cause}); "
                           "copy the component again") from None
    optional = [re.compile(p) for p in getattr(module, "_keys_to_ignore_on_load_missing", None) or ()]
    tensors: dict[int, tuple[list[str], tuple[int, ...]]] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():  # keep_vars: tied names share one object
        if not any(p.search(name) for p in optional):
            tensors.setdefault(id(tensor), ([], tuple(tensor.shape)))[0].append(name)
    return [(tuple(names), shape) for names, shape in tensors.values()]


def dit_configs(source: str, path: str | os.PathLike | None = None) -> dict[str, dict]:
    """Each DiT expert's config as a shape check needs it (patch_size, rope_max_seq_len), without building it.

    A checkpoint's own transformer*/config.json decides; diffusers' defaults (the A14B values) fill what it omits.
    """
    if source == "tiny":
        return {"transformer": TINY_TRANSFORMER, "transformer_2": TINY_TRANSFORMER}
    if source == "proxy":
        return {"transformer": A14B_TRANSFORMER, "transformer_2": A14B_TRANSFORMER}
    root = Path(path).expanduser()  # check_checkpoint_folder has vetted it (harness.settings calls it first)
    return {name: {**A14B_TRANSFORMER, **_read_json(root / name / "config.json")}
            for name in ("transformer", "transformer_2")}


def _checkpoint_fingerprint(folder: Path) -> str:
    """Where each file of a component lives and when its content last changed, without reading 57 GB of weights.

    The resolved path and inode tell two checkpoints with the same file names and sizes apart. The change time
    in nanoseconds catches a rewrite, even one that restores the old modification time (`cp -p`, `rsync -a`, a tar
    extract, `touch -r`): the kernel sets ctime on every write and nothing but the clock can set it back. A
    checkpoint moved or copied elsewhere is exported again, which costs time, never correctness.
    """
    entries = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        entries.append((str(path.resolve()), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns))
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def _checkpoint_model(path, device: str, dtype: torch.dtype) -> WanModel:
    root = check_checkpoint_folder(path)
    index = _read_json(root / "model_index.json")
    with _quiet_libraries():
        parts = {sub: _load_component(root, sub, *index[sub], dtype) for sub in SUBFOLDERS}
    if parts["tokenizer"].pad_token is None:
        raise HarnessError(f"{root / 'tokenizer'} has no padding token (pad_token in tokenizer_config.json); "
                           "copy the tokenizer folder again")
    for sub in LOADED_CLASSES:
        parts[sub] = parts[sub].to(device).eval()
    return WanModel(source="checkpoint", label=f"checkpoint {root.name}", **parts,
                    fingerprints={s: _checkpoint_fingerprint(root / s) for s in SUBFOLDERS},
                    boundary_ratio=index["boundary_ratio"])


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """No loading reports or progress bars from diffusers and transformers: what they would warn about (tensors
    missing, newly initialised) _load_component raises as one line instead."""
    from transformers.utils import logging as transformers_logging

    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers")]
    levels = [logger.level for logger in loggers]
    bars = transformers_logging.is_progress_bar_enabled()
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if bars:
            transformers_logging.enable_progress_bar()


def _checkpoint_skeleton(root: Path, sub: str, cls_name: str, dtype: torch.dtype) -> torch.nn.Module:
    """A checkpoint component built from its config.json alone, on the meta device, in the dtypes it loads with."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=True):
        if sub == "text_encoder":
            from transformers import UMT5Config, UMT5EncoderModel

            module = UMT5EncoderModel(UMT5Config.from_dict(_read_json(root / sub / "config.json")))
        else:
            cls = getattr(importlib.import_module("diffusers"), cls_name)
            module = cls.from_config(cls.load_config(root / sub))
    return as_loaded(module, dtype).eval().requires_grad_(False)


def _load_onto(root: Path, sub: str, entry: tuple[str, str], dtype: torch.dtype, device: torch.device):
    """A checkpoint component's recipe: its weights read from the folder, in `dtype`, onto `device`."""
    with _quiet_libraries():
        return _load_component(root, sub, *entry, dtype).to(device).eval()


def _load_component(root: Path, sub: str, library: str, cls_name: str, dtype: torch.dtype):
    """One component by the class model_index.json names; any failure, or a tensor that the weights lack, hold
    in another shape or hold beyond the model, is one line naming the component: from_pretrained would otherwise
    leave a missing tensor newly initialised, or on meta, and a case would fail far from the cause."""
    cls = getattr(importlib.import_module(library), cls_name, None) if library in ("diffusers", "transformers") else None
    if cls is None:
        raise HarnessError(f"{root / 'model_index.json'} gives {sub} the class {library}.{cls_name}, which this "
                           "environment does not have; a Wan2.2-T2V-A14B checkpoint names diffusers and "
                           "transformers classes")
    weighted = sub in LOADED_CLASSES
    options = dict(torch_dtype=dtype, output_loading_info=True) if weighted else {}
    try:
        loaded = cls.from_pretrained(root / sub, local_files_only=True, **options)
    except Exception as exc:  # whatever the library raises on a damaged or mismatched file: one line, no traceback
        cause = (str(exc).strip().splitlines() or [""])[0][:300]
        raise HarnessError(f"checkpoint {sub} does not load from {root / sub} ({type(exc).__name__}: {cause}); "
                           "copy the component again") from None
    if not weighted:
        return loaded
    module, info = loaded
    if info.get("unexpected_keys"):  # tensors the model does not use: nothing is left uninitialised, so say it only
        log.warning("checkpoint %s holds %d tensors its model does not use (e.g. %s); they are ignored", sub,
                    len(info["unexpected_keys"]), sorted(map(str, info["unexpected_keys"]))[0])
    for kind in ("missing_keys", "mismatched_keys", "error_msgs"):
        if info.get(kind):
            names = sorted(str(k) for k in info[kind])
            raise HarnessError(f"checkpoint {sub}'s weights do not match its config.json: {kind.replace('_', ' ')} "
                               f"{', '.join(names[:5])}{' ...' if len(names) > 5 else ''} ({len(names)} in all); "
                               "copy the component again")
    return module


def load_model(source: str = "tiny", *, device: str = "cpu", dtype: torch.dtype = torch.float32,
               layers: int = 2, path=None) -> WanModel:
    """Build or load a WanModel; random sources are deterministic for a given (source, layers)."""
    if source in ("tiny", "proxy"):
        return _random_model(source, layers, device, dtype)
    if source == "checkpoint":
        return _checkpoint_model(path or os.environ.get("WAN_MODEL_PATH"), device, dtype)
    raise HarnessError(f"unknown model source {source!r}; choose one of {', '.join(SOURCES)}")
