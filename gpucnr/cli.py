"""The `gpucnr` command line (also `python -m gpucnr`): argument parsing only, no logic."""

from __future__ import annotations

import argparse
import sys

from gpucnr._version import __version__

__all__ = ["main"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpucnr", description="Contrast-to-noise ratio of every image of a dataset.")
    parser.add_argument("--version", action="version", version=f"gpucnr {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="measure a phantom dataset with known CNR and print a summary table")
    demo.add_argument("-n", type=_positive_int, default=2000, help="number of phantom images (default 2000)")
    demo.add_argument("--size", type=_positive_int, default=128, help="image side in pixels (default 128)")
    demo.add_argument("--backend", choices=("auto", "numpy", "cupy"), default="auto")
    demo.add_argument("--threshold", type=float, default=1.5, help="CNR below which an image is dropped")
    demo.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from gpucnr.demo import run_demo

        _, text = run_demo(args.n, args.size, backend=args.backend, seed=args.seed, threshold=args.threshold)
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
