"""Command line: argparse -> config -> calls. The only module that prints and exits."""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from . import __version__, distributed, progress
from .config import BenchConfig, DataConfig, FeatureConfig, InkfillError

NO_PROGRESS_HELP = (
    "no progress bars; when stderr is not a terminal (a log file, CI, nohup) the bars redraw at "
    "most every 30 s anyway"
)


log = logging.getLogger("inkfill")
FIGURE_LEVELS = ("none", "some", "all")


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
    p.add_argument(
        "--filled", metavar="OUT.npz", help="with --preview: draw these filled cells too"
    )
    p.set_defaults(func=cmd_data)

    from .methods import METHODS

    p = sub.add_parser("fit", help="fit an imputation method and write a run directory")
    _add_data_args(p)
    p.add_argument("--method", help=f"one of: {', '.join(METHODS)}")
    p.add_argument("--out", metavar="RUN_DIR", help="run directory to create")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue an interrupted fit of RUN_DIR from its last checkpoint (same settings; "
        "a torchrun fit under torchrun with as many processes)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=500,
        metavar="STEPS",
        help="save the training state every STEPS steps, for --resume (default 500)",
    )
    p.add_argument("--seed", type=int, default=None, help="seed of everything random (default 0)")
    _add_device_arg(p)
    p.add_argument("--figures", choices=FIGURE_LEVELS, default="all", help="which figures to draw")
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace RUN_DIR if it exists")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and stop")
    _add_method_args(p, METHODS)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("fill", help="generate images for empty cells with a fitted run")
    p.add_argument("--run", required=True, metavar="RUN_DIR")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--cells", metavar="CELLS.csv", help="csv with header writer,label")
    which.add_argument("--missing", action="store_true", help="every empty cell of the run's data")
    which.add_argument(
        "--reference",
        metavar="REF.npz",
        help="images of writers not in the training data (methods that read a writer's images: "
        "retrieval, predicted-retrieval, encoder-gan, collagan, completion-gan)",
    )
    p.add_argument(
        "--labels",
        default=None,
        metavar="L1,L2,...",
        help="with --reference: the labels to fill (default: every label the writer lacks)",
    )
    p.add_argument("--per-cell", type=int, default=16, metavar="N", help="images per cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--sample", action="append", default=[], metavar="PARAM=VALUE",
        help="override one of the run's sampling parameters for this fill, e.g. candidates=1 "
        "(completion-gan: plain draws, faster than herding the default 16), herd=rendered, "
        "herd_to=mean or truncation=0.8 (repeatable)",
    )  # fmt: skip
    p.add_argument(
        "--complete", action="store_true",
        help="write the run's real data too, then the fills: the completed dataset (every image "
        "flagged generated or not; the run, method and seed recorded)",
    )  # fmt: skip
    p.add_argument(
        "--out", required=True, metavar="OUT",
        help="OUT.npz (inkfill's format; streamed, any size), OUT.json (one LEAF json file) or "
        "OUT/ (a new directory of LEAF json shards, 100 writers each)",
    )  # fmt: skip
    p.add_argument(
        "--data", default=None, metavar="PATH",
        help="with --complete: the run's training data, if not at the path the run recorded",
    )  # fmt: skip
    _add_device_arg(p)
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    p.set_defaults(func=cmd_fill)

    p = sub.add_parser("bench", help="hide whole cells, fit methods on the rest, score their fills")
    _add_data_args(p)
    _add_config_args(p, BenchConfig)
    _add_config_args(p, FeatureConfig, prefix="feature-")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument(
        "--set", action="append", default=[], metavar="METHOD.PARAM=VALUE",
        help="a method's hyperparameter, e.g. cluster-gan.generator=conditional (repeatable)",
    )  # fmt: skip
    _add_device_arg(p)
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("report", help="write a static HTML report of a run (opens from disk)")
    p.add_argument("--run", required=True, metavar="RUN_DIR")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to create")
    p.add_argument("--data", help="the run's data file, if not where the run was fitted")
    p.add_argument("--bench", metavar="BENCH_DIR", help="bench results to show (found by itself "
                   "for a run inside a bench directory)")  # fmt: skip
    p.add_argument("--per-page", type=int, default=50, metavar="N", help="writers per page")
    p.add_argument("--seed", type=int, default=0, help="seed of the filled cells shown")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("serve", help="browse a run and generate images in a local web app")
    p.add_argument("--run", required=True, metavar="RUN_DIR")
    p.add_argument("--data", help="the run's data file, if not where the run was fitted")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    _add_device_arg(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("explain", help="show cluster-gan's voting map for one cell")
    p.add_argument("--run", required=True, metavar="RUN_DIR")
    p.add_argument("--writer", required=True)
    p.add_argument("--label", required=True, type=int)
    p.set_defaults(func=cmd_explain)
    return parser


def _add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps"
    )


def _add_config_args(p: argparse.ArgumentParser, cls, prefix: str = "") -> None:
    """One --flag per field of a config dataclass, default from the dataclass."""
    for f in dataclasses.fields(cls):
        flag = "--" + prefix + f.name.replace("_", "-")
        help_ = f"{f.metadata.get('help', '')} [{f.default}]".replace("%", "%%")  # argparse
        dest = (prefix + f.name).replace("-", "_")
        if isinstance(f.default, bool):
            p.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=f.default,
                dest=dest,
                help=help_,
            )
        else:
            p.add_argument(flag, type=type(f.default), default=f.default, dest=dest, help=help_)


def _config_from_args(args: argparse.Namespace, cls, prefix: str = ""):
    return cls(
        **{
            f.name: getattr(args, (prefix + f.name).replace("-", "_"))
            for f in dataclasses.fields(cls)
        }
    )


def _add_method_args(p: argparse.ArgumentParser, methods) -> None:
    """One --flag per hyperparameter of any method, named after its Config field."""
    group = p.add_argument_group("method hyperparameters (defaults depend on --method)")
    defaults: dict[str, dict[str, object]] = {}  # flag -> {method: default}
    for cls in methods.values():
        for f in dataclasses.fields(cls.Config):
            defaults.setdefault(f.name, {})[cls.name] = f.default
    seen: set[str] = set()
    for cls in methods.values():
        for f in dataclasses.fields(cls.Config):
            if f.name in seen or f.name == "seed":
                continue
            seen.add(f.name)
            flag = "--" + f.name.replace("_", "-")
            mine = defaults[f.name]
            if len(set(map(repr, mine.values()))) == 1:
                where = f"{', '.join(mine)}: {f.default}"
            else:
                where = "; ".join(f"{name}: {value}" for name, value in mine.items())
            help_ = f"{f.metadata.get('help', '')} [{where}]".replace("%", "%%")  # argparse
            if isinstance(f.default, bool):
                group.add_argument(
                    flag, action=argparse.BooleanOptionalAction, default=None, help=help_
                )
            else:
                group.add_argument(flag, type=type(f.default), default=None, help=help_)


def _method_params(args: argparse.Namespace, cls) -> dict:
    """The hyperparameters given on the command line; flags of other methods are an error."""
    from .methods import METHODS

    mine = {f.name for f in dataclasses.fields(cls.Config)}
    every = {f.name for c in METHODS.values() for f in dataclasses.fields(c.Config)} - {"seed"}
    params = {}
    for name in sorted(every):
        value = getattr(args, name, None)
        if value is None:
            continue
        if name not in mine:
            raise InkfillError(f"--{name.replace('_', '-')} does not apply to method {cls.name}")
        params[name] = value
    if args.seed is not None:
        params["seed"] = args.seed
    return params


def resolve_device(name: str):
    """auto -> cuda if available, else mps, else cpu; anything else must be usable here."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InkfillError(f"unknown device {name!r} (auto, cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InkfillError(
            "--device cuda: no CUDA GPU is available here (use --device auto or cpu)"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InkfillError("--device mps: MPS is not available here")
    return device


def cmd_data(args: argparse.Namespace) -> None:
    from .data import Dataset, WriterMatrix, load_dataset
    from .plots import save_matrix_figure

    config = DataConfig(path=args.data, labels=args.labels)
    data = load_dataset(config.path, config.labels)
    matrix = WriterMatrix(data)
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
    generated = data.generated if data.generated is not None else np.zeros(len(data), bool)
    if generated.any():
        cells = len(set(zip(data.writers[generated].tolist(), data.labels[generated].tolist())))
        method = (data.source or {}).get("method") if isinstance(data.source, dict) else None
        made = f" by {method}" if method else ""
        print(f"generated        {generated.sum():,} images in {cells:,} cells{made} "
              f"(real: {len(data) - generated.sum():,})")  # fmt: skip
    if args.filled and not args.preview:
        raise InkfillError("--filled needs --preview OUT.png")
    if args.preview:
        if args.preview_writers < 1:
            raise InkfillError("--preview-writers must be at least 1")
        rng = np.random.default_rng(args.seed)
        filled = {}
        candidates = matrix.writer_ids
        fills = None
        if generated.any():  # a completed dataset: its own fills are drawn as fills
            fills = data.subset(np.flatnonzero(generated))
            matrix = WriterMatrix(data.subset(np.flatnonzero(~generated)), matrix.label_ids)
        if args.filled:
            extra = load_dataset(args.filled, labels="all")
            fills = extra if fills is None else Dataset.concat([fills, extra])
        if fills is not None:
            known = set(matrix.writer_ids.tolist())
            for writer, label in sorted(set(zip(fills.writers.tolist(), fills.labels.tolist()))):
                if writer in known and label in matrix.label_ids:
                    mask = (fills.writers == writer) & (fills.labels == label)
                    filled[(writer, label)] = fills.images[mask]
            # Show writers with filled cells first: those are what the figure is about.
            with_fills = np.unique([w for w, _ in filled])
            if len(with_fills):
                candidates = with_fills
        n = min(args.preview_writers, len(candidates))
        writers = sorted(rng.choice(candidates, size=n, replace=False).tolist())
        title = f"{n} of {s['writers']} writers" + (" (blue, framed: filled)" if filled else "")
        save_matrix_figure(matrix, writers, args.preview, filled=filled, title=title)
        print(f"preview          {args.preview}")


def _resume_command(out: Path) -> str:
    """How to continue an interrupted fit of `out`: with as many processes as it had."""
    world = distributed.world_size()
    launcher = f"torchrun --nproc_per_node {world} -m inkfill" if world > 1 else "inkfill"
    return f"{launcher} fit --resume {out}"


def _partial(out: Path) -> Path:
    """Where a fit of `out` is built, and where it stays (with its checkpoints) if interrupted."""
    return out.parent / f".{out.name}.partial"


def cmd_fit(args: argparse.Namespace) -> None:
    from .methods.base import read_json

    if args.resume:
        if args.method or args.out:
            raise InkfillError("--resume RUN_DIR takes the settings of the interrupted fit: "
                               "give it without --method or --out")  # fmt: skip
        out = Path(args.resume)
        partial = _partial(out)
        if not (partial / FIT_ARGS).exists():
            done = " (it is complete)" if (out / "model.safetensors").exists() else ""
            raise InkfillError(f"no interrupted fit of {out} to resume{done}")
        try:
            blob = read_json(partial / FIT_ARGS)
            argv, data = blob["argv"], blob["data"]
        except (InkfillError, KeyError, TypeError) as e:
            raise InkfillError(f"{partial / FIT_ARGS}: unreadable ({e})") from None
        saved = build_parser().parse_args([str(a) for a in argv])
        # The data as resolved when the fit started (absolute), and the run where it is now.
        saved.argv, saved.resume, saved.data, saved.out = argv, str(out), data, str(out)
        return _fit(saved, resuming=True)
    if not args.method or not args.out:
        raise InkfillError("fit needs --method and --out (or --resume RUN_DIR)")
    return _fit(args, resuming=False)


FIT_ARGS = "fit_args.json"


def _fit(args: argparse.Namespace, resuming: bool) -> None:
    from .methods import method_class

    cls = method_class(args.method)
    method = cls(**_method_params(args, cls))
    config = method.config  # validates
    out = Path(args.out)
    if args.dry_run:
        resolved = {"method": cls.name, "params": dataclasses.asdict(config), "out": str(out)}
        resolved["data"] = {
            "path": args.data or os.environ.get("INKFILL_DATA"),
            "labels": args.labels,
        }
        print(json.dumps(resolved, indent=1))
        return
    partial = _partial(out)
    lock = contextlib.nullcontext()
    if int(os.environ.get("RANK", "0")) == 0:  # one process per run: torchrun's rank 0 holds it
        lock = _fit_lock(out)
    with lock:
        return _fit_locked(args, resuming, cls, method, out, partial)


@contextlib.contextmanager
def _fit_lock(out: Path):
    """Hold .RUN.lock while a fit of RUN runs: a second fit or --resume of the same run stops
    with one line instead of racing the first. The lock is the kernel's (flock), so a fit that was
    killed leaves nothing stale: the next one takes it over."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    path = out.parent / f".{out.name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "?"
            raise InkfillError(
                f"{out} is being fitted by process {pid}; wait for it or stop it"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            path.unlink(missing_ok=True)


def _fit_locked(args, resuming, cls, method, out, partial) -> None:
    from .checkpoint import Checkpoints
    from .data import WriterMatrix, load_dataset, resolve_data_path
    from .methods import METHODS
    from .methods.base import HISTORY_FILE, write_history, write_json

    if not resuming:
        _check_out(out, args.overwrite)
        if partial.exists() and not args.overwrite:
            raise InkfillError(
                f"{partial} holds an interrupted fit of {out}: continue it with "
                f"`inkfill fit --resume {out}`, or pass --overwrite to start over"
            )
    if args.checkpoint_every < 1:
        raise InkfillError("--checkpoint-every must be at least 1")
    if args.figures != "none":
        import matplotlib  # noqa: F401  (fail early if plotting is broken, not after training)
    data_config = DataConfig(path=args.data, labels=args.labels)
    matrix = WriterMatrix(load_dataset(data_config.path, data_config.labels))
    device = resolve_device(args.device)
    if distributed.launched():
        if not cls.data_parallel:
            raise InkfillError(
                f"torchrun: {cls.name} has no data-parallel training (run it in one process); "
                f"data-parallel training is "
                f"implemented for {', '.join(n for n, c in METHODS.items() if c.data_parallel)}"
            )
        device = distributed.setup(device)
        if not distributed.is_main():
            # The other ranks train, read the checkpoints rank 0 writes, and write nothing.
            distributed.barrier()  # until rank 0 has made the run's partial directory
            checkpoints = Checkpoints(partial / "checkpoint", args.checkpoint_every)
            try:
                method.fit(matrix, device=device, progress=False, checkpoints=checkpoints)
            except FloatingPointError as e:
                raise TrainingStopped(f"rank {distributed.rank()}: training stopped: {e}") from None
            distributed.teardown()
            return

    if not resuming:
        shutil.rmtree(partial, ignore_errors=True)

    def keep(tmp: Path) -> bool:
        return (tmp / "checkpoint").exists() and Checkpoints(tmp / "checkpoint").has_state()

    with _building(out, args.overwrite or resuming, tmp=partial, keep=keep) as tmp:
        data_path = str(resolve_data_path(data_config.path).resolve())
        write_json(tmp / FIT_ARGS, {"argv": [str(a) for a in args.argv], "data": data_path})
        checkpoints = Checkpoints(tmp / "checkpoint", args.checkpoint_every)
        distributed.barrier()  # the other ranks may now open the checkpoints
        summary = matrix.summary()
        log.info("fit %s on %s: %s", cls.name, args.data, summary)
        where = str(device)
        if distributed.active():
            where += f", rank 0 of {distributed.world_size()} data-parallel processes"
        print(
            f"fitting {method!r} on {summary['images']:,} images, {summary['writers']} writers, "
            f"{summary['labels']} labels ({where})"
        )
        if resuming:
            print(f"resuming from the checkpoints in {tmp / 'checkpoint'}")
        start = time.perf_counter()
        try:
            method.fit(
                matrix, device=device, progress=not args.no_progress, checkpoints=checkpoints
            )
        except FloatingPointError as e:
            raise TrainingStopped(
                f"training stopped: {e}; the last good checkpoint is kept in {tmp}: "
                f"`{_resume_command(out)}` continues from it, or start over with a lower "
                "learning rate and --overwrite"
            ) from None
        fit_seconds = time.perf_counter() - start
        world = distributed.world_size()
        distributed.teardown()  # every rank is done with the checkpoints
        shutil.rmtree(tmp / "checkpoint")
        (tmp / FIT_ARGS).unlink()
        print(f"fit took {fit_seconds:.1f} s")
        extra = {
            "data": {
                "path": str(args.data or os.environ.get("INKFILL_DATA")),
                **summary,
                "label_set": args.labels,
            },
            "fit_seconds": fit_seconds,
            "device": str(device),
            "processes": world,
            "inkfill_version": __version__,
        }
        method.save(tmp, extra=extra)
        metrics = method.evaluate(matrix, progress=not args.no_progress)
        metrics["fit_seconds"] = fit_seconds
        if getattr(method, "phase_seconds_", None):
            metrics["phase_seconds"] = method.phase_seconds_
        write_json(tmp / "metrics.json", metrics)
        write_history(tmp / HISTORY_FILE, getattr(method, "history_", {}))
        table = method.format_metrics(metrics)
        if table:
            print(table)
        for warning in metrics.get("warnings", []):
            log.warning(warning)
            print(f"warning: {warning}", file=sys.stderr)
        if args.figures != "none":
            method.save_figures(matrix, tmp / "figures", args.figures, metrics)
        log.info("done in %.1f s", time.perf_counter() - start)
    print(f"run written to {out}")


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise InkfillError(f"{out} already exists (pass --overwrite to replace it)")


class TrainingStopped(InkfillError):
    """Training diverged; the CLI exits with status 1 (not 2: the input was fine)."""

    exit_code = 1


@contextlib.contextmanager
def _building(out: Path, overwrite: bool, tmp: Path | None = None, keep=None):
    """A sibling temporary directory that replaces `out` only when the block completes; on any
    error or interrupt it is removed (unless `keep(tmp)` says it holds something to resume), so
    no half-written run is left behind. Logs go to log.txt."""
    _check_out(out, overwrite)
    if tmp is None:
        tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger("inkfill")
    handler = logging.FileHandler(tmp / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.DEBUG if logger.getEffectiveLevel() <= logging.DEBUG else logging.INFO)
    try:
        yield tmp
    except BaseException as e:
        if keep is not None and keep(tmp):
            if not isinstance(e, InkfillError):  # (those say so, or concern the input)
                print(f"the last checkpoint is kept in {tmp}: continue with "
                      f"`{_resume_command(out)}`", file=sys.stderr)  # fmt: skip
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        handler.close()
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def read_cells(path: str) -> list[tuple[str, int]]:
    """CELLS.csv: a header `writer,label`, then one cell a line (UTF-8, with or without the
    byte-order mark a spreadsheet writes; LF or CRLF line ends)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise InkfillError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InkfillError(f"{path}: unreadable csv ({e})") from None
    if not rows or [c.strip() for c in rows[0]] != ["writer", "label"]:
        raise InkfillError(f"{path}: the first line must be the header writer,label")
    cells, seen = [], set()
    for n, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != 2:
            raise InkfillError(f"{path}: line {n}: expected writer,label, got {len(row)} fields")
        writer, label = row[0].strip(), row[1].strip()
        try:
            label = int(label)
        except ValueError:
            raise InkfillError(
                f"{path}: line {n}: label {label!r} is not a LEAF class id"
            ) from None
        if (writer, label) in seen:
            raise InkfillError(f"{path}: line {n}: cell ({writer}, {label}) is listed twice")
        seen.add((writer, label))
        cells.append((writer, label))
    if not cells:
        raise InkfillError(f"{path}: no cells listed")
    return cells


def cmd_fill(args: argparse.Namespace) -> None:
    from .methods import load_run, load_run_data
    from .methods.base import write_fill
    from .progress import tqdm

    if args.per_cell < 1:
        raise InkfillError("--per-cell must be at least 1")
    if args.labels is not None and args.reference is None:
        raise InkfillError("--labels goes with --reference")
    if args.complete and args.reference is not None:
        raise InkfillError("--complete goes with --missing or --cells (the run's own writers)")
    if args.data is not None and not args.complete:
        raise InkfillError("--data goes with --complete")
    if args.reference is not None:
        return _fill_reference(args)
    cells = None if args.missing else read_cells(args.cells)
    method = load_run(args.run, device=resolve_device(args.device))
    _apply_sampling(method, args.sample)
    if cells is None:
        cells = method.matrix_.empty_cells()
    else:
        for writer, label in cells:  # unknown ids fail before any work
            method.matrix_.row(writer), method.matrix_.col(label)
    real = None
    if args.complete:
        real = _run_data(load_run_data(args.run, method, args.data), method, args.run)
    source = {
        "run": str(Path(args.run).resolve()),
        "method": method.name,
        "seed": args.seed,
        "per_cell": args.per_cell,
        "inkfill": __version__,
    }
    start = time.perf_counter()
    with tqdm(total=len(cells), desc="fill", unit="cell", disable=args.no_progress) as bar:
        n = write_fill(args.out, method, cells, args.per_cell, args.seed, bar, real, source)
    seconds = time.perf_counter() - start
    what = f"{len(real):,} real + " if real is not None else ""
    print(f"{what}{len(cells) * args.per_cell:,} generated images for {len(cells):,} cells "
          f"in {seconds:.2f} s -> {args.out} ({n:,} images)")  # fmt: skip


def _run_data(real, method, run):
    """--complete: the real images of the run's labels, checked to be the data it was fitted on
    (the same writers and images per cell), or the completed dataset would mix two datasets."""
    info = method.matrix_
    real = real.subset(np.flatnonzero(np.isin(real.labels, info.label_ids)))
    if set(np.unique(real.writers).tolist()) != set(info.writer_ids.tolist()):
        raise InkfillError(
            f"--complete: the data's writers are not those {run} was fitted on; "
            "pass its training data with --data"
        )
    counts = np.zeros_like(info.counts)
    rows = np.asarray([info.row(w) for w in real.writers.tolist()], np.int64)
    cols = np.asarray([info.col(int(v)) for v in real.labels.tolist()], np.int64)
    np.add.at(counts, (rows, cols), 1)
    if not np.array_equal(counts, info.counts):
        raise InkfillError(
            f"--complete: the data's cells are not those {run} was fitted on; "
            "pass its training data with --data"
        )
    return real


def _fill_reference(args: argparse.Namespace) -> None:
    from .data import load_dataset
    from .methods import load_run
    from .methods.base import fill_new_writers
    from .progress import tqdm

    labels = None
    if args.labels is not None:
        try:
            labels = [int(v) for v in args.labels.split(",") if v.strip()]
        except ValueError:
            raise InkfillError(f"--labels {args.labels!r}: expected label ids like 0,3,7") from None
        if not labels:
            raise InkfillError("--labels: no label given")
    method = load_run(args.run, device=resolve_device(args.device))
    _apply_sampling(method, args.sample)
    reference = load_dataset(args.reference, "all")
    start = time.perf_counter()
    with tqdm(desc="fill", unit="cell", disable=args.no_progress) as bar:
        filled = fill_new_writers(method, reference, labels, args.per_cell, args.seed, bar)
    seconds = time.perf_counter() - start
    filled.save(args.out)
    n_writers = len(set(filled.writers.tolist()))
    print(f"{len(filled):,} images for {n_writers} new writer(s) in {seconds:.2f} s -> {args.out}")


def _parse_sets(items: list[str]) -> dict[str, dict]:
    """--set METHOD.PARAM=VALUE, typed by the method's Config field."""
    from .methods import method_class

    out: dict[str, dict] = {}
    for item in items:
        key, eq, value = item.partition("=")
        name, dot, param = key.rpartition(".")
        if not eq or not dot:
            raise InkfillError(f"--set {item!r}: expected METHOD.PARAM=VALUE")
        fields = {f.name: f for f in dataclasses.fields(method_class(name).Config)}
        param = param.replace("-", "_")
        if param not in fields:
            raise InkfillError(f"--set {item!r}: {name} has no parameter {param}")
        out.setdefault(name, {})[param] = _typed("--set", item, fields[param], value)
    return out


def _typed(flag: str, item: str, field: dataclasses.Field, value: str):
    """`value` as the type of the Config field's default."""
    kind = type(field.default)
    try:
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return value.lower() in ("true", "1")
        return kind(value)
    except ValueError:
        raise InkfillError(f"{flag} {item!r}: {value!r} is not a {kind.__name__}") from None


def _apply_sampling(method, items: list[str]) -> None:
    """fill --sample PARAM=VALUE: change a loaded run's sampling-time parameters (those whose
    help starts with "sampling:"); anything that would need a refit is refused."""
    fields = {
        f.name: f
        for f in dataclasses.fields(method.Config)
        if f.metadata.get("help", "").startswith("sampling:")
    }
    for item in items:
        key, eq, value = item.partition("=")
        key = key.replace("-", "_")
        if not eq:
            raise InkfillError(f"--sample {item!r}: expected PARAM=VALUE")
        if key not in fields:
            can = ", ".join(sorted(fields)) or "none"
            raise InkfillError(
                f"--sample {item!r}: {method.name} samples with {can}; others need a refit"
            )
        setattr(method, key, _typed("--sample", item, fields[key], value))
    _ = method.config  # validated like any fitted parameter


def cmd_bench(args: argparse.Namespace) -> None:
    from .bench import run_bench
    from .data import WriterMatrix, load_dataset

    config = _config_from_args(args, BenchConfig)
    feature_config = _config_from_args(args, FeatureConfig, prefix="feature-")
    method_params = _parse_sets(args.set)
    out = Path(args.out)
    _check_out(out, args.overwrite)
    matrix = WriterMatrix(load_dataset(args.data, args.labels))
    device = resolve_device(args.device)
    start = time.perf_counter()
    with _building(out, args.overwrite) as tmp:
        results = run_bench(
            matrix, config, tmp, device, feature_config, method_params,
            progress=not args.no_progress, echo=print,
        )  # fmt: skip
    from .bench import results_markdown

    print()
    print(results_markdown(results))
    print(f"bench took {time.perf_counter() - start:.0f} s; results in {out}/results.md")


def cmd_report(args: argparse.Namespace) -> None:
    from .report import write_report

    run, out = Path(args.run), Path(args.out)
    _check_run(run)
    bench = Path(args.bench) if args.bench else None
    with _building(out, args.overwrite) as tmp:
        summary = write_report(run, tmp, args.data, bench, args.per_page, args.seed)
    print(f"report of {run} ({summary['method']}: {summary['writers']:,} writers, "
          f"{summary['filled_cells']:,} filled cells, {summary['pages']} pages) written to "
          f"{out / 'index.html'}")  # fmt: skip


def cmd_serve(args: argparse.Namespace) -> None:
    from .serve import serve

    run = Path(args.run)
    _check_run(run)
    serve(run, args.data, args.host, args.port, resolve_device(args.device))


def _check_run(run: Path) -> None:
    if not run.is_dir():
        raise InkfillError(f"no such run: {run}")


def cmd_explain(args: argparse.Namespace) -> None:
    from .data import label_name
    from .methods import load_run

    method = load_run(args.run)
    clusters = getattr(method, "clusters_", None)
    if clusters is None:
        raise InkfillError(f"{args.run}: method {method.name} has no voting map (cluster-gan does)")
    info = method.matrix_
    r, c = info.row(args.writer), info.col(args.label)
    vote = clusters.vote(args.writer, args.label)
    state = "observed" if info.counts[r, c] else "empty"
    print(f"cell ({args.writer}, {label_name(args.label)}): {state}")
    print("labels the writer has -> their cluster there, related writers (same cluster)")
    for d, n_related in vote.related_by_label.items():
        d_label = int(info.label_ids[d])
        print(f"  {label_name(d_label):>3}: cluster {clusters.assign_[r, d]}, {n_related} related")
    unit = "related writers" if clusters.vote_rule == "writers" else "(writer, label) pairs"
    print(f"votes in the clusters of label {label_name(args.label)} ({unit}):")
    for k, (n, size) in enumerate(zip(vote.counts.tolist(), vote.sizes.tolist())):
        mark = "  <- chosen" if k == vote.cluster else ""
        print(f"  cluster {k}: {n:>4} votes  ({size} writers){mark}")
    if vote.fallback:
        print("no related writer has this label: fell back to the cluster with the most writers")
    print(f"chosen cluster: {vote.cluster}")
    if state == "observed":
        print(f"(the cell is observed: the writer's own cluster here is {clusters.assign_[r, c]})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    console = logging.StreamHandler()
    console.setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, handlers=[console]
    )
    _set_threads()
    if not sys.stderr.isatty():  # a log file gets a redraw every 30 s, not thousands of them
        progress.to_log = True
    try:
        args.func(args)
    except InkfillError as e:
        print(f"inkfill {args.command}: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print("inkfill: interrupted", file=sys.stderr)
        return 130
    return 0


def _set_threads() -> None:
    """One intra-op thread per available core: more oversubscribes and slows PyTorch badly."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    # torchrun starts LOCAL_WORLD_SIZE processes on this machine: they share its cores.
    per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (cores or 1) // max(1, per_machine)))
