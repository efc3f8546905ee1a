"""The CLI: `python -m harness {env,shapes,...}`. User errors exit 2 with one line, no traceback."""
from __future__ import annotations

import argparse
import logging
import sys

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m harness", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help=cmd_env.__doc__).set_defaults(func=cmd_env)
    p = sub.add_parser("shapes", help=cmd_shapes.__doc__)
    p.add_argument("spec", help="a preset (480p, 720p) or HxWxF, e.g. 480x832x81")
    p.add_argument("--steps", type=int, default=40, help="denoising steps (default 40, the model card's)")
    p.set_defaults(func=cmd_shapes)
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
