"""The CLI: `python -m harness {env,shapes,...}`. User errors exit 2 with one line, no traceback."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from harness.errors import HarnessError


def cmd_env(args) -> int:
    """Library versions, the device, and every backend's availability with its reason."""
    from engines.base import BACKENDS, get_backend
    from harness.machine import machine_info

    info = machine_info()
    for key, value in info.items():
        print(f"{key:20} {value if value is not None else 'not installed'}")
    try:
        import onnxruntime

        print(f"{'ort providers':20} {', '.join(onnxruntime.get_available_providers())}")
    except ImportError as exc:
        print(f"{'ort providers':20} none ({exc})")
    print("\nbackends")
    for name in BACKENDS:
        ok, reason = get_backend(name).available()
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


def cmd_generate(args) -> int:
    """Text to video with one backend; writes an H.264 mp4 and prints per-stage times."""
    import torch

    from engines.base import BackendUnavailable, backend_for, get_backend
    from harness.case import PRECISIONS, check_precision
    from harness.components import make_component
    from harness.models import load_model
    from harness.pipeline import NEGATIVE_PROMPT, build_runners, generate
    from harness.shapes import parse_shape
    from harness.video import write_mp4

    shape, precision = parse_shape(args.shape), check_precision(args.precision)
    get_backend(args.backend)  # an unknown name fails before minutes of model building
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.source, device=device, dtype=PRECISIONS[precision], layers=args.proxy_layers,
                       path=args.model_path)
    if args.source != "checkpoint":
        print(f"note: the {model.label} model has random weights: the video is structured noise, "
              "useful for timing and plumbing, not for looking at")

    def get_runner(backend, case):
        impl = backend_for(backend, model)
        ok, reason = impl.available()
        if not ok:
            raise HarnessError(f"backend {backend} cannot run here: {reason}")
        try:
            return impl.build(make_component(model, case.component), case)
        except BackendUnavailable as exc:
            raise HarnessError(f"backend {backend} cannot run here: {exc}") from None

    runners = build_runners(get_runner, args.backend, precision, shape, args.source)
    run = generate(model, runners, args.prompt, shape=shape, steps=args.steps, seed=args.seed,
                   negative_prompt=args.negative_prompt or NEGATIVE_PROMPT, dtype=PRECISIONS[precision],
                   device=device, progress=True)
    out = write_mp4(run.frames, args.out)
    print(f"wrote {out}: {shape.frames} frames, {shape.width}x{shape.height}, {args.backend} {precision}, "
          f"{args.steps} steps")
    for stage, ms in run.stage_ms.items():
        print(f"  {stage:12} {ms / 1000:8.2f} s")
    return 0


def cmd_bench(args) -> int:
    """The main job: parity, quality and perf cases (tiny source by default); prints the summary path."""
    import os

    import pytest

    from harness.results import RUN_ID_ENV, new_run_id

    os.environ.setdefault(RUN_ID_ENV, new_run_id())
    code = pytest.main(["-m", "parity or quality or perf", "-p", "no:cacheprovider", *args.pytest_args])
    results_dir = next((a.split("=", 1)[1] for a in args.pytest_args if a.startswith("--results-dir=")), "results")
    print(f"summary: {os.path.join(results_dir, os.environ[RUN_ID_ENV], 'summary.md')}")
    return int(code)


def cmd_baseline_save(args) -> int:
    """Store a run's parity, quality and perf numbers as an accepted baseline (baselines/<name>.json)."""
    from harness.regression import save_baseline

    path = save_baseline(args.run, args.name, args.dir, _tables(args.tables))
    print(f"baseline written: {path}")
    return 0


def cmd_compare(args) -> int:
    """Compare a run against a baseline: a verdict per case and metric; exit 1 on a regression."""
    from harness.regression import compare_run

    report, code = compare_run(args.baseline, args.current, args.perf_tolerance, args.allow_missing,
                               args.cross_machine, _tables(args.tables))
    print(report, end="")
    return code


def _tables(text: str) -> tuple[str, ...]:
    from harness.results import TABLES

    names = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in names if t not in TABLES]
    if unknown or not names:
        raise HarnessError(f"--tables {text!r}: use a comma-separated subset of {', '.join(TABLES)}")
    return names


def _add_regression_commands(sub) -> None:
    tables = dict(default="parity,quality,perf", help="comma-separated tables to include (default: %(default)s)")
    p = sub.add_parser("baseline", help="accepted numbers for regression gating")
    save = p.add_subparsers(dest="action", required=True).add_parser("save", help=cmd_baseline_save.__doc__)
    save.add_argument("--from", dest="run", type=Path, required=True, help="a run folder, results/<run-id>")
    save.add_argument("--name", required=True, help="baseline name: writes <dir>/<name>.json")
    save.add_argument("--dir", type=Path, default=Path("baselines"), help="baselines folder (default: %(default)s)")
    save.add_argument("--tables", **tables)
    save.set_defaults(func=cmd_baseline_save)
    p = sub.add_parser("compare", help=cmd_compare.__doc__)
    p.add_argument("--baseline", type=Path, required=True, help="baselines/<name>.json")
    p.add_argument("--current", type=Path, required=True, help="a run folder, results/<run-id>")
    p.add_argument("--perf-tolerance", type=float, default=None,
                   help="share a median may slow before it counts (default: thresholds.toml, 0.05)")
    p.add_argument("--allow-missing", action="store_true", help="a baseline case absent from the run is no failure")
    p.add_argument("--cross-machine", action="store_true",
                   help="compare even when the GPU or TensorRT version differs from the baseline's")
    p.add_argument("--tables", **tables)
    p.set_defaults(func=cmd_compare)


def _export_cases(args) -> list:
    """Cases for `export`/`build`: one per named component (`all` = every component)."""
    from harness.case import COMPONENTS, Case, check_component
    from harness.shapes import parse_shape

    names = COMPONENTS if args.component == "all" else (check_component(args.component),)
    shape = parse_shape(args.shape)
    return [Case(name, shape, args.precision, source=args.source, dynamic=args.dynamic) for name in names]


def cmd_export(args) -> int:
    """Export components to ONNX (cached), validate each, and print the validation table."""
    from harness.cache import DiskCache
    from harness.export import export_case, validate_graph
    from harness.models import load_model

    cases = _export_cases(args)
    cache = DiskCache(args.cache_dir)
    model = load_model(args.source, dtype=cases[0].dtype, path=args.model_path)
    reference = model if args.precision == "fp32" else load_model(args.source, path=args.model_path)
    failed = 0
    for case in cases:
        graph = export_case(model, case, cache)
        check = validate_graph(graph, model, reference)
        failed += not check
        print(f"{case.id:48} {'hit ' if graph.hit else 'miss'} export {graph.export_s:6.2f} s  "
              f"{graph.size_bytes / 2 ** 20:7.2f} MB  {graph.path}")
        print(f"  {check}")
    return 1 if failed else 0


def cmd_build(args) -> int:
    """Export (cached) and build (cached) a TensorRT engine for each component; print its summary."""
    from engines.base import get_backend
    from harness.models import load_model

    if args.backend not in ("tensorrt", "tensorrt_rtx"):
        raise HarnessError(f"--backend {args.backend!r}: build makes TensorRT engines; use tensorrt or tensorrt_rtx")
    cases = _export_cases(args)
    model = load_model(args.source, dtype=cases[0].dtype, path=args.model_path)
    backend = get_backend(args.backend, model=model, cache_dir=args.cache_dir, opt_level=args.opt_level)
    ok, reason = backend.can_build()
    if not ok:
        raise HarnessError(f"cannot build with {args.backend} here: {reason}")
    for case in cases:
        backend.build_engine(case)  # logs its one-line summary (time, size, layers, cache hit/miss)
    return 0


def _add_export_commands(sub) -> None:
    from harness.cache import default_cache_dir

    for name, func in (("export", cmd_export), ("build", cmd_build)):
        p = sub.add_parser(name, help=func.__doc__)
        if name == "build":
            p.add_argument("--backend", default="tensorrt_rtx", help="tensorrt | tensorrt_rtx (default)")
            p.add_argument("--opt-level", type=int, default=3, help="builder optimization level 0-5")
        p.add_argument("--component", default="all", help="transformer | transformer_2 | vae_decoder | text_encoder | all")
        p.add_argument("--source", default="tiny", help="tiny | proxy | checkpoint")
        p.add_argument("--model-path", default=None, help="checkpoint folder (or WAN_MODEL_PATH)")
        p.add_argument("--precision", default="fp32", help="fp32 | fp16 | bf16")
        p.add_argument("--shape", default="16x16x9", help="a preset or HxWxF")
        p.add_argument("--dynamic", action="store_true", help="dynamic batch/latent/text axes (VAE frames stay static)")
        p.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                       help="ONNX and engine cache (default: $WAN_BENCH_CACHE or .cache)")
        p.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m harness", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help=cmd_env.__doc__).set_defaults(func=cmd_env)
    p = sub.add_parser("shapes", help=cmd_shapes.__doc__)
    p.add_argument("spec", help="a preset (480p, 720p) or HxWxF, e.g. 480x832x81")
    p.add_argument("--steps", type=int, default=40, help="denoising steps (default 40, the model card's)")
    p.set_defaults(func=cmd_shapes)

    p = sub.add_parser("generate", help=cmd_generate.__doc__)
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--source", default="tiny", help="tiny | proxy | checkpoint")
    p.add_argument("--model-path", default=None, help="checkpoint folder (or WAN_MODEL_PATH)")
    p.add_argument("--proxy-layers", type=int, default=2)
    p.add_argument("--backend", default="torch")
    p.add_argument("--precision", default="fp32", help="fp32 | fp16 | bf16 | fp8")
    p.add_argument("--shape", default="480p", help="a preset or HxWxF")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out", default="video.mp4")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help=cmd_bench.__doc__)
    p.add_argument("pytest_args", nargs=argparse.REMAINDER, help="extra pytest options, e.g. --model-source proxy")
    p.set_defaults(func=cmd_bench)
    _add_regression_commands(sub)
    _add_export_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return args.func(args)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
