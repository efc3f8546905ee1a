"""Options, markers and the session fixtures many cases share (models built once per session)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from harness.case import check_precision
from harness.errors import HarnessError
from harness.models import SOURCES, WanModel, load_model
from harness.shapes import VideoShape, parse_shapes

DEFAULT_SHAPES = {"tiny": "16x16x9", "proxy": "480p", "checkpoint": "480p"}


def pytest_addoption(parser):
    g = parser.getgroup("wan-trt-bench")
    g.addoption("--model-source", choices=SOURCES, default="tiny", help="tiny (default, CPU) | proxy | checkpoint")
    g.addoption("--model-path", default=os.environ.get("WAN_MODEL_PATH"), help="local diffusers Wan folder")
    g.addoption("--proxy-layers", type=int, default=2, help="DiT layers of the proxy source (of 40)")
    g.addoption("--backends", default="torch,inductor,torch-fp8,onnxruntime,tensorrt,tensorrt_rtx",
                help="comma-separated backends for parity cases")
    g.addoption("--candidate", default="tensorrt", help="the backend the speed-up gate judges")
    g.addoption("--precisions", default="fp32,fp16,bf16", help="comma-separated: fp32, fp16, bf16, fp8")
    g.addoption("--shapes", default=None, help="presets or HxWxF, comma-separated (default per source)")
    g.addoption("--steps", type=int, default=None, help="denoising steps (default 4 tiny, 40 otherwise)")
    g.addoption("--speedup-gate", type=float, default=1.5, help="minimum candidate/eager speed-up")
    g.addoption("--results-dir", default="results", help="run folders are written under here")
    g.addoption("--cache-dir", default=os.environ.get("WAN_BENCH_CACHE", ".cache"),
                help="ONNX files and engines (git-ignored)")
    g.addoption("--device", default=None, help="cuda or cpu (default: cuda when available)")


@dataclass(frozen=True)
class Settings:
    """The parsed options, validated once so a typo fails the session with one clear line."""

    source: str
    model_path: str | None
    proxy_layers: int
    backends: tuple[str, ...]
    candidate: str
    precisions: tuple[str, ...]
    shapes: tuple[VideoShape, ...]
    steps: int
    speedup_gate: float
    results_dir: Path
    cache_dir: Path
    device: str


def _settings(config) -> Settings:
    opt = config.getoption
    source = opt("--model-source")
    device = opt("--device") or ("cuda" if torch.cuda.is_available() else "cpu")
    return Settings(
        source=source, model_path=opt("--model-path"), proxy_layers=opt("--proxy-layers"),
        backends=tuple(b.strip() for b in opt("--backends").split(",") if b.strip()),
        candidate=opt("--candidate"),
        precisions=tuple(check_precision(p.strip()) for p in opt("--precisions").split(",") if p.strip()),
        shapes=tuple(parse_shapes(opt("--shapes") or DEFAULT_SHAPES[source])),
        steps=opt("--steps") or (4 if source == "tiny" else 40), speedup_gate=opt("--speedup-gate"),
        results_dir=Path(opt("--results-dir")), cache_dir=Path(opt("--cache-dir")), device=device)


def pytest_configure(config):
    try:
        config.wan_settings = _settings(config)
    except HarnessError as exc:
        raise pytest.UsageError(str(exc)) from None


@pytest.fixture(scope="session")
def settings(request) -> Settings:
    return request.config.wan_settings


class ModelPool:
    """Builds each (source, dtype) model once per session; random sources give equal weights across dtypes."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._models: dict[tuple, WanModel] = {}

    def get(self, dtype: torch.dtype = torch.float32, device: str | None = None) -> WanModel:
        s = self.settings
        key = (s.source, dtype, device or s.device)
        if key not in self._models:
            self._models[key] = load_model(s.source, device=key[2], dtype=dtype, layers=s.proxy_layers,
                                           path=s.model_path)
        return self._models[key]


@pytest.fixture(scope="session")
def models(settings) -> ModelPool:
    try:
        return ModelPool(settings)
    except HarnessError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def cache_dir(settings) -> Path:
    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    return settings.cache_dir
