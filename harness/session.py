"""One session per run: validated settings -> models, backends, runners, references, generations, rows.

conftest.py, the CLI and the GPU cases all assemble a run through this object, so a run means the same
thing everywhere, and it can be used and tested without pytest. Everything expensive is built once per
session; a backend this machine cannot run raises BackendUnavailable with the concrete reason (pytest
turns that into a skip, the CLI into exit 2).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import logging
import time
import traceback
from functools import cached_property
from typing import Callable

import torch

from harness.backends import (BACKENDS, ENGINE_BUILDERS, GRAPH_RUNNER, QUANTIZED_EXPORT, Backend, BackendOptions,
                              Runner, load, make_backend)
from harness.cache import DiskCache
from harness.calibration import CALIBRATIONS, Calibration, Calibrations
from harness.case import DIT_COMPONENTS, ONE_GPU, PRECISIONS, Case, Layout, eager_precision, is_dit, is_quantized
from harness.compare import ParityResult, judge_parity
from harness.components import Component, make_component, proxy_expert
from harness.errors import BackendUnavailable, HarnessError
from harness.export import ExportedGraph, GraphCheck, export_case, validate_graph
from harness.kernels import KERNEL_CHECK
from harness.machine import device_name, versions_string
from harness.models import EXPERT_SEEDS, WanModel, load_model, managed_model, model_identity
from harness.parallel import Job, launch, unsupported
from harness.plan import (GiB, Plan, Planned, build_step, duration, forward_step, make_plan, release_step,
                          video_step)
from harness.pipeline import (NEGATIVE_PROMPT, PROMPTS, Generation, Precisions, Runners, build_runners, cfg_noise,
                              cfg_noise_split, code_digest, generate, initial_latents, read_generation, write_generation)
from harness.residency import Residency, free_device_memory
from harness.results import Result, RunRecorder, result_rows
from harness.settings import Settings
from harness.shapes import VideoShape

log = logging.getLogger(__name__)

class Session:
    """The models, backends and runners of one run, each built once, and the rows it records."""

    def __init__(self, settings: Settings, recorder: RunRecorder | None = None):
        self.settings = settings
        self.recorder = recorder
        self._models: dict[tuple, WanModel] = {}
        self._backends: dict[tuple, tuple[Backend, tuple[bool, str]]] = {}
        self._runners: dict[tuple, Runner] = {}
        self._unavailable: dict[tuple, str] = {}
        self._outputs: dict[tuple, torch.Tensor] = {}
        self._generations: dict[tuple, Generation] = {}
        self._parallel: dict[tuple, object] = {}
        self._results: list[tuple[str, str, str, Result]] = []
        self._calibrations: dict[tuple[str, str], list[Calibration]] = {}  # by (backend, test): not yet in a row
        self.test = ""  # the test now running (conftest.py sets pytest's node id): each row it records names it
        self.steps: list[tuple[str, float]] = []  # the plan's steps as they ran: (step, seconds it took)
        self.progress: Callable[[str], None] = log.info  # where a step's progress line goes (conftest: the terminal)
        self._step_start = self._run_start = time.perf_counter()
        self._videos_logged: set[tuple] = set()
        self._planned_at = 0  # the plan's next step (logged_steps) the run has not reached

    # ------------------------------------------------------------------ the plan, memory and turns

    @cached_property
    def plan(self) -> Plan:
        """The run's plan (harness.plan); without `start`, the plan of no cases (everything resident)."""
        return make_plan(self.settings, [])

    def start(self, cases: list[Planned], check: bool = True) -> Plan:
        """Plan the run's cases, in the order they run, before anything is built: a run that cannot fit is refused in
        one line, and the process is held to the card planned for (--gpu-memory on a bigger one). conftest.py calls it
        once the cases are selected and ordered; `generate`, `export` and `build` with their one case. Without
        `check`, only planned (`python -m harness plan` prints the plan, then refuses)."""
        self.plan = make_plan(self.settings, cases, self.unavailable_backends())
        if check:
            self.plan.check()
            self.plan.card.hold()
        self._step_start = self._run_start = time.perf_counter()
        self._planned_at = 0
        return self.plan

    def unavailable_backends(self) -> dict[str, str]:
        """Each backend of the run that cannot run here, with the reason (its cases will skip). Planning from a machine
        without the CUDA card the settings name (`plan --gpu-memory`), only what rules a backend out on any card."""
        s = self.settings
        if s.device == "cuda" and not torch.cuda.is_available():
            reasons = {name: make_backend(name, s.options_for(name)).runs_on("cuda") for name in s.backends}
            return {name: reason for name, reason in reasons.items() if reason}
        unavailable = {}
        for name in s.backends:
            try:
                self.backend(name)
            except BackendUnavailable as exc:
                unavailable[name] = str(exc)
        return unavailable

    @cached_property
    def residency(self) -> Residency | None:
        """Where the models do not fit the card at once, the components take turns on it (harness.residency)."""
        return Residency(self.settings.device) if self.plan.components_take_turns else None

    def end_turn(self, backend: str) -> None:
        """After `backend`'s last case of a family: where the plan has candidates take turns, its runners, engines and
        quantized copies are let go (engines stay in the disk cache, so a later family loads them again) and the
        components leave the device, so the next backend has the card to itself."""
        if not self.plan.candidates_take_turns:
            return
        self._step(release_step(backend))
        for key in [k for k in self._runners if k[0] == backend]:
            del self._runners[key]
        if backend != "torch":
            for key in [k for k in self._backends if k[0] == backend]:
                del self._backends[key]
        self.clear_device()
        log.info("%s's turn ends: its runners let go", backend)

    def after_case(self, index: int) -> None:
        """After the run's `index`-th planned case: where candidates take turns, their runners the next case does not
        use are let go (the plan's look-ahead, Plan.keep_after), so what a candidate holds is what its cases at hand
        need: one engine per component and precision of every family would not fit beside each other. Runners that
        hold nothing of their own on the device (Inductor's) stay to the end of their turn."""
        if not self.plan.candidates_take_turns or index >= len(self.plan.keep_after):
            return
        keep = self.plan.keep_after[index]
        for key in [k for k in self._runners if BACKENDS[k[0]].holds != "nothing" and k not in keep]:
            del self._runners[key]
        free_device_memory()

    def clear_device(self) -> None:
        """Send every component off the device and give the allocator's cache back: at a turn's end, and before a case
        the plan does not size (conftest.py)."""
        if self.residency is not None:
            self.residency.release()
        free_device_memory()

    def _step(self, step: str) -> None:
        """A step of the plan starts (harness.plan: a forward, a build, a video, a release): the last one's time is
        kept, and where the plan has estimates, a progress line says where the run is and how long is left."""
        now = time.perf_counter()
        if self.steps:
            self.steps[-1] = (self.steps[-1][0], now - self._step_start)
        self.steps.append((step, 0.0))
        self._step_start = now
        planned = self.plan.logged_steps()
        at = next((i for i in range(self._planned_at, len(planned)) if planned[i][0] == step), None)
        if self.plan.card.kind is None or at is None:  # no estimates, or a step the plan did not foresee
            log.info("step: %s", step)
            return
        self._planned_at = at + 1
        before, total = sum(s for _, s in planned[:at]), sum(s for _, s in planned)
        pace = (now - self._run_start) / before if before > 60 else 1.0  # the estimates corrected as the run goes
        self.progress(f"step {at + 1}/{len(planned)}: {step} (estimated {duration(planned[at][1])}; about "
                      f"{duration((total - before) * pace)} left in the run)")

    def finish(self, actual: dict[str, float]) -> None:
        """At the session's end: the plan with each family's actual time (seconds, from conftest.py) beside its
        estimate (plan.md, which summary.md shows), and the plan's steps beside the ones that ran, with their estimated
        and actual seconds (steps.csv)."""
        if self.steps:
            self.steps[-1] = (self.steps[-1][0], time.perf_counter() - self._step_start)
        if self.recorder is None or self.recorder.part is not None or not self.recorder.path.is_dir():
            return  # nothing recorded (no folder to write into), or an xdist worker's part of the run
        self.attach("plan.md", self.plan.table(actual) + "\n")
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["planned", "estimated_s", "ran", "actual_s"])  # side by side: where the run left the plan
        writer.writerows((planned, f"{estimated:.1f}" if planned else "", ran, f"{took:.1f}" if ran else "")
                         for (planned, estimated), (ran, took)
                         in itertools.zip_longest(self.plan.logged_steps(), self.steps, fillvalue=("", 0.0)))
        self.attach("steps.csv", out.getvalue())

    def out_of_memory(self, exc: BaseException, family: str | None) -> str:
        """One line for a case that ran out of device memory, after freeing what it held so the session goes on."""
        phase = self.residency.phase if self.residency is not None else "running with every model resident"
        traceback.clear_frames(exc.__traceback__)  # the frames hold the case's tensors
        if self.residency is not None:
            self.residency.release()
        free_device_memory()
        planned = self.plan.peak(family) if family else None
        plan = (f"planned peak {planned.nbytes / GiB:.1f} GiB ({planned.label})" if planned else "no plan for it")
        return (f"out of device memory while {phase}; {plan} of {self.plan.card.usable_bytes / GiB:.1f} GiB usable "
                f"on {self.plan.card.name} ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]})")

    # ------------------------------------------------------------------ models and components

    def model(self, precision: str = "fp32", device: str | None = None) -> WanModel:
        """The source's model in `precision`'s dtype; random sources hold equal weights across dtypes. Where the plan
        says the models do not fit the card at once, its components take turns on the device (harness.residency)."""
        s = self.settings
        key = (PRECISIONS[precision], device or s.device)
        if key not in self._models:
            if self.residency is not None and key[1] == s.device:
                self._models[key] = managed_model(s.source, self.residency, dtype=key[0], layers=s.proxy_layers,
                                                  path=s.model_path)
            else:
                self._models[key] = load_model(s.source, device=key[1], dtype=key[0], layers=s.proxy_layers,
                                               path=s.model_path)
        return self._models[key]

    def component(self, case: Case, device: str | None = None) -> Component:
        return make_component(self.model(case.precision, device), case.component)

    def inputs(self, case: Case, seed: int = 0, loop: bool = False) -> tuple[torch.Tensor, ...]:
        """Seeded example inputs; with `loop`, the `seed`-th call of the expert in the held-out denoising loop
        (harness.components.loop_inputs), recorded in the bf16 eager loop that fp8 and int8 run beside and cast, so
        every precision sees the same values. Not the fp32 loop: at full size its eight fp32 forwards of each expert
        would take minutes for inputs that only need to be realistic."""
        if not loop:
            return self.component(case).inputs(case, seed)
        calls = self.held_out_loop(case)
        if seed >= len(calls):
            raise HarnessError(f"the held-out loop has {len(calls)} calls of {case.component}; seed {seed} is past them")
        return tuple(t.to(case.dtype) if t.is_floating_point() else t for t in calls[seed])

    def held_out_loop(self, case: Case) -> list[tuple[torch.Tensor, ...]]:
        """Every call of the case's expert in the held-out loop, as recorded in the bf16 eager loop, in bf16."""
        reference = case.with_precision("bf16")
        return self.component(reference).loop_inputs(reference, True)

    # ------------------------------------------------------------------ backends and runners

    def backend(self, name: str, **options) -> Backend:
        """The backend with the session's options (and `options` over them), availability checked once."""
        merged = dataclasses.replace(self.settings.options_for(name), **options)
        key = (name, merged)
        if key not in self._backends:
            impl = make_backend(name, merged)
            ok, reason = impl.available()
            reason = impl.runs_on(self.settings.device) if ok else reason
            self._backends[key] = impl, (not reason, reason)
        impl, (ok, reason) = self._backends[key]
        if not ok:
            raise BackendUnavailable(f"{name} unavailable: {reason}")
        return impl

    def build(self, backend: str, component: Component, case: Case, **options) -> Runner:
        """A runner of `component` for `case`; BackendUnavailable names why this machine cannot make one. The
        calibrations its build made or read wait for the backend's next result this test records (record)."""
        impl = self.backend(backend, **options)
        start = len(CALIBRATIONS)
        try:
            runner = impl.build(component, case)
        except BackendUnavailable as exc:
            raise BackendUnavailable(f"{backend} cannot run {case.id}: {exc}") from None
        self._calibrations.setdefault((backend, self.test), []).extend(CALIBRATIONS[start:])
        return runner

    def runner(self, backend: str, case: Case) -> Runner:
        """The session's runner of (backend, case), built once; an unusable one raises the same reason each time."""
        key = (backend, case)
        if key in self._unavailable:
            raise BackendUnavailable(self._unavailable[key])
        if key not in self._runners:
            try:
                self._runners[key] = self._built(backend, case)
            except BackendUnavailable as exc:
                self._unavailable[key] = str(exc)
                raise
        return self._runners[key]

    def _built(self, backend: str, case: Case) -> Runner:
        """A new runner of `case`; a candidate's build is a step of the plan (harness.plan.build_step)."""
        if backend != "torch" and not self.backend(backend).refusal(case.component, case.precision, case.layout):
            self._step(build_step(backend, case))
        return self.build(backend, self.component(case), case)

    def output(self, backend: str, case: Case, seed: int = 0, loop: bool = False) -> torch.Tensor:
        """`backend`'s output on the case's inputs (see `inputs`), computed once (eager outputs serve many cases)."""
        key = (backend, case, seed, loop)
        if key not in self._outputs:
            if backend == "torch":
                self._step(forward_step(case, loop))
            self._outputs[key] = self.runner(backend, case)(*self.inputs(case, seed, loop))
        return self._outputs[key]

    def parity(self, backend: str, case: Case, seed: int = 0) -> ParityResult:
        """`backend` against the fp32 eager reference, judged against eager-at-precision's own drift.

        fp8 and int8 are judged on the held-out loop's inputs: their static scales are calibrated on the
        loop's ranges, which seeded random inputs exceed (harness.components.loop_inputs).
        Where candidates take turns on the device, the candidate's runner is let go after the case unless the next
        case uses it (after_case).
        """
        loop = is_quantized(case.precision)
        expected = self.output("torch", case.with_precision("fp32"), seed, loop)
        eager = self.output("torch", case.with_precision(eager_precision(case.precision)), seed, loop)
        inputs = self.inputs(case, seed, loop)
        return judge_parity(self.runner(backend, case)(*inputs), expected, case.precision, eager)

    # ------------------------------------------------------------------ whole-pipeline runs

    def cfg_batch(self, backend: str) -> int:
        """The batch of the candidate's CFG forwards; eager PyTorch runs two batch-1 calls, as WanPipeline does."""
        return 1 if backend == "torch" else self.settings.cfg_batch

    def pipeline_runners(self, backend: str, precisions: Precisions, shape: VideoShape,
                         layout: Layout = ONE_GPU) -> Runners:
        """A video's runners; the video is a step of the plan (harness.plan.video_step), once per case."""
        runners = build_runners(self.runner, backend, precisions, shape, self.settings.source, self.cfg_batch(backend),
                                layout)
        if (self.test, backend, precisions, shape) not in self._videos_logged:
            self._videos_logged.add((self.test, backend, precisions, shape))
            self._step(video_step(backend, precisions, shape))
        return runners

    def generate(self, backend: str, precisions: Precisions, shape: VideoShape, prompt: str, *, seed: int = 0,
                 negative_prompt: str = NEGATIVE_PROMPT, steps: int | None = None, progress: bool = False,
                 keep_latents: bool = False, layout: Layout = ONE_GPU) -> Generation:
        """Text -> video through `backend` (it runs the components under test, eager PyTorch the rest: see
        harness.pipeline.build_runners); under a layout, this rank's part of the parallel run (inside harness.rank
        only)."""
        return generate(self.model(precisions.experts), self.pipeline_runners(backend, precisions, shape, layout),
                        prompt, shape=shape, steps=steps or self.settings.steps, precisions=precisions, seed=seed,
                        negative_prompt=negative_prompt, device=self.settings.device, progress=progress,
                        keep_latents=keep_latents, cfg_batch=self.cfg_batch(backend), cfg_group=_cfg_group(layout))

    def generation(self, backend: str, precisions: Precisions, shape: VideoShape, prompt_index: int = 0,
                   layout: Layout = ONE_GPU) -> Generation:
        """The fixed-prompt run that parity and quality cases share, with every step's latents, made once per
        session; eager PyTorch's on one GPU also once across sessions, through the disk cache (a 40-layer fp32
        video is minutes of fp32 forwards)."""
        key = (backend, precisions, shape, prompt_index, layout)
        if key not in self._generations:
            def make() -> Generation:
                return self.generate(backend, precisions, shape, PROMPTS[prompt_index], seed=prompt_index,
                                     keep_latents=True, layout=layout)

            cached = backend == "torch" and layout == ONE_GPU
            self._generations[key] = self._cached_video(precisions, shape, prompt_index, make) if cached else make()
        return self._generations[key]

    def _cached_video(self, precisions: Precisions, shape: VideoShape, prompt_index: int,
                      make: Callable[[], Generation]) -> Generation:
        """An eager video from the disk cache, keyed by everything it depends on, or made and stored there."""
        s = self.settings
        spec = {"model": model_identity(s.source, layers=s.proxy_layers, path=s.model_path), "shape": shape.id,
                "prompt": PROMPTS[prompt_index], "negative_prompt": NEGATIVE_PROMPT, "seed": prompt_index,
                "steps": s.steps, "precisions": precisions.id, "device": device_name(s.device),
                "versions": versions_string(), "code": code_digest()}
        what = f"eager {precisions.id} video of prompt {prompt_index} at {shape.id}, {s.steps} steps"
        cached = DiskCache(s.cache_dir).fetch(
            "videos", f"{s.source}-{shape.id}-{precisions.id}-prompt{prompt_index}-steps{s.steps}", spec,
            lambda folder: write_generation(make(), folder), read_generation)
        cached.value.origin = (f"read from the cache in {cached.seconds:.1f} s" if cached.hit
                               else f"made in {cached.seconds:.1f} s and cached")
        log.info("%s: %s (%s)", what, cached.value.origin, cached.path)
        return cached.value

    def cfg_step(self, backend: str, precision: str, shape: VideoShape,
                 layout: Layout = ONE_GPU) -> Callable[[], torch.Tensor]:
        """One CFG denoising step of the high-noise expert on fixed inputs at its example timestep (937 at A14B's
        boundary), as a zero-argument call: what the perf cases time and the parallel cases compare; under a layout,
        this rank's part of it."""
        model, device, dtype = self.model(precision), self.settings.device, PRECISIONS[precision]
        case = Case("transformer", shape, precision, source=self.settings.source)
        batch = self.cfg_batch(backend)
        runner = self.runner(backend, dataclasses.replace(case, batch=batch, layout=layout.forward))
        cond, negative = self.inputs(case)[2], self.inputs(case, seed=1)[2]
        latents = initial_latents(model, shape, 0, device)
        timestep = torch.tensor(model.expert_timestep("transformer"), device=device)
        group = _cfg_group(layout)
        if group is not None:
            return lambda: cfg_noise_split(runner, latents, timestep, cond, negative, model.guidance_scale, dtype, group)
        return lambda: cfg_noise(runner, latents, timestep, cond, negative, model.guidance_scale, dtype, batch)

    # ------------------------------------------------------------------ several GPUs per video

    def parallel(self, task: str, backend: str, precision: str, shape: VideoShape, **arguments):
        """What rank 0 returns from `task` (a function of harness.parallel_tasks) run by the ranks of the
        settings' layout, launched once per arguments. BackendUnavailable (a skip) when this machine cannot
        run the layout for the case, or a rank could not build `backend`."""
        key = (task, backend, precision, shape, tuple(sorted(arguments.items())))
        if key not in self._parallel:
            try:
                self._check_parallel(backend, precision, shape)
                job = Job(self.settings, f"harness.parallel_tasks:{task}",
                          dict(backend=backend, precision=precision, shape=shape, **arguments))
                self._parallel[key] = launch(job, self.settings.parallel.world)
            except (BackendUnavailable, HarnessError) as exc:  # a skip or a failed launch: every case needing it
                self._parallel[key] = exc                        # says so at once, without launching again
        outcome = self._parallel[key]
        if isinstance(outcome, (BackendUnavailable, HarnessError)):
            raise type(outcome)(str(outcome))
        return outcome

    def _check_parallel(self, backend: str, precision: str, shape: VideoShape) -> None:
        """What the parent can tell before starting any rank: the machine, the split, the backend."""
        layout, device = self.settings.parallel, self.settings.device
        if layout == ONE_GPU:
            raise BackendUnavailable("one GPU (--parallel none): give --parallel cfg2, ulysses2, ring2 or "
                                     "cfg2,ulysses2 to run the parallel cases")
        gpus = torch.cuda.device_count() if device == "cuda" else 0
        heads = self.model(eager_precision(precision)).transformer.config.num_attention_heads
        # The layout splits the experts' forwards (harness.pipeline.build_runners): ask the backend about one.
        reason = (unsupported(layout, device, gpus, precision, shape.tokens, heads)
                  or self.backend(backend).refusal(DIT_COMPONENTS[0], precision, layout))
        if reason:
            raise BackendUnavailable(reason)

    # ------------------------------------------------------------------ export and engines

    def export(self, case: Case, cache: DiskCache | None = None) -> ExportedGraph:
        """The case's graph through the cache; fp8/int8 cases get the Q/DQ graph of the expert quantized by the
        run's --fp8-recipe."""
        cache = cache or DiskCache(self.settings.cache_dir)
        if is_quantized(case.precision):
            options = self.settings.backend_options
            return load(QUANTIZED_EXPORT)(self.component(case), case, cache, recipe=options.fp8_recipe,
                                          prompts=options.calibration_prompts)
        return export_case(self.component(case), case, cache)

    def checked_export(self, case: Case, cache: DiskCache | None = None) -> tuple[ExportedGraph, GraphCheck]:
        """Export (cached) and validate; a cached graph that fails validation is evicted and exported once more.

        The manifest's hashes already catch changed bytes, so this is the net under what they cannot see;
        a fresh export's verdict is the result either way.
        """
        cache = cache or DiskCache(self.settings.cache_dir)
        graph = self.export(case, cache)
        check = self.check_graph(graph)
        if graph.hit and not check:
            cache.evict(graph.path.parent, f"the cached graph failed validation: {check}")
            graph = self.export(case, cache)
            check = self.check_graph(graph)
        return graph, check

    def check_graph(self, graph: ExportedGraph) -> GraphCheck:
        """onnx.checker, shape inference and ONNX Runtime CPU against PyTorch at the graph's check shapes."""
        case = graph.case
        return validate_graph(graph, load(GRAPH_RUNNER), self.component(case),
                              self.component(case.with_precision("fp32")))

    def build_engine(self, backend: str, case: Case, cache: DiskCache | None = None):
        """Export (cached) and build (cached) the TensorRT engine of `case`: (ExportedGraph, EngineBuild)."""
        if backend not in ENGINE_BUILDERS:
            raise HarnessError(f"{backend!r} builds no engines; use one of {', '.join(ENGINE_BUILDERS)}")
        builder = load(ENGINE_BUILDERS[backend])(self.settings.backend_options, cache)
        ok, reason = builder.can_build()
        if not ok:
            raise BackendUnavailable(f"{backend} cannot build engines here: {reason}")
        return builder.build(self.engine_component(case), case)

    def calibrate(self, backend: str, case: Case) -> Calibration:
        """Make or read the static scales `backend` runs `case` on (torch-fp8's: with --fp8-scales static) through
        harness.calibration, and nothing else: no runner, no engine. BackendUnavailable where this machine cannot
        run the backend."""
        self.backend(backend)
        options = self.settings.backend_options
        load(BACKENDS[backend].calibrates)(self.component(case), case, DiskCache(options.cache_dir),
                                           recipe=options.fp8_recipe, prompts=options.calibration_prompts)
        return CALIBRATIONS[-1]

    def engine_component(self, case: Case) -> Component:
        """What an engine of `case` is built from, where no eager run needs the model: a proxy expert is a skeleton
        (export builds it in a process of its own), so this process never holds a real-width expert's weights.
        An fp8/int8 expert is the model's own: its calibration runs the eager denoising loop."""
        s = self.settings
        if s.source == "proxy" and is_dit(case.component) and not is_quantized(case.precision):
            return proxy_expert(s.proxy_layers, device=s.device, dtype=case.dtype, seed=EXPERT_SEEDS[case.component],
                                skeleton=True, name=case.component)
        return self.component(case)

    # ------------------------------------------------------------------ results

    def record(self, table: str, case: Case, backend: str, result: Result, precision: str | None = None) -> None:
        """Keep `result` (the gate reads it back) and append its rows to the run folder now, with the case's peak
        memory so far beside them (harness.memory.case_peaks; conftest.py resets the peaks as each case starts) and
        the calibrations the backend's builds in this test made or read (harness.calibration)."""
        from harness.memory import case_peaks
        from harness.results import Measured

        self._results.append((table, case.id, backend, result))
        kernel = dict(self.settings.attention).get(backend)
        options = self.settings.backend_options
        # Rows may name a variant ("torch-fp8[fa3-fp8]") rather than a registered backend: those carry their own label.
        read = BACKENDS[backend].labelled_options if backend in BACKENDS else ()
        labels = ([f"attention={kernel}"] if kernel else []) + [f"{name}={getattr(options, name)}" for name in read]
        versions = ";".join([versions_string(), *labels])
        calibrated = self._calibrations.pop((backend, self.test), [])
        if self.recorder is not None:
            memory = Measured(case_peaks(cuda=self.settings.device == "cuda"))
            for measured in (result, memory, *([Calibrations(tuple(calibrated))] if calibrated else [])):
                for row in result_rows(case, backend, measured, precision=precision,
                                       device=device_name(self.settings.device), versions=versions, test=self.test):
                    self.recorder.add(table, row)

    def attach(self, name: str, content: str | bytes) -> None:
        """A file in the run folder beside the tables (nothing without a recorder)."""
        if self.recorder is not None:
            self.recorder.attach(name, content)

    def recorded(self, table: str, case: Case, backend: str, kind: type) -> Result | None:
        """The last result of type `kind` recorded for (table, case, backend) in this session, if any."""
        found = [r for t, c, b, r in self._results if (t, c, b) == (table, case.id, backend) and isinstance(r, kind)]
        return found[-1] if found else None


def _cfg_group(layout: Layout):
    """The CFG pair's process group where the layout splits CFG (inside a rank), else None."""
    if layout.cfg == 1:
        return None
    from harness.distributed import cfg_group

    return cfg_group()


def check_asked_kernels(settings: Settings) -> None:
    """A kernel --attention asked for that cannot run on this CUDA machine is a user error naming what to
    install, not a skip: otherwise the run would quietly measure nothing (or, worse, another kernel)."""
    if settings.device != "cuda":
        return  # every GPU kernel is unavailable here; the backends say so case by case
    check = load(KERNEL_CHECK)
    for backend, kernel in settings.attention:
        ok, reason = check(kernel) if backend in settings.attention_asked else (True, "")
        if not ok:
            raise HarnessError(f"--attention {backend}={kernel} cannot run here: {reason}")


def availability(options: BackendOptions = BackendOptions()) -> dict[str, tuple[bool, str]]:
    """Every registered backend's (available, reason) on this machine, for `harness env`."""
    return {name: make_backend(name, options).available() for name in BACKENDS}

