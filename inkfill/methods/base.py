"""The contract every imputation method follows (scikit-learn style) and what they share:
hyperparameters as keyword arguments, fit(matrix) -> self, generate(writer, label, n, seed),
save(dir) / load(dir) with safetensors weights and JSON (no pickle), per-cell seeding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import Checkpoints, Loop
from ..config import InkfillError
from ..data import Cell, DataError, Dataset, NpzStream, WriterMatrix, atomic_path, file_mode
from ..train import autocast, use_bf16

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MATRIX_FILE = "matrix.json"
HISTORY_FILE = "metrics.jsonl"  # the loss history of a fit, one line a logged step
# Fills read as their label this much less often than real images: a collapsed fit, not just a
# weak method (completion-gan's draw check, the bench's rows; stop 36's collapse: 0.61 vs 0.98).
COLLAPSE_GAP = 0.1
FILL_CHUNK = 256  # cells per generate_cells call in fill(): big batches, a live progress bar
FILL_IMAGES = 16_384  # images per generate_cells call at most: memory flat at any --per-cell
# Images per forward pass at inference. Small enough for the first layers' activations to stay in
# a CPU's cache (on 2 cores, completion-gan's classifier runs 1.8x the images/s it did in chunks of
# 2,048), large enough to keep a GPU busy.
INFER_CHUNK = 512


def blank_margin(images: np.ndarray, margin: int) -> np.ndarray:
    """images (..., 28, 28) uint8 with their `margin` outermost rows and columns set to
    background, where the scans have no ink (0.01% of femnist_digits' images have ink within 2 px
    of the edge); in place."""
    if m := margin:
        images[..., :m, :] = images[..., -m:, :] = 0
        images[..., :m] = images[..., -m:] = 0
    return images


class NotFittedError(InkfillError):
    pass


def cell_seed(seed: int, writer: str, label: int) -> int:
    """A 63-bit seed for one cell: images of a cell never depend on which other cells were asked."""
    digest = hashlib.blake2b(f"{seed}\x1f{writer}\x1f{label}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def cell_generator(seed: int, writer: str, label: int) -> torch.Generator:
    return torch.Generator().manual_seed(cell_seed(seed, writer, label))


class MatrixInfo:
    """What a fitted method remembers of its training matrix: writers, labels, observed cells."""

    def __init__(self, writer_ids: Sequence[str], label_ids: Sequence[int], counts: np.ndarray):
        self.writer_ids = np.asarray(writer_ids, dtype=str)
        self.label_ids = np.asarray(label_ids, dtype=np.int64)
        self.counts = np.asarray(counts, dtype=np.int64)
        self._row = {w: i for i, w in enumerate(self.writer_ids.tolist())}
        self._col = {int(v): i for i, v in enumerate(self.label_ids.tolist())}

    @classmethod
    def of(cls, matrix: WriterMatrix) -> MatrixInfo:
        return cls(matrix.writer_ids, matrix.label_ids, matrix.counts)

    def row(self, writer: str) -> int:
        try:
            return self._row[str(writer)]
        except KeyError:
            raise DataError(
                f"unknown writer {writer!r} (not in the data this run was fitted on)"
            ) from None

    def col(self, label: int) -> int:
        try:
            return self._col[int(label)]
        except (KeyError, TypeError, ValueError):
            known = ", ".join(str(v) for v in self.label_ids.tolist())
            raise DataError(f"label {label!r} not in the data (labels: {known})") from None

    def is_observed(self, writer: str, label: int) -> bool:
        return bool(self.counts[self.row(writer), self.col(label)] > 0)

    def empty_cells(self) -> list[Cell]:
        rows, cols = np.nonzero(self.counts == 0)
        return [(str(self.writer_ids[r]), int(self.label_ids[c])) for r, c in zip(rows, cols)]

    def to_json(self) -> dict:
        return {
            "writer_ids": self.writer_ids.tolist(),
            "label_ids": self.label_ids.tolist(),
            "counts": self.counts.tolist(),
        }

    @classmethod
    def from_json(cls, blob: dict) -> MatrixInfo:
        return cls(blob["writer_ids"], blob["label_ids"], np.asarray(blob["counts"]))


class Method:
    """Base class. Subclasses set `name`, `Config` (a frozen dataclass holding the defaults) and
    implement `_fit`, `_generate`, `_state` / `_set_state`.

    Hyperparameters are keyword arguments named after the Config fields, stored unchanged;
    learned state ends in `_`.
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    data_parallel: ClassVar[bool] = False  # fit() trains data-parallel under torchrun

    def __init__(self, **params: Any):
        fields = {f.name: f.default for f in dataclasses.fields(self.Config)}
        unknown = sorted(set(params) - set(fields))
        if unknown:
            raise InkfillError(f"{self.name}: unknown parameter {', '.join(unknown)}")
        for key, default in fields.items():
            setattr(self, key, params.get(key, default))

    def get_params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self.Config)}

    @property
    def config(self):
        """The hyperparameters as the frozen Config (validated in its __post_init__)."""
        return self.Config(**self.get_params())

    def __repr__(self) -> str:
        changed = {
            k: v for k, v in self.get_params().items() if v != getattr(self.Config, k, object())
        }
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in changed.items())})"

    # -- the contract ------------------------------------------------------------------------

    def fit(
        self,
        matrix: WriterMatrix,
        *,
        device: str | torch.device = "cpu",
        progress: bool = False,
        checkpoints: Checkpoints | None = None,
    ):
        """Learn from `matrix`. With `checkpoints` (checkpoint.Checkpoints), training saves its
        state there as it goes and continues from whatever state it finds there."""
        _ = self.config  # validate before any work
        self.device_ = torch.device(device)
        self.matrix_ = MatrixInfo.of(matrix)
        self._checkpoints = checkpoints
        if getattr(self, "bf16", False) and not use_bf16(self.device_, True):
            log.warning(
                "%s: training in float32: this %s has no native bfloat16 (bf16 would be emulated, "
                "many times slower)",
                self.name,
                self.device_.type,
            )
        try:
            self._fit(matrix, progress=progress)
        finally:
            self._checkpoints = None
        return self.to(self.device_)

    def generate(self, writer: str, label: int, n: int, seed: int = 0) -> np.ndarray:
        """n new images for cell (writer, label): uint8 (n, 28, 28), the same for the same seed."""
        self.check_fitted()
        self.matrix_.row(writer), self.matrix_.col(label)  # clear errors for unknown ids
        if n < 0:
            raise InkfillError("n must be >= 0")
        return self._generate(str(writer), int(label), int(n), cell_generator(seed, writer, label))

    def generate_cells(self, cells: Sequence[Cell], n: int, seed: int = 0) -> list[np.ndarray]:
        """`generate(writer, label, n, seed)` for every cell, drawn in large batches where the
        method can: the same images as cell by cell, many times faster for thousands of cells."""
        self.check_fitted()
        if n < 0:
            raise InkfillError("n must be >= 0")
        cells = [(str(w), int(lab)) for w, lab in cells]
        for writer, label in cells:
            self.matrix_.row(writer), self.matrix_.col(label)  # clear errors for unknown ids
        return self._generate_cells(cells, int(n), seed) if cells else []

    def check_fitted(self) -> None:
        if not hasattr(self, "matrix_"):
            raise NotFittedError(
                f"{self.name} is not fitted: call fit(matrix) or load(run_dir) first"
            )

    def to(self, device: str | torch.device):
        self.device_ = torch.device(device)
        for module in self._modules():
            # NHWC: the faster convolution kernels on CPU (oneDNN) and GPU (cuDNN).
            module.to(self.device_, memory_format=torch.channels_last)
        return self

    def _inference(self):
        """The context of every generator forward pass: no autograd, and bf16 autocast when
        the method trains in bf16 and this device computes bf16 natively (about 2x the images/s
        on a CPU with AVX-512 BF16; train.bf16_native)."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        stack.enter_context(autocast(self.device_, getattr(self, "bf16", False)))
        return stack

    # -- reporting (optional) ------------------------------------------------------------------

    def evaluate(self, matrix: WriterMatrix, progress: bool = False) -> dict:
        """Method-specific checks written to RUN/metrics.json after fit."""
        return {}

    def format_metrics(self, metrics: dict) -> str:
        """A plain-text table of `evaluate`'s result, for the CLI to print."""
        return ""

    def save_figures(self, matrix: WriterMatrix, out_dir: Path, level: str, metrics: dict) -> None:
        """Figures for RUN/figures; level is "some" or "all"."""

    # -- saving ------------------------------------------------------------------------------

    def save(self, run_dir: str | os.PathLike, extra: dict | None = None) -> None:
        """Write config.json (method, params, `extra`), matrix.json and model.safetensors."""
        self.check_fitted()
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        tensors, state_extra = self._state()
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        blob = {"method": self.name, "params": self.get_params(), **state_extra, **(extra or {})}
        write_json(run_dir / CONFIG_FILE, blob)
        write_json(run_dir / MATRIX_FILE, self.matrix_.to_json())
        tmp = atomic_path(run_dir / WEIGHTS_FILE)
        save_file(tensors, str(tmp))
        os.chmod(tmp, file_mode())  # safetensors writes 0600; a run is read like its other files
        os.replace(tmp, run_dir / WEIGHTS_FILE)

    @classmethod
    def load(cls, run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> Method:
        run_dir = Path(run_dir)
        config = read_json(run_dir / CONFIG_FILE)
        self = cls(**config.get("params", {}))
        self.matrix_ = MatrixInfo.from_json(read_json(run_dir / MATRIX_FILE))
        self.device_ = torch.device(device)
        try:
            tensors = load_file(str(run_dir / WEIGHTS_FILE))
        except FileNotFoundError:
            raise InkfillError(
                f"{run_dir}: missing {WEIGHTS_FILE}: not a complete inkfill run"
            ) from None
        except Exception as e:  # safetensors raises its own error types on corrupt headers
            raise InkfillError(f"{run_dir / WEIGHTS_FILE}: corrupt or truncated ({e})") from None
        try:
            self._set_state(tensors, config)
        except (KeyError, RuntimeError, ValueError) as e:
            raise InkfillError(f"{run_dir}: weights do not match the config ({e})") from None
        return self.to(device)

    # -- for subclasses ----------------------------------------------------------------------

    def _fit(self, matrix: WriterMatrix, progress: bool) -> None:
        raise NotImplementedError

    def _generate(self, writer: str, label: int, n: int, rng: torch.Generator) -> np.ndarray:
        raise NotImplementedError

    def _generate_cells(self, cells: list[Cell], n: int, seed: int) -> list[np.ndarray]:
        """Override to batch: one forward pass for many cells, each with its own noise stream."""
        return [self._generate(w, lab, n, cell_generator(seed, w, lab)) for w, lab in cells]

    def _state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors for the safetensors file and extra JSON for config.json."""
        raise NotImplementedError

    def _set_state(self, tensors: dict[str, torch.Tensor], config: dict) -> None:
        raise NotImplementedError

    def _modules(self) -> list[torch.nn.Module]:
        return []

    # -- resumable stages (no-ops without checkpoints) ----------------------------------------

    @contextlib.contextmanager
    def _phase(self, name: str):
        """Time a part of the fit: `phase_seconds_` (written to RUN/metrics.json) and the log."""
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        self.phase_seconds_ = {**getattr(self, "phase_seconds_", {}), name: round(seconds, 2)}
        log.info("%s: %s took %.1f s", self.name, name, seconds)

    def _finished(self, stage: str, modules: dict[str, torch.nn.Module]) -> dict | None:
        """If `stage` finished in an earlier, interrupted fit: load it into `modules` and return
        its loss history; else None."""
        ck = getattr(self, "_checkpoints", None)
        history = None if ck is None else ck.finished(stage, modules)
        if history is not None:
            for module in modules.values():
                module.eval()  # as the training loop leaves them
        return history

    def _loop(self, stage: str, modules: dict[str, torch.nn.Module]) -> Loop | None:
        ck = getattr(self, "_checkpoints", None)
        return None if ck is None else ck.loop(stage, modules)

    def _finish(self, stage: str, modules: dict[str, torch.nn.Module], history: dict) -> None:
        ck = getattr(self, "_checkpoints", None)
        if ck is not None:
            ck.finish(stage, modules, history)


def fill(
    method: Method, cells: Sequence[Cell], per_cell: int, seed: int = 0, progress=None
) -> Dataset:
    """Generate `per_cell` images for each requested empty cell, as a Dataset in the input format
    (every image flagged generated). Observed cells are refused: imputation never alters (or
    adds to) what was observed. For more images than memory holds, `write_fill` streams them."""
    parts = list(fill_parts(method, cells, per_cell, seed, progress))
    if not parts:
        empty = np.zeros(0, bool)
        return Dataset(
            np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.int64), np.zeros(0, str), empty
        )
    return Dataset.concat(parts)


def fill_parts(
    method: Method, cells: Sequence[Cell], per_cell: int, seed: int = 0, progress=None
) -> Iterator[Dataset]:
    """fill()'s images a piece at a time, each piece at most FILL_IMAGES images: whole cells in
    batches (up to FILL_CHUNK cells), or one cell in pieces where a cell alone is more (piece k > 0
    of a cell is drawn with its own seed)."""
    method.check_fitted()
    info = method.matrix_
    for writer, label in cells:
        if info.is_observed(writer, label):
            raise DataError(
                f"cell ({writer}, {label}) is observed in the data; only empty cells are filled"
            )

    def part(images, writer, label):
        n = len(images)
        return Dataset(images, np.full(n, label), np.full(n, writer), np.ones(n, bool))

    if per_cell <= FILL_IMAGES:
        step = max(1, min(FILL_CHUNK, FILL_IMAGES // max(per_cell, 1)))
        for start in range(0, len(cells), step):
            chunk = cells[start : start + step]
            for (writer, label), images in zip(chunk, method.generate_cells(chunk, per_cell, seed)):
                yield part(images, writer, label)
            if progress is not None:
                progress.update(len(chunk))
        return
    for writer, label in cells:
        for k, start in enumerate(range(0, per_cell, FILL_IMAGES)):
            n = min(FILL_IMAGES, per_cell - start)
            piece_seed = seed if k == 0 else cell_seed(seed, "piece", k)
            yield part(method.generate_cells([(writer, label)], n, piece_seed)[0], writer, label)
        if progress is not None:
            progress.update(1)


LEAF_MAX_IMAGES = 2_000_000  # a LEAF json is built in memory (~1.6 GB of images at most)


def is_leaf_path(path: str | os.PathLike) -> bool:
    """A LEAF json file (.json) or a directory of LEAF shards (ends in /) rather than an npz."""
    path = str(path)
    return path.endswith(("/", os.sep)) or Path(path).suffix.lower() == ".json"


def write_fill(
    out: str | os.PathLike,
    method: Method,
    cells: Sequence[Cell],
    per_cell: int,
    seed: int = 0,
    progress=None,
    real: Dataset | None = None,
    source: dict | None = None,
) -> int:
    """fill() straight to `out` (npz, LEAF .json or LEAF directory/), after `real` images when
    given (the completed dataset); every image flagged generated or not. An npz is streamed, so
    memory stays flat at any per_cell; a request larger than the free disk is refused before any
    work, and an error midway leaves no file. Returns the number of images written."""
    n = len(cells) * per_cell + (len(real) if real is not None else 0)
    leaf = is_leaf_path(out)
    if str(out).endswith(("/", os.sep)) and Path(out).exists():
        raise InkfillError(f"{out}: already exists; a LEAF directory is written only as a new one")
    if leaf and n > LEAF_MAX_IMAGES:
        raise InkfillError(
            f"{out}: {n:,} images is more than a LEAF json is written for "
            f"({LEAF_MAX_IMAGES:,}, built in memory); write an .npz, which is streamed"
        )
    # Upper bounds: an npz holds at most the raw bytes; LEAF text takes 9 bytes a pixel.
    check_free_space(out, n * (28 * 28 * 9 + 64 if leaf else 28 * 28 + 64))
    if leaf:
        parts = ([real] if real is not None else []) + list(
            fill_parts(method, cells, per_cell, seed, progress)
        )
        if not parts:
            raise InkfillError("nothing to write: no cells and no real images")
        done = Dataset.concat(parts)
        dataclasses.replace(done, source=source).save(out)
        return len(done)
    stream = NpzStream(out, n, source)
    try:
        if real is not None:
            stream.add(real)
        for part in fill_parts(method, cells, per_cell, seed, progress):
            stream.add(part)
        stream.close()
    except BaseException:
        stream.abort()
        raise
    return n


def check_free_space(out: str | os.PathLike, needed: int) -> None:
    """Refuse, before any work, to write up to `needed` bytes where less is free."""
    where = Path(out).expanduser().absolute().parent
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if needed > free:
        raise InkfillError(
            f"{out}: this fill needs up to {needed / 1e9:,.1f} GB and {where} has "
            f"{free / 1e9:,.1f} GB free; ask for fewer images (--per-cell) or write elsewhere"
        )


def save_generator_figures(method: Method, matrix: WriterMatrix, out_dir: Path) -> None:
    """The figures of a trained generator: its losses by step, and 16 writers with empty cells
    shown with their real cells and one generated image in each empty cell."""
    from ..plots import save_loss_curves, save_matrix_figure

    save_loss_curves(method.history_, out_dir / "losses.png", f"{method.name}: G and D losses")
    rows = np.flatnonzero(~matrix.observed.all(axis=1))
    rows = np.random.default_rng(method.seed).permutation(rows)[:16]
    writers = [str(matrix.writer_ids[r]) for r in sorted(rows)]
    filled = {
        (w, int(matrix.label_ids[c])): method.generate(w, int(matrix.label_ids[c]), 1, method.seed)
        for w in writers
        for c in np.flatnonzero(~matrix.observed[matrix.row(w)])
    }
    save_matrix_figure(
        matrix, writers, out_dir / "filled.png", filled, f"{method.name}: filled cells (blue)"
    )


def fill_new_writers(
    method: Method,
    reference: Dataset,
    labels: Sequence[int] | None,
    per_cell: int,
    seed: int = 0,
    progress=None,
) -> Dataset:
    """Images of `labels` for writers known only from a few images (`reference`, any labels).

    Each writer in `reference` is filled separately; with labels=None, every label the run knows
    that the writer's reference images lack. Only methods that read a style from images (the
    encoder ones) can do this.
    """
    method.check_fitted()
    if not hasattr(method, "generate_from_reference"):
        from . import reference_methods

        raise InkfillError(
            f"method {method.name} cannot fill writers it was not trained on; "
            f"fit one that reads a writer's images ({', '.join(reference_methods())})"
        )
    info = method.matrix_
    known = set(info.label_ids.tolist())
    unknown = sorted(set(np.unique(reference.labels).tolist()) - known)
    if unknown:
        raise DataError(f"reference images have labels the run does not know: {unknown[:5]}")
    for label in labels or []:
        info.col(label)  # unknown labels fail before any work
    parts = []
    for writer in dict.fromkeys(reference.writers.tolist()):
        mine = reference.writers == writer
        targets = labels
        if targets is None:
            targets = sorted(known - set(reference.labels[mine].tolist()))
        for label in targets:
            images = method.generate_from_reference(
                reference.images[mine], reference.labels[mine], label, per_cell, seed, writer
            )
            n = len(images)
            parts.append(Dataset(images, np.full(n, label), np.full(n, writer), np.ones(n, bool)))
            if progress is not None:
                progress.update(1)
    if not parts:
        raise DataError("nothing to fill: the reference writers already have every label")
    return Dataset.concat(parts)


def write_history(path: Path, histories: dict) -> None:
    """A fit's loss histories ({model: {"step": [...], loss: [...]}}) as JSON lines."""
    with open(path, "w") as f:
        for name, h in histories.items():
            keys = [k for k in h if k != "step"]
            for i, step in enumerate(h["step"]):
                f.write(
                    json.dumps({"model": name, "step": step, **{k: h[k][i] for k in keys}}) + "\n"
                )


def write_json(path: Path, blob: Any) -> None:
    tmp = atomic_path(path)
    try:
        tmp.write_text(json.dumps(blob, indent=1, default=_json_default) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _json_default(value: Any):
    if isinstance(value, np.integer | np.floating):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InkfillError(f"{path}: missing: not an inkfill run directory") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InkfillError(f"{path}: corrupt or truncated ({e})") from None
