"""The CLI: `python -m harness <command>`. A user error exits 2 with one line, no traceback."""
from __future__ import annotations

import argparse
import configparser
import dataclasses
import importlib
import logging
import os
import re
import shlex
import sys
import time
import warnings
from pathlib import Path

from harness.backends import BACKENDS
from harness.errors import BackendUnavailable, HarnessError
from harness.settings import OPTIONS, Option

PYTEST_INI = Path(__file__).resolve().parent.parent / "pytest.ini"
BENCH_MARKERS = "parity or quality or perf"  # the case families `bench` runs (and `plan` plans)
# Loggers that print known, harmless third-party notes on import (torchao registering its enums with
# torch's pytree; diffusers finding no old torchao tensor types): pytest captures them inside a case, but neither a
# terminal nor pytest_configure (where the checkpoint folder check imports diffusers) does.
NOISY_LOGGERS = ("torch.utils._pytree", "diffusers.quantizers.torchao")


def cmd_env(args) -> int:
    """Library versions, the device, and every backend's availability with its reason."""
    from harness.machine import machine_info
    from harness.session import availability

    for key, value in machine_info().items():
        print(f"{key:20} {value if value is not None else 'not installed'}")
    try:
        import onnxruntime

        print(f"{'ort providers':20} {', '.join(onnxruntime.get_available_providers())}")
    except ImportError as exc:
        print(f"{'ort providers':20} none ({exc})")
    print("\nbackends")
    for name, (ok, reason) in availability().items():
        print(f"  {name:13} {'available' if ok else 'unavailable'}{': ' + reason if reason else ''}")
    return 0


def cmd_shapes(args) -> int:
    """Latent shape, tokens, expert step split and A14B DiT FLOPs for one video shape."""
    from harness.shapes import block_flops, dit_flops, parse_shape, step_split

    shape = parse_shape(args.spec)
    high, low = step_split(args.steps)
    print(f"shape            {shape.height}x{shape.width}, {shape.frames} frames")
    print(f"latent           {list(shape.latent_shape())}")
    print(f"tokens           {shape.tokens:,}")
    print(f"steps            {args.steps}: {high} high-noise (transformer), {low} low-noise (transformer_2)")
    print(f"FLOPs per block  {block_flops(shape.tokens) / 1e12:.1f} TFLOP (A14B width)")
    print(f"FLOPs per expert {dit_flops(shape.tokens) / 1e12:.0f} TFLOP (40 layers, one forward)")
    print(f"FLOPs per video  {dit_flops(shape.tokens) * 2 * args.steps / 1e15:.1f} PFLOP "
          f"(CFG: 2 forwards x {args.steps} steps)")
    return 0


def _settings(args, **values):
    """Settings from the run options this command declares, with `values` (command-specific) over them."""
    from harness.session import check_asked_kernels
    from harness.settings import settings_from

    given = {o.dest: getattr(args, o.dest) for o in OPTIONS if hasattr(args, o.dest)}
    settings = settings_from({**given, **values})
    if not values.get("what_if"):  # a plan for a card this machine lacks cannot ask the card's kernels
        check_asked_kernels(settings)
    return settings


def cmd_generate(args) -> int:
    """Text to video with one backend; writes an H.264 mp4 and prints per-stage times."""
    from harness.pipeline import NEGATIVE_PROMPT, Precisions
    from harness.plan import Planned
    from harness.session import Session
    from harness.video import check_video_path, write_mp4

    from harness.backends import check_backend
    from harness.settings import flagged

    out = check_video_path(args.out)
    flagged("--backend", check_backend, args.backend)
    _check_precision_path(args.backend, _one_precision(args))
    if not 0 <= args.seed < 2 ** 63:
        raise HarnessError(f"--seed {args.seed} must be from 0 to 2**63 - 1 (torch's generator takes a 64-bit seed)")
    session = Session(_settings(args, backends=args.backend, precisions=_one_precision(args), shapes=_one_shape(args),
                                video=True))
    s = session.settings
    shape, precision = s.shapes[0], s.precisions[0]
    session.start([Planned("generate", "generate", args.backend, precision, shape=shape)])  # refused before any build
    try:
        session.backend(args.backend)
    except BackendUnavailable as exc:
        raise HarnessError(f"{exc}; pick another --backend") from None
    if s.source != "checkpoint":
        print(f"note: the {session.model(precision).label} model: the video is structured "
              "noise, useful for timing and plumbing, not for looking at")
    try:
        run = session.generate(args.backend, Precisions.as_run(precision), shape, args.prompt, seed=args.seed,
                               negative_prompt=args.negative_prompt or NEGATIVE_PROMPT, progress=True)
    except BackendUnavailable as exc:
        raise HarnessError(f"backend {args.backend} cannot run here: {exc}") from None
    write_mp4(run.frames, out)
    print(f"wrote {out}: {shape.frames} frames, {shape.width}x{shape.height}, {args.backend} {precision}, "
          f"{s.steps} steps")
    for stage, ms in run.stage_ms.items():
        print(f"  {stage:12} {ms / 1000:8.2f} s")
    return 0


def cmd_calibrate(args) -> int:
    """Make the static scales of every quantizing backend among --backends (torch-fp8's for --fp8-scales static,
    modelopt's, which the fp8/int8 engines are built from) for each expert, quantized precision and shape, or read
    them from the cache; times nothing. Prints each one, hit or miss, and its seconds."""
    from harness.case import DIT_COMPONENTS, Case
    from harness.plan import Planned
    from harness.session import Session

    settings = _settings(args)
    jobs = _calibration_jobs(settings)
    calibrating = tuple(dict.fromkeys(b for backends in jobs.values() for b in backends))
    # Planned as these backends' perf cases of each expert: they hold what calibrating needs, the eager loop and a copy.
    session = Session(dataclasses.replace(settings, backends=calibrating))
    s = session.settings
    session.start([Planned("test_speed", "perf", backend, precision, expert, shape)
                   for (_, precision), backends in jobs.items() for backend in backends
                   for shape in s.shapes for expert in DIT_COMPONENTS])
    skipped, start = [], time.perf_counter()
    for (_, precision), backends in jobs.items():
        reasons = []
        for backend in backends:  # the first that can run here makes the scales all of them read
            try:
                made = [session.calibrate(backend, Case(expert, shape, precision, source=s.source))
                        for shape in s.shapes for expert in DIT_COMPONENTS]
                break
            except BackendUnavailable as exc:
                reasons.append(str(exc))
        else:
            skipped.append(f"{precision} scales of {', '.join(backends)}: {'; '.join(reasons)}")
            print(f"skipped {skipped[-1]}")
            continue
        for calibration in made:
            print(f"{calibration.outcome:7} {calibration.seconds:8.2f} s  {calibration.key}  "
                  f"(for {', '.join(backends)})")
    if len(skipped) == len(jobs):
        raise HarnessError("nothing could be calibrated here: " + "; ".join(skipped))
    print(f"{time.perf_counter() - start:.1f} s in all; the entries are in {s.cache_dir / 'calibration'}")
    return 0


def _calibration_jobs(settings) -> dict[tuple[str, str], list[str]]:
    """(what calibrates, precision) -> the backends among --backends whose scales it makes; a run that names none is
    a user error."""
    from harness.case import is_quantized

    calibrating = [b for b, spec in BACKENDS.items() if spec.calibrates]
    jobs: dict[tuple[str, str], list[str]] = {}
    for backend in (b for b in settings.backends if BACKENDS[b].calibrates):
        for precision in (p for p in settings.precisions if is_quantized(p) and p in BACKENDS[backend].precisions):
            jobs.setdefault((BACKENDS[backend].calibrates, precision), []).append(backend)
    if not jobs:
        raise HarnessError(f"--backends {','.join(settings.backends)} with --precisions "
                           f"{','.join(settings.precisions)} calibrate no static scales: give one of "
                           f"{', '.join(calibrating)} and fp8 or int8")
    return jobs


def _check_precision_path(backend: str, precision: str) -> None:
    """A backend without a path for the precision is a user error that names the backends that have one."""
    from harness.backends import backends_running

    runs = BACKENDS[backend].precisions
    if precision not in runs:
        raise HarnessError(f"--backend {backend} has no {precision} path (it runs {', '.join(runs)}); "
                           f"{precision} runs on --backend {' or '.join(backends_running(precision))}")


def cmd_bench(args) -> int:
    """The main job: parity, quality and perf cases (tiny source by default); prints the summary path."""
    import pytest

    from harness.results import RUN_ID_ENV, new_run_id
    from harness.settings import Validated

    settings = _settings(args)  # a bad option fails here, in one line, before pytest starts
    _check_pytest_args(args)
    os.environ.setdefault(RUN_ID_ENV, new_run_id())
    # The session takes these settings as they are (conftest.py looks for the Validated plugin), so nothing is
    # checked twice and the run folder records the bench command. The flags still go along for pytest-xdist's
    # workers: separate processes, which read their options from the command line.
    given = [f"{o.flag}={getattr(args, o.dest)}" for o in OPTIONS if getattr(args, o.dest) is not None]
    handed = Validated(settings, shlex.join(["python", "-m", "harness", *sys.argv[1:]]))
    code = pytest.main(["-m", BENCH_MARKERS, "-p", "no:cacheprovider", *given, *args.pytest_args], plugins=[handed])
    if code == pytest.ExitCode.USAGE_ERROR:  # a bad option after --: pytest printed it in one line
        return 2
    summary = settings.results_dir / os.environ[RUN_ID_ENV] / "summary.md"
    print(f"summary: {summary}" if summary.is_file() else "no rows were recorded (see the skip reasons above), "
          "so no summary.md was written")
    return int(code)


def _check_pytest_args(args) -> None:
    """Run options after -- would reach pytest unchecked: a user error, in one line."""
    flags = {o.flag for o in OPTIONS}
    late = [a for a in args.pytest_args if a.split("=", 1)[0] in flags]
    if late:
        raise HarnessError(f"{late[0]} comes after --, where {args.command} cannot check it; give run options "
                           "before --")


def cmd_plan(args) -> int:
    """The run plan: the cases `bench` would run with these options (and pytest arguments after --), in the order
    they run, and what each family needs of the card, the host and the disk, and how long it takes; no GPU needed
    (--gpu-memory or --card names the card). Exits 2 with one line when the run does not fit."""
    _check_pytest_args(args)
    plan = collected_plan(_settings(args, what_if=True), args.pytest_args)
    print(plan.table())
    plan.check()
    return 0


def collected_plan(settings, pytest_args=()):
    """The plan of the cases `bench` would run with `settings`: pytest collects and orders them as bench does, and
    conftest.py plans them (harness.plan); none runs."""
    import contextlib
    import io

    import pytest

    from harness.settings import Validated

    grabbed = {}

    class Grab:
        def pytest_collection_finish(self, session):
            grabbed["plan"] = session.config.wan_session.plan

    handed = Validated(settings, shlex.join(["python", "-m", "harness", *sys.argv[1:]]), plan_only=True)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = pytest.main(["-m", BENCH_MARKERS, "-p", "no:cacheprovider", "-q", *pytest_args],
                           plugins=[handed, Grab()])
    if "plan" not in grabbed:
        said = [line for line in out.getvalue().splitlines() if line.strip()]
        raise HarnessError(f"pytest could not collect the cases to plan (exit {int(code)}): "
                           f"{said[-1] if said else 'see above'}")
    return grabbed["plan"]


def cmd_summary(args) -> int:
    """The short table of a run folder: speed-ups with their gate verdicts, then parity and quality verdicts."""
    from harness.report import short_summary

    print(short_summary(_path("the run folder", args.run)))
    return 0


def cmd_baseline_save(args) -> int:
    """Store a run's parity, quality and perf numbers as an accepted baseline (baselines/<name>.json)."""
    from harness.regression import save_baseline

    path = save_baseline(_path("--from", args.run), args.name, _path("--dir", args.dir), _tables(args.tables))
    print(f"baseline written: {path}")
    return 0


def cmd_compare(args) -> int:
    """Compare a run against a baseline: a verdict per case and metric; exit 1 on a regression."""
    from harness.regression import compare_run

    report, code = compare_run(_path("--baseline", args.baseline), _path("--current", args.current),
                               args.perf_tolerance, args.allow_missing, args.cross_machine, _tables(args.tables))
    print(report, end="")
    return code


def _path(name: str, text: str) -> Path:
    """A path argument, kept as text until here: Path("") is ".", which would quietly read the current folder."""
    if not text:
        raise HarnessError(f"{name} is an empty path; name the folder or file")
    return Path(text)


def _tables(text: str) -> tuple[str, ...]:
    from harness.results import TABLES

    names = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in names if t not in TABLES]
    if unknown or not names:
        raise HarnessError(f"--tables {text!r}: use a comma-separated subset of {', '.join(TABLES)}")
    return names


def _export_cases(args, settings) -> list:
    """Cases for `export`/`build`: one per named component (`all` = every component; the experts for fp8/int8)."""
    from harness.case import COMPONENTS, DIT_COMPONENTS, Case, check_component, is_quantized

    precision = settings.precisions[0]
    every = DIT_COMPONENTS if is_quantized(precision) else COMPONENTS
    names = every if args.component == "all" else (check_component(args.component),)
    if any(name not in every for name in names):
        raise HarnessError(f"--precision {precision} quantizes the DiT experts only; use --component "
                           f"{', '.join(DIT_COMPONENTS)} or all")
    return [Case(name, settings.shapes[0], precision, source=settings.source, dynamic=args.dynamic)
            for name in names]


def cmd_export(args) -> int:
    """Export components to ONNX (cached), validate each, and print the validation table."""
    from harness.plan import Planned
    from harness.session import Session

    session = Session(_settings(args, precisions=_one_precision(args), shapes=_one_shape(args)))
    cases = _export_cases(args, session.settings)
    session.start([Planned("export", "export", None, c.precision, c.component, c.shape) for c in cases])
    failed = 0
    for case in cases:
        graph, check = session.checked_export(case)
        failed += not check
        print(f"{case.id:48} {'hit ' if graph.hit else 'miss'} export {graph.export_s:6.2f} s  "
              f"{graph.size_bytes / 2 ** 20:7.2f} MB  {graph.path}")
        print(f"  {check}")
    return 1 if failed else 0


def _one_shape(args) -> str | None:
    """--shape of generate, export and build: one shape (a second one would silently go unused)."""
    if args.shape and "," in args.shape:
        raise HarnessError(f"--shape {args.shape!r}: {args.command} takes one shape")
    return args.shape


def _one_precision(args) -> str:
    """--precision of generate, export and build: one name, its error under its own flag."""
    from harness.case import check_precision
    from harness.settings import flagged

    return flagged("--precision", check_precision, args.precision.strip())


def cmd_build(args) -> int:
    """Export (cached) and build (cached) a TensorRT engine for each component; print its summary."""
    from harness.plan import Planned
    from harness.session import Session

    session = Session(_settings(args, precisions=_one_precision(args), shapes=_one_shape(args), opt_level=args.opt_level,
                                compute_capability=args.compute_capability))
    cases = _export_cases(args, session.settings)
    session.start([Planned("build", "export", None, c.precision, c.component, c.shape) for c in cases])
    for case in cases:
        try:
            _, engine = session.build_engine(args.backend, case)
        except BackendUnavailable as exc:
            raise HarnessError(str(exc)) from None
        problem = engine.shortfall()  # the builder's own layer log decides whether the build did what was asked
        if problem:
            raise HarnessError(f"{case.id}: the {case.precision} engine is not the one --fp8-recipe asks for: {problem}")
        print(f"{case.id:48} {engine}")
    return 0


def _add_run_options(parser: argparse.ArgumentParser, *flags: str) -> None:
    """The shared run options (harness.settings.OPTIONS) this command takes; all of them when none are named."""
    chosen: list[Option] = [o for o in OPTIONS if not flags or o.flag in flags]
    for option in chosen:
        parser.add_argument(option.flag, dest=option.dest, type=option.type, default=None, help=option.described())


def _add_regression_commands(sub) -> None:
    from harness.regression import BASELINE_TABLES

    tables = dict(default=",".join(BASELINE_TABLES), help="comma-separated tables to include (default: %(default)s)")
    p = sub.add_parser("baseline", help="accepted numbers for regression gating")
    save = p.add_subparsers(dest="action", required=True).add_parser("save", help=cmd_baseline_save.__doc__)
    save.add_argument("--from", dest="run", required=True, help="a run folder, results/<run-id>")
    save.add_argument("--name", required=True, help="baseline name: writes <dir>/<name>.json")
    save.add_argument("--dir", default="baselines", help="baselines folder (default: %(default)s)")
    save.add_argument("--tables", **tables)
    save.set_defaults(func=cmd_baseline_save)
    p = sub.add_parser("compare", help=cmd_compare.__doc__)
    p.add_argument("--baseline", required=True, help="baselines/<name>.json")
    p.add_argument("--current", required=True, help="a run folder, results/<run-id>")
    p.add_argument("--perf-tolerance", type=float, default=None,
                   help="share a median may slow before it counts, >= 0 and < 10 (default: thresholds.toml, 0.05)")
    p.add_argument("--allow-missing", action="store_true", help="a baseline case absent from the run is no failure")
    p.add_argument("--cross-machine", action="store_true",
                   help="compare even when the GPU or TensorRT version differs from the baseline's")
    p.add_argument("--tables", **tables)
    p.set_defaults(func=cmd_compare)


def _add_export_commands(sub) -> None:
    for name, func in (("export", cmd_export), ("build", cmd_build)):
        p = sub.add_parser(name, help=func.__doc__, description=func.__doc__)
        if name == "build":
            p.add_argument("--backend", default="tensorrt_rtx", help="tensorrt | tensorrt_rtx (default: %(default)s)")
            p.add_argument("--opt-level", type=int, default=3, help="builder optimization level 0-5 (default: %(default)s)")
            _add_run_options(p, "--engine-weights")
            p.add_argument("--compute-capability", default="",
                           help="build for this GPU generation, e.g. 8.9 (tensorrt_rtx builds ahead of time; default: "
                                "this GPU's own, or with no GPU 8.9 for fp8, 8.6 for int8)")
        p.add_argument("--component", default="all",
                       help="transformer | transformer_2 | vae_decoder | text_encoder | all (default: %(default)s)")
        p.add_argument("--precision", default="fp32",
                       help="fp32 | fp16 | bf16, or for the DiT experts fp8 | int8 (default: %(default)s)")
        p.add_argument("--shape", default=None, help="a preset or HxWxF (default: 16x16x9 tiny, 480p otherwise)")
        p.add_argument("--dynamic", action="store_true", help="dynamic batch/latent/text axes (VAE frames stay static)")
        _add_run_options(p, "--model-source", "--model-path", "--proxy-layers", "--device", "--cache-dir",
                         "--fp8-recipe")
        p.set_defaults(func=func)


class _Parser(argparse.ArgumentParser):
    """argparse, reading an argument like -480x832x81 as a value (a shape spec the shape check then refuses
    in one line) rather than as an unknown option; argparse does the same for plain negative numbers."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-\d[\dx.]*$")

    def error(self, message: str):
        """One line, like every other user error, instead of argparse's usage block."""
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m harness", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help=cmd_env.__doc__).set_defaults(func=cmd_env)
    p = sub.add_parser("shapes", help=cmd_shapes.__doc__, description=cmd_shapes.__doc__)
    p.add_argument("spec", help="a preset (480p, 720p) or HxWxF, e.g. 480x832x81")
    p.add_argument("--steps", type=int, default=40, help="denoising steps (default: %(default)s, the model card's)")
    p.set_defaults(func=cmd_shapes)

    p = sub.add_parser("generate", help=cmd_generate.__doc__, description=cmd_generate.__doc__)
    p.add_argument("--prompt", required=True, help="what the video shows (required)")
    p.add_argument("--negative-prompt", default=None, help="(default: the model card's style negative prompt)")
    p.add_argument("--backend", default="torch", help=f"{' | '.join(BACKENDS)} (default: %(default)s)")
    p.add_argument("--precision", default="fp32", help="fp32 | fp16 | bf16 | fp8 (default: %(default)s)")
    p.add_argument("--shape", default=None, help="a preset or HxWxF (default: 16x16x9 tiny, 480p otherwise)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--out", default="video.mp4", help="(default: %(default)s)")
    _add_run_options(p, "--model-source", "--model-path", "--proxy-layers", "--steps", "--device", "--cache-dir",
                     "--attention", "--cfg-batch", "--fp8-recipe")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help=cmd_bench.__doc__, description=cmd_bench.__doc__ +
                       " Every option below is the pytest option of the same name; arguments after -- go to pytest.")
    _add_run_options(p)
    p.add_argument("pytest_args", nargs="*", help="after --: more pytest arguments, e.g. -- -k transformer -x")
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("calibrate", help=cmd_calibrate.__doc__, description=cmd_calibrate.__doc__)
    _add_run_options(p, "--model-source", "--model-path", "--proxy-layers", "--shapes", "--backends", "--precisions",
                     "--fp8-recipe", "--calibration-prompts", "--cache-dir", "--device", "--gpu-memory", "--attention")
    p.set_defaults(func=cmd_calibrate)
    p = sub.add_parser("plan", help=cmd_plan.__doc__, description=cmd_plan.__doc__)
    _add_run_options(p)
    p.add_argument("pytest_args", nargs="*", help="after --: pytest's selection, as bench takes it, e.g. -- -k parity")
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("summary", help=cmd_summary.__doc__, description=cmd_summary.__doc__)
    p.add_argument("run", help="a run folder, results/<run-id>")
    p.set_defaults(func=cmd_summary)
    _add_regression_commands(sub)
    _add_export_commands(sub)
    return parser


def quiet_third_party() -> None:
    """Hide the third-party warnings that pytest.ini's filterwarnings hides, read from pytest.ini itself so the
    CLI and pytest keep one list, and the import-time notes of NOISY_LOGGERS."""
    ini = configparser.ConfigParser(interpolation=None)
    ini.read(PYTEST_INI, encoding="utf-8")
    for line in ini.get("pytest", "filterwarnings", fallback="").splitlines():
        if line.strip():
            action, message, category, module = (line.strip().split(":") + [""] * 3)[:4]
            warnings.filterwarnings(action, message, _warning_class(category), module)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def _warning_class(name: str) -> type[Warning]:
    """A warning category by its pytest.ini name: a builtin (DeprecationWarning) or a dotted path."""
    if not name:
        return Warning
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module or "builtins"), attr)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or argparse's one-line error: the code, for callers of main() too
        return int(exc.code or 0)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    quiet_third_party()
    try:
        return args.func(args)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
