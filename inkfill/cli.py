"""Command line: argparse -> config -> calls. The only module that prints and exits."""

from __future__ import annotations

import argparse
import logging
import sys

import numpy as np

from . import __version__
from .config import DataConfig, InkfillError


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line with exit status 2, like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data", default=None, help="npz, LEAF json file or LEAF directory (else $INKFILL_DATA)"
    )
    p.add_argument("--labels", choices=["digits", "all"], default=DataConfig.labels)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="inkfill", description="Fill empty (writer, label) cells of handwriting data."
    )
    parser.add_argument("--version", action="version", version=f"inkfill {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("data", help="summarise a dataset as a writers x labels matrix")
    _add_data_args(p)
    p.add_argument(
        "--preview",
        metavar="OUT.png",
        help="write a grid: one row per writer, one column per label",
    )
    p.add_argument("--preview-writers", type=int, default=12, metavar="N")
    p.add_argument("--seed", type=int, default=0, help="which writers the preview shows")
    p.set_defaults(func=cmd_data)
    return parser


def cmd_data(args: argparse.Namespace) -> None:
    from .data import WriterMatrix, load_dataset
    from .plots import save_matrix_figure

    config = DataConfig(path=args.data, labels=args.labels)
    matrix = WriterMatrix(load_dataset(config.path, config.labels))
    s = matrix.summary()
    per = s["images_per_cell"]
    print(f"writers          {s['writers']:,}")
    print(f"images           {s['images']:,}")
    print(f"labels           {s['labels']} ({config.labels})")
    print(f"cells            {s['cells']:,}")
    print(f"observed cells   {s['observed_cells']:,}")
    print(f"empty cells      {s['empty_cells']:,}")
    print(f"complete writers {s['complete_writers']:,}")
    print(f"images per cell  min {per['min']}  median {per['median']:g}  max {per['max']}")
    if args.preview:
        if args.preview_writers < 1:
            raise InkfillError("--preview-writers must be at least 1")
        rng = np.random.default_rng(args.seed)
        n = min(args.preview_writers, matrix.n_writers)
        writers = sorted(rng.choice(matrix.writer_ids, size=n, replace=False).tolist())
        save_matrix_figure(matrix, writers, args.preview, title=f"{n} of {s['writers']} writers")
        print(f"preview          {args.preview}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        args.func(args)
    except InkfillError as e:
        print(f"inkfill {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("inkfill: interrupted", file=sys.stderr)
        return 130
    return 0
