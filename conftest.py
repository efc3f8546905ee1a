"""Options, markers and the session fixtures many cases share (models built once per session)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness import workers

# Under `pytest -n <gpus>` each xdist worker takes its own GPU. This must run before torch can
# initialise CUDA, which reads CUDA_VISIBLE_DEVICES once; hence here, above `import torch`.
workers.pin_worker(os.environ)

import torch  # noqa: E402

from engines.base import BackendUnavailable, backend_for
from harness.case import COMPONENTS, Case, check_precision
from harness.components import example_inputs, make_component
from harness.errors import HarnessError
from harness.models import SOURCES, WanModel, check_checkpoint_folder, load_model
from harness.shapes import VideoShape, parse_shapes

DEFAULT_SHAPES = {"tiny": "16x16x9", "proxy": "480p", "checkpoint": "480p"}
GPU_BACKENDS = "torch,inductor,torch-fp8,onnxruntime,tensorrt,tensorrt_rtx"
# Inductor's CPU code generation takes minutes per component and precision on 2 cores (the VAE alone
# ~200 s), so the CPU default leaves it out; cases/test_backends.py still proves it on the CPU.
CPU_BACKENDS = "torch,torch-fp8,onnxruntime,tensorrt,tensorrt_rtx"


def pytest_addoption(parser):
    g = parser.getgroup("wan-trt-bench")
    g.addoption("--model-source", choices=SOURCES, default="tiny", help="tiny (default, CPU) | proxy | checkpoint")
    g.addoption("--model-path", default=os.environ.get("WAN_MODEL_PATH"), help="local diffusers Wan folder")
    g.addoption("--proxy-layers", type=int, default=2, help="DiT layers of the proxy source (of 40)")
    g.addoption("--backends", default=None,
                help=f"comma-separated backends (default on CUDA: {GPU_BACKENDS}; on the CPU: {CPU_BACKENDS})")
    g.addoption("--candidate", default="tensorrt", help="the backend the speed-up gate judges")
    g.addoption("--precisions", default=None,
                help="comma-separated: fp32, fp16, bf16, fp8 (default fp32,fp16,bf16, and fp8 when torch-fp8 is a backend)")
    g.addoption("--shapes", default=None, help="presets or HxWxF, comma-separated (default per source)")
    g.addoption("--steps", type=int, default=None, help="denoising steps (default 4 tiny, 40 otherwise)")
    g.addoption("--speedup-gate", type=float, default=1.5, help="minimum candidate/eager speed-up")
    g.addoption("--results-dir", default="results", help="run folders are written under here")
    g.addoption("--cache-dir", default=os.environ.get("WAN_BENCH_CACHE", ".cache"),
                help="ONNX files and engines (git-ignored)")
    g.addoption("--device", default=None, help="cuda or cpu (default: cuda when available)")
    g.addoption("--perf-rounds", type=int, default=10, help="timed rounds per side in perf cases")
    g.addoption("--perf-precision", default=None,
                help="precision of perf cases (default bf16 on CUDA, fp32 on CPU; torch-fp8 always fp8)")


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
    perf_precision: str
    perf_rounds: int


def _settings(config) -> Settings:
    opt = config.getoption
    source = opt("--model-source")
    if source == "checkpoint":  # a missing folder fails the session in one line, before any case runs
        check_checkpoint_folder(opt("--model-path"))
    device = opt("--device") or ("cuda" if torch.cuda.is_available() else "cpu")
    backends = tuple(b.strip() for b in (opt("--backends") or (GPU_BACKENDS if device == "cuda" else CPU_BACKENDS))
                     .split(",") if b.strip())
    # torch-fp8 runs fp8 only: without fp8 among the precisions its parity and quality cases would all skip.
    precisions = opt("--precisions") or ("fp32,fp16,bf16" + (",fp8" if "torch-fp8" in backends else ""))
    return Settings(
        source=source, model_path=opt("--model-path"), proxy_layers=opt("--proxy-layers"),
        backends=backends, candidate=opt("--candidate"),
        precisions=tuple(check_precision(p.strip()) for p in precisions.split(",") if p.strip()),
        shapes=tuple(parse_shapes(opt("--shapes") or DEFAULT_SHAPES[source])),
        steps=opt("--steps") or (4 if source == "tiny" else 40), speedup_gate=opt("--speedup-gate"),
        results_dir=Path(opt("--results-dir")), cache_dir=Path(opt("--cache-dir")), device=device,
        perf_rounds=opt("--perf-rounds"),
        perf_precision=check_precision(opt("--perf-precision") or ("bf16" if device == "cuda" else "fp32")))


def pytest_configure(config):
    try:
        config.wan_settings = _settings(config)
        # Made here, not in a fixture: under xdist the controller runs no fixtures, yet it owns the run
        # folder (it merges the workers' parts in pytest_sessionfinish). No rows, no folder.
        config.wan_recorder = workers.session_recorder(
            config.wan_settings.results_dir, getattr(config, "workerinput", None), os.environ,
            torch.cuda.device_count(), command="pytest " + " ".join(config.invocation_params.args))
    except HarnessError as exc:
        raise pytest.UsageError(str(exc)) from None
    # Backends that export or build find their on-disk cache here.
    os.environ["WAN_BENCH_CACHE"] = str(config.wan_settings.cache_dir)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """pytest-xdist, controller side: every worker writes into the controller's run folder."""
    node.workerinput.update(workers.worker_input(node.config.wan_recorder))


def pytest_runtest_setup(item):
    """Perf cases never time inside an xdist worker (see harness.workers.perf_skip_reason)."""
    reason = workers.perf_skip_reason(os.environ) if item.get_closest_marker("perf") else None
    if reason:
        pytest.skip(reason)


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
    return ModelPool(settings)


@pytest.fixture(scope="session")
def cache_dir(settings) -> Path:
    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    return settings.cache_dir


@pytest.fixture(scope="session")
def recorder(request, settings):
    """The run folder every case writes its rows into; finished (summary, plots) at session end."""
    return request.config.wan_recorder


@pytest.fixture(scope="session")
def record(recorder, settings):
    """record(table, case, backend, metrics, thresholds=None, passed=None): one Row per metric."""
    from harness.machine import device_name, versions_string
    from harness.results import Row

    def add(table, case, backend, metrics: dict, thresholds: dict | None = None, passed: dict | None = None,
            precision: str | None = None):
        for metric, value in metrics.items():
            recorder.add(table, Row(
                case=case.id, component=case.component, backend=backend, precision=precision or case.precision,
                shape=case.shape.id, tokens=case.shape.tokens, metric=metric,
                value=None if value is None else float(value),
                threshold=(thresholds or {}).get(metric), passed=(passed or {}).get(metric),
                device=device_name(settings.device), versions=versions_string()))
    return add


def pytest_sessionfinish(session):
    rec = getattr(session.config, "wan_recorder", None)
    if rec is not None:
        session.config.wan_summary = rec.finish()


def pytest_terminal_summary(terminalreporter, config):
    rec = getattr(config, "wan_recorder", None)
    if rec is not None and getattr(config, "wan_summary", None):
        terminalreporter.write_sep("=", "wan-trt-bench results")
        terminalreporter.write_line(rec.markdown())
        terminalreporter.write_line(f"summary: {config.wan_summary}")


def pytest_benchmark_update_machine_info(config, machine_info):
    """GPU, driver, CUDA, TensorRT and torch versions in the benchmark JSON (pytest-benchmark hook)."""
    from harness.machine import machine_info as wan_machine_info

    machine_info["wan"] = wan_machine_info()


class RunnerPool:
    """Builds each (backend, case) runner once per session; an unusable backend skips with its reason."""

    def __init__(self, models: ModelPool):
        self.models = models
        self._runners: dict[tuple, object] = {}
        self._skips: dict[tuple, str] = {}

    def component(self, case: Case):
        return make_component(self.models.get(case.dtype), case.component)

    def inputs(self, case: Case, seed: int = 0):
        return example_inputs(self.models.get(case.dtype), case, self.models.settings.device, seed)

    def get(self, backend: str, case: Case):
        key = (backend, case)
        if key not in self._runners and key not in self._skips:
            self._build(key)
        if key in self._skips:
            pytest.skip(self._skips[key])
        return self._runners[key]

    def _build(self, key):
        backend, case = key
        try:
            impl = backend_for(backend, self.models.get(case.dtype))
        except HarnessError as exc:
            raise pytest.UsageError(str(exc)) from None
        ok, reason = impl.available()
        if not ok:
            self._skips[key] = f"{backend} unavailable: {reason}"
        elif case.precision not in impl.precisions:
            self._skips[key] = f"{backend} has no {case.precision} path (it runs {', '.join(impl.precisions)})"
        else:
            try:
                self._runners[key] = impl.build(self.component(case), case)
            except BackendUnavailable as exc:
                self._skips[key] = f"{backend} unavailable: {exc}"


@pytest.fixture(scope="session")
def runners(models) -> RunnerPool:
    return RunnerPool(models)


@pytest.fixture(scope="session")
def reference(runners):
    """reference(case, seed=0): the fp32 eager output on the case's inputs, computed once."""
    outputs: dict[tuple, torch.Tensor] = {}

    def get(case: Case, seed: int = 0) -> torch.Tensor:
        ref_case = case.with_precision("fp32")
        if (ref_case, seed) not in outputs:
            outputs[ref_case, seed] = runners.get("torch", ref_case)(*runners.inputs(ref_case, seed))
        return outputs[ref_case, seed]
    return get


def pytest_generate_tests(metafunc):
    """Parity cases: component x shape x precision x backend, with readable ids."""
    s = metafunc.config.wan_settings
    if "parity_case" in metafunc.fixturenames:
        # fp8 means fp8 DiT matmuls; the text encoder and VAE have no fp8 variant.
        cases = [Case(c, shape, p, source=s.source) for c in COMPONENTS for shape in s.shapes
                 for p in s.precisions if p != "fp8" or c.startswith("transformer")]
        metafunc.parametrize("parity_case", cases, ids=[c.id for c in cases])
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", s.backends)
    if "reduced_precision" in metafunc.fixturenames:
        # Whole-pipeline cases compare each precision against the fp32 reference, so fp32 itself is not one.
        metafunc.parametrize("reduced_precision", [p for p in s.precisions if p != "fp32"])


class GenerationPool:
    """Whole-pipeline runs (text encoder, both experts with CFG, VAE) per backend/precision/prompt, once each."""

    def __init__(self, runners: RunnerPool):
        self.runners = runners
        self.settings = runners.models.settings
        self._runs: dict[tuple, object] = {}

    def get(self, backend: str, precision: str, shape: VideoShape, prompt_index: int = 0):
        key = (backend, precision, shape, prompt_index)
        if key not in self._runs:
            self._runs[key] = self._generate(*key)
        return self._runs[key]

    def pipeline_runners(self, backend: str, precision: str, shape: VideoShape):
        from harness.pipeline import build_runners

        return build_runners(self.runners.get, backend, precision, shape, self.settings.source)

    def _generate(self, backend, precision, shape, prompt_index):
        from harness.case import PRECISIONS
        from harness.pipeline import PROMPTS, generate

        model = self.runners.models.get(PRECISIONS[precision])
        return generate(model, self.pipeline_runners(backend, precision, shape), PROMPTS[prompt_index],
                        shape=shape, steps=self.settings.steps, seed=prompt_index, dtype=PRECISIONS[precision],
                        device=self.settings.device, keep_latents=True)


@pytest.fixture(scope="session")
def generations(runners) -> GenerationPool:
    return GenerationPool(runners)
