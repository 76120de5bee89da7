"""The ``sthist`` command line: ``sthist demo`` and the pipeline steps over .h5ad files."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the pipeline on the embedded synthetic data set",
        description="Run sthist end to end on `sthist.datasets.toy()` and write metrics JSON and PNG figures.",
    )
    p.add_argument("--out", type=Path, default=Path("sthist-demo"), help="output folder (default: ./sthist-demo)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--quick", action="store_true", help="a smaller data set and shorter training, for smoke tests")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    metrics = run_demo(args.out, seed=args.seed, quick=args.quick, progress=not args.no_progress)
    print(json.dumps(metrics["summary"], indent=2))
    print(f"wrote {args.out / 'metrics.json'} and figures in {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``sthist`` command."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="sthist",
        description="Predict spatially resolved gene expression from H&E histology with contrastive learning.",
    )
    parser.add_argument("--version", action="version", version=f"sthist {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_demo(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sthist`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
        # user errors: one clear line, no traceback
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"sthist {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
