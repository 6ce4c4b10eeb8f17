"""FEMNIST loading (npz and LEAF json), the writers x labels matrix, holdout of whole cells.

Public images are uint8 (N, 28, 28), 0 = background, 255 = ink, upright; `to_model` and
`to_images` are the one place where they become model tensors in [-1, 1] and back.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import DATA_ENV, IMAGE_SIZE, LABEL_CHARS, N_LEAF_CLASSES, InkfillError

LEAF_HINT = (
    "get FEMNIST with LEAF's preprocessing (github.com/TalwalkarLab/leaf: "
    "cd data/femnist && ./preprocess.sh -s niid --sf 1.0 -k 0 -t sample) and pass "
    f"--data leaf/data/femnist/data, or set {DATA_ENV}"
)


class DataError(InkfillError):
    """Missing, unreadable or malformed data."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """Aligned arrays as on disk: images uint8 (N, 28, 28), labels int64 (N,), writers str (N,);
    `generated` bool (N,) where some images are inkfill's fills rather than a writer's own (None:
    all real), and `source` where they came from (run, method, seed), as written with them."""

    images: np.ndarray
    labels: np.ndarray
    writers: np.ndarray
    generated: np.ndarray | None = None
    source: dict | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def n_generated(self) -> int:
        return 0 if self.generated is None else int(self.generated.sum())

    def subset(self, index: np.ndarray) -> Dataset:
        generated = None if self.generated is None else self.generated[index]
        return Dataset(
            self.images[index], self.labels[index], self.writers[index], generated, self.source
        )

    @staticmethod
    def concat(parts: Sequence[Dataset]) -> Dataset:
        flagged = any(p.generated is not None for p in parts)
        generated = (
            np.concatenate(
                [p.generated if p.generated is not None else np.zeros(len(p), bool) for p in parts]
            ).astype(bool)
            if flagged
            else None
        )
        return Dataset(
            np.concatenate([p.images for p in parts]).reshape(-1, IMAGE_SIZE, IMAGE_SIZE),
            np.concatenate([p.labels for p in parts]).astype(np.int64),
            np.concatenate([p.writers for p in parts]).astype(str),
            generated,
            next((p.source for p in parts if p.source is not None), None),
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write an npz in the input format (a LEAF json file where `path` ends in .json, a
        directory of LEAF shards where it ends in /), atomically: whole or not at all."""
        path_s = str(path)
        if path_s.endswith(("/", os.sep)) or Path(path_s).suffix.lower() == ".json":
            return save_leaf(self, path_s)
        arrays = {"images": self.images, "labels": self.labels, "writers": self.writers}
        if self.generated is not None:
            arrays["generated"] = self.generated.astype(bool)
        if self.source is not None:
            arrays["source"] = np.asarray(json.dumps(self.source, sort_keys=True))
        save_npz(path, **arrays)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode of a newly created file under the current umask (0644 under umask 022)."""
    return 0o666 & ~_umask()


def atomic_path(path: Path) -> Path:
    """A fresh temporary file beside `path`, readable like a normally created file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.stem}.", suffix=f"{path.suffix}.tmp", dir=path.parent
    )
    os.close(fd)
    os.chmod(tmp, file_mode())
    return Path(tmp)


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """np.savez_compressed, atomically: the file appears whole or not at all."""
    path = Path(path)
    tmp = atomic_path(path)
    try:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class NpzStream:
    """An npz written as the images arrive, in pieces, so that memory stays flat however many
    there are: `add(dataset)` appends, `close()` writes the small arrays (labels, writers,
    generated, source) and moves the file into place; any error or `abort()` leaves nothing.
    The file is the one `Dataset.save` writes (the same arrays, deflated)."""

    def __init__(self, path: str | os.PathLike, n_images: int, source: dict | None = None):
        self.path, self.n, self.source = Path(path), int(n_images), source
        self.tmp = atomic_path(self.path)
        self._zip = zipfile.ZipFile(self.tmp, "w", zipfile.ZIP_DEFLATED, allowZip64=True)
        self._images = self._zip.open("images.npy", "w", force_zip64=True)
        header = {"descr": "|u1", "fortran_order": False, "shape": (self.n, IMAGE_SIZE, IMAGE_SIZE)}
        np.lib.format.write_array_header_2_0(self._images, header)
        self.written = 0
        self._labels, self._writers, self._generated = [], [], []

    def add(self, part: Dataset) -> None:
        if self.written + len(part) > self.n:
            raise ValueError(f"NpzStream: more than the {self.n} images announced")
        self._images.write(np.ascontiguousarray(part.images, np.uint8).tobytes())
        self._labels.append(part.labels.astype(np.int64))
        self._writers.append(part.writers.astype(str))
        flags = part.generated if part.generated is not None else np.zeros(len(part), bool)
        self._generated.append(flags.astype(bool))
        self.written += len(part)

    def close(self) -> None:
        if self.written != self.n:
            self.abort()
            raise ValueError(f"NpzStream: {self.written} images written of {self.n} announced")
        try:
            self._images.close()
            arrays = {
                "labels": np.concatenate(self._labels or [np.zeros(0, np.int64)]),
                "writers": np.concatenate(self._writers or [np.zeros(0, str)]),
                "generated": np.concatenate(self._generated or [np.zeros(0, bool)]),
            }
            if self.source is not None:
                arrays["source"] = np.asarray(json.dumps(self.source, sort_keys=True))
            for name, array in arrays.items():
                with self._zip.open(f"{name}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, array, allow_pickle=False)
            self._zip.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drop the half-written file."""
        for closing in (self._images.close, self._zip.close):
            with contextlib.suppress(Exception):  # already broken (a full disk): it goes anyway
                closing()
        self.tmp.unlink(missing_ok=True)


def label_name(label: int) -> str:
    return LABEL_CHARS[label] if 0 <= label < N_LEAF_CLASSES else str(label)


def allowed_labels(label_set: str) -> np.ndarray:
    if label_set == "digits":
        return np.arange(10)
    if label_set == "all":
        return np.arange(N_LEAF_CLASSES)
    raise DataError(f"unknown label set {label_set!r} (choose digits or all)")


# ---------------------------------------------------------------------------------------------
# Loading


def resolve_data_path(path: str | os.PathLike | None) -> Path:
    """--data if given, else $INKFILL_DATA, else an error that says how to get FEMNIST."""
    if path is None or str(path) == "":
        path = os.environ.get(DATA_ENV) or None
    if path is None:
        raise DataError(f"no data given: pass --data PATH or set {DATA_ENV}; {LEAF_HINT}")
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or directory; {LEAF_HINT}")
    return path


def load_dataset(path: str | os.PathLike | None = None, labels: str = "digits") -> Dataset:
    """Load FEMNIST from an npz, a LEAF json file or a directory of LEAF json shards.

    Keeps the labels of `labels` ("digits": 0-9, "all": the 62 LEAF classes) and checks shapes,
    dtypes and ranges, raising DataError with a one-line message on anything malformed.
    """
    path = resolve_data_path(path)
    keep = allowed_labels(labels)
    if path.is_dir():
        data = _load_leaf_dir(path)
    elif path.suffix.lower() == ".json":
        data = _merge_writers(_read_leaf_json(path))
    else:
        data = _load_npz(path)
    data = data.subset(np.isin(data.labels, keep))
    if len(data) == 0:
        raise DataError(f"{path}: no images with {labels} labels ({keep.min()}-{keep.max()})")
    return data


def _load_npz(path: Path) -> Dataset:
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: not a readable npz archive ({_reason(e)})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(
            f"{path}: a single .npy array, expected an npz with images, labels, writers"
        )
    with archive:
        missing = [k for k in ("images", "labels", "writers") if k not in archive.files]
        if missing:
            found = ", ".join(archive.files) or "nothing"
            raise DataError(f"{path}: missing array {', '.join(missing)} (found: {found})")
        try:
            images, labels, writers = (archive[k] for k in ("images", "labels", "writers"))
            generated = archive["generated"] if "generated" in archive.files else None
            source = str(archive["source"]) if "source" in archive.files else None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise DataError(f"{path}: truncated or corrupt npz ({_reason(e)})") from None
    n = len(images) if images.ndim else 0
    if images.dtype != np.uint8 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or images.ndim != 3:
        raise DataError(
            f"{path}: images must be uint8 (N, 28, 28) with 0 = background, 255 = ink; "
            f"got {images.dtype} {images.shape}"
        )
    if labels.shape != (n,) or writers.shape != (n,):
        raise DataError(
            f"{path}: mismatched lengths: images {images.shape}, labels {labels.shape}, "
            f"writers {writers.shape}"
        )
    if generated is not None and (generated.dtype != bool or generated.shape != (n,)):
        raise DataError(f"{path}: generated must be a bool array of one flag per image")
    try:
        source = json.loads(source) if source is not None else None
    except json.JSONDecodeError:
        raise DataError(f"{path}: source is not json") from None
    return Dataset(
        images, _check_labels(labels, path), _check_writers(writers, path), generated, source
    )


def _check_labels(labels: np.ndarray, where: Path) -> np.ndarray:
    if labels.dtype.kind == "f":
        if not np.isfinite(labels).all():
            raise DataError(f"{where}: labels contain non-finite values")
        if not np.array_equal(labels, np.round(labels)):
            raise DataError(f"{where}: labels must be whole numbers (LEAF class ids)")
    elif labels.dtype.kind not in "iub":
        raise DataError(f"{where}: labels must be integers, got {labels.dtype}")
    labels = labels.astype(np.int64)
    bad = (labels < 0) | (labels >= N_LEAF_CLASSES)
    if bad.any():
        raise DataError(
            f"{where}: label {labels[bad][0]} outside 0-{N_LEAF_CLASSES - 1} "
            f"(LEAF class ids: 0-9 digits, 10-35 A-Z, 36-61 a-z)"
        )
    return labels


def _check_writers(writers: np.ndarray, where: Path) -> np.ndarray:
    if writers.dtype.kind == "S":
        writers = np.char.decode(writers, "utf-8")
    if writers.dtype.kind not in "Uiu":
        raise DataError(f"{where}: writers must be strings (LEAF ids), got {writers.dtype}")
    writers = writers.astype(str)
    if (np.char.str_len(writers) == 0).any():
        raise DataError(f"{where}: empty writer id")
    return writers


def _reason(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def leaf_shards(directory: Path) -> list[Path]:
    """The json shards of a LEAF directory, in sorted order.

    LEAF's preprocessing leaves intermediate copies (all_data/, sampled_data/, rem_user_data/)
    beside the final train/ and test/ split; where the split exists only it is read, so that no
    image is counted twice.
    """
    files = sorted(p for p in directory.rglob("*.json") if p.is_file())
    split = [p for p in files if {"train", "test"} & set(p.relative_to(directory).parts[:-1])]
    return split or files


def _load_leaf_dir(directory: Path) -> Dataset:
    shards = leaf_shards(directory)
    if not shards:
        raise DataError(f"{directory}: no LEAF .json shards in this directory; {LEAF_HINT}")
    return _merge_writers(part for shard in shards for part in _read_leaf_json(shard))


def _merge_writers(parts: Iterable[Dataset]) -> Dataset:
    """One writer's samples from several shards (LEAF's train and test) end up side by side."""
    data = Dataset.concat(list(parts))
    order = np.argsort(data.writers, kind="stable")
    return data.subset(order)


def _read_leaf_json(path: Path) -> list[Dataset]:
    try:
        with open(path, encoding="utf-8") as f:
            blob = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not readable LEAF json ({_reason(e)})") from None
    if not isinstance(blob, dict) or not isinstance(blob.get("user_data"), dict):
        raise DataError(f"{path}: not a LEAF shard (expected keys users, num_samples, user_data)")
    user_data = blob["user_data"]
    users = blob.get("users", list(user_data))
    source = blob.get("inkfill") if isinstance(blob.get("inkfill"), dict) else None
    parts = []
    for user in users:
        record = user_data.get(user)
        if not isinstance(record, dict) or "x" not in record or "y" not in record:
            raise DataError(f"{path}: user {user}: missing x or y in user_data")
        part = _leaf_user(record["x"], record["y"], str(user), path)
        if "generated" in record:
            flags = np.asarray(record["generated"])
            if flags.dtype != bool or flags.shape != (len(part),):
                raise DataError(f"{path}: user {user}: generated must be one true/false per image")
            part = Dataset(part.images, part.labels, part.writers, flags, source)
        parts.append(part)
    if not parts:
        raise DataError(f"{path}: LEAF shard with no users")
    return parts


# LEAF pixels as text: 1.0 background, 0.0 full ink, 6 decimals (fixed width, so a whole image
# is one lookup); reading back rounds (1 - x) * 255 to the same uint8.
_LEAF_PIXELS = np.array([list(f"{1 - v / 255:.6f},".encode()) for v in range(256)], np.uint8)
LEAF_SHARD_WRITERS = 100  # writers per shard of a LEAF directory written by inkfill


def _leaf_x(images: np.ndarray) -> bytes:
    """uint8 (n, 28, 28) -> the text of LEAF's x: [[784 floats], ...]."""
    n = len(images)
    text = _LEAF_PIXELS[images.reshape(n, -1)].reshape(n, -1)
    text[:, -1] = ord("]")
    rows = np.empty((n, text.shape[1] + 2), np.uint8)
    rows[:, 0], rows[:, 1:-1], rows[:, -1] = ord("["), text, ord(",")
    return b"[" + rows.tobytes()[:-1] + b"]"


def _write_leaf_shard(data: Dataset, path: Path) -> None:
    """One LEAF json file (users, num_samples, user_data{x, y[, generated]}), atomically."""
    writers, first, inverse = np.unique(data.writers, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # users in order of appearance
    tmp = atomic_path(path)
    try:
        with open(tmp, "wb") as f:
            users = [str(writers[k]) for k in order]
            members = [np.flatnonzero(inverse == k) for k in order]
            f.write(b'{"users": ' + json.dumps(users).encode())
            f.write(b', "num_samples": ' + json.dumps([len(m) for m in members]).encode())
            if data.source is not None:
                f.write(b', "inkfill": ' + json.dumps(data.source, sort_keys=True).encode())
            f.write(b', "user_data": {')
            for k, (user, idx) in enumerate(zip(users, members)):
                f.write((", " if k else "").encode() + json.dumps(user).encode() + b': {"x": ')
                f.write(_leaf_x(data.images[idx]))
                f.write(b', "y": ' + json.dumps(data.labels[idx].tolist()).encode())
                if data.generated is not None:
                    f.write(b', "generated": ' + json.dumps(data.generated[idx].tolist()).encode())
                f.write(b"}")
            f.write(b"}}")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_leaf(data: Dataset, path: str | os.PathLike) -> None:
    """Write `data` as LEAF writes FEMNIST: one json file (PATH.json), or a directory of shards
    of 100 writers each (PATH/, which must not exist yet; made whole under a temporary name)."""
    path_s = str(path)
    if not path_s.endswith(("/", os.sep)):
        return _write_leaf_shard(data, Path(path_s))
    out = Path(path_s)
    if out.exists():
        raise DataError(f"{out}: already exists; a LEAF directory is written only as a new one")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; a plain mkdir would not
        writers = np.unique(data.writers)
        for k, start in enumerate(range(0, len(writers), LEAF_SHARD_WRITERS)):
            mine = np.isin(data.writers, writers[start : start + LEAF_SHARD_WRITERS])
            _write_leaf_shard(data.subset(np.flatnonzero(mine)), tmp / f"all_data_{k}.json")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _leaf_user(x, y, user: str, path: Path) -> Dataset:
    try:
        pixels = np.asarray(x, dtype=np.float32)
        labels = np.asarray(y)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: user {user}: malformed x or y ({_reason(e)})") from None
    if pixels.ndim != 2 or pixels.shape[1] != IMAGE_SIZE * IMAGE_SIZE:
        raise DataError(
            f"{path}: user {user}: each image must be 784 floats (28x28), got shape {pixels.shape}"
        )
    if labels.shape != (len(pixels),):
        raise DataError(f"{path}: user {user}: {len(pixels)} images but {labels.size} labels")
    if not np.isfinite(pixels).all():
        raise DataError(f"{path}: user {user}: images contain non-finite values")
    if pixels.min() < -1e-3 or pixels.max() > 1 + 1e-3:
        raise DataError(f"{path}: user {user}: pixel values outside [0, 1]")
    # LEAF: 1.0 is background, 0.0 full ink; ours: 0 background, 255 ink.
    images = np.rint((1.0 - pixels.clip(0, 1)) * 255).astype(np.uint8)
    images = images.reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
    labels = _check_labels(labels, path)
    return Dataset(images, labels, np.full(len(labels), user))


# ---------------------------------------------------------------------------------------------
# Model tensors


def to_model(images: np.ndarray | torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 (N, 28, 28), ink high -> float (N, 1, 28, 28) in [-1, 1]."""
    images = torch.as_tensor(np.asarray(images), device=device)
    return images.float().div(127.5).sub(1.0).unsqueeze(1)


class ModelImages:
    """uint8 images (N, 28, 28) kept as they are, a quarter of float32's memory, and handed out
    as model inputs: `view[idx]` equals `to_model(images[idx])` ((..., 1, 28, 28) in [-1, 1])
    for any index a tensor takes (ints, slices, index tensors of any shape)."""

    def __init__(self, images: np.ndarray | torch.Tensor, device: str | torch.device = "cpu"):
        self.uint8 = torch.as_tensor(np.asarray(images), device=device)
        self.device = self.uint8.device

    def __len__(self) -> int:
        return len(self.uint8)

    def __getitem__(self, index) -> torch.Tensor:
        return self.uint8[index].float().div(127.5).sub(1.0).unsqueeze(-3)


def to_images(x: torch.Tensor) -> np.ndarray:
    """float (N, 1, 28, 28) in [-1, 1] -> uint8 (N, 28, 28)."""
    x = x.detach().float().squeeze(1).add(1.0).mul(127.5).round().clamp(0, 255)
    return x.to(torch.uint8).cpu().numpy()


# ---------------------------------------------------------------------------------------------
# The writers x labels matrix

Cell = tuple[str, int]


class WriterMatrix:
    """A Dataset seen as a writers x labels matrix whose entries are sets of images.

    Rows are the sorted writer ids, columns the sorted labels (those present, or `label_ids`).
    `counts[r, c]` is the number of images in a cell; `observed` says which cells hold any.
    """

    def __init__(self, data: Dataset, label_ids: Sequence[int] | None = None):
        self.data = data
        self.writer_ids = np.unique(data.writers)
        self.label_ids = np.unique(data.labels if label_ids is None else np.asarray(label_ids))
        if not np.isin(data.labels, self.label_ids).all():
            raise DataError("dataset has labels outside the matrix's label_ids")
        self.rows = np.searchsorted(self.writer_ids, data.writers)  # (N,) row of each image
        self.cols = np.searchsorted(self.label_ids, data.labels)  # (N,) column of each image
        flat = self.rows * self.n_labels + self.cols
        self._order = np.argsort(flat, kind="stable")
        counts = np.bincount(flat, minlength=self.n_writers * self.n_labels)
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        self.counts = counts.reshape(self.n_writers, self.n_labels)
        self._row_of = {w: i for i, w in enumerate(self.writer_ids.tolist())}

    @property
    def n_writers(self) -> int:
        return len(self.writer_ids)

    @property
    def n_labels(self) -> int:
        return len(self.label_ids)

    @property
    def observed(self) -> np.ndarray:
        return self.counts > 0

    def row(self, writer: str) -> int:
        try:
            return self._row_of[str(writer)]
        except KeyError:
            raise DataError(f"unknown writer {writer!r}") from None

    def col(self, label: int) -> int:
        c = int(np.searchsorted(self.label_ids, label))
        if c >= self.n_labels or self.label_ids[c] != label:
            known = ", ".join(str(v) for v in self.label_ids)
            raise DataError(f"label {label!r} not in the data (labels: {known})")
        return c

    def indices(self, writer: str, label: int) -> np.ndarray:
        """Indices into `data` of the images in cell (writer, label); empty if the cell is."""
        flat = self.row(writer) * self.n_labels + self.col(label)
        return self._order[self._starts[flat] : self._starts[flat + 1]]

    def images(self, writer: str, label: int) -> np.ndarray:
        return self.data.images[self.indices(writer, label)]

    def cells(self, observed: bool) -> list[Cell]:
        """Observed (True) or empty (False) cells, row-major."""
        rows, cols = np.nonzero(self.observed == observed)
        return [(str(self.writer_ids[r]), int(self.label_ids[c])) for r, c in zip(rows, cols)]

    def empty_cells(self) -> list[Cell]:
        return self.cells(observed=False)

    def cell_table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Observed cells as arrays, for vectorised sampling.

        Returns rows (n_cells,), cols (n_cells,) and members (n_cells, max_count) holding the
        image indices of each cell, padded with -1.
        """
        flat = np.flatnonzero(self.counts.ravel())
        rows, cols = np.divmod(flat, self.n_labels)
        members = np.full((len(flat), int(self.counts.max(initial=0))), -1, dtype=np.int64)
        for k, f in enumerate(flat):
            idx = self._order[self._starts[f] : self._starts[f + 1]]
            members[k, : len(idx)] = idx
        return rows, cols, members

    def summary(self) -> dict:
        per_cell = self.counts[self.observed]
        return {
            "writers": self.n_writers,
            "images": len(self.data),
            "labels": self.n_labels,
            "cells": self.counts.size,
            "observed_cells": int(self.observed.sum()),
            "empty_cells": int((~self.observed).sum()),
            "complete_writers": int(self.observed.all(axis=1).sum()),
            "images_per_cell": {
                "min": int(per_cell.min()),
                "median": float(np.median(per_cell)),
                "max": int(per_cell.max()),
            },
        }

    def without(self, index: np.ndarray) -> WriterMatrix:
        """The matrix with the images at `index` removed, keeping the same label columns."""
        keep = np.ones(len(self.data), dtype=bool)
        keep[index] = False
        return WriterMatrix(self.data.subset(keep), label_ids=self.label_ids)

    def holdout(
        self,
        n_cells: int,
        seed: int = 0,
        min_images: int = 4,
        min_other_cells: int = 5,
        max_per_writer: int = 1,
    ) -> tuple[WriterMatrix, list[HiddenCell]]:
        """Hide `n_cells` whole observed cells; return the reduced matrix and the hidden cells.

        Candidates hold at least `min_images` images and belong to writers that keep at least
        `min_other_cells` other observed cells; at most `max_per_writer` cells are taken per
        writer. The choice depends only on the matrix and `seed`.
        """
        obs = self.observed
        eligible = obs & (self.counts >= min_images)
        # A writer may lose up to max_per_writer cells and must still keep min_other_cells.
        eligible &= (obs.sum(axis=1) >= min_other_cells + max_per_writer)[:, None]
        rows, cols = np.nonzero(eligible)
        rng = np.random.default_rng(seed)
        taken: list[tuple[int, int]] = []
        per_writer = np.zeros(self.n_writers, dtype=int)
        for k in rng.permutation(len(rows)):
            r, c = int(rows[k]), int(cols[k])
            if per_writer[r] < max_per_writer:
                taken.append((r, c))
                per_writer[r] += 1
                if len(taken) == n_cells:
                    break
        if len(taken) < n_cells:
            raise DataError(
                f"cannot hide {n_cells} cells: only {len(taken)} cells have >= {min_images} images "
                f"from writers keeping >= {min_other_cells} other cells"
            )
        taken.sort()
        hidden = []
        for r, c in taken:
            writer, label = str(self.writer_ids[r]), int(self.label_ids[c])
            hidden.append(HiddenCell(writer, label, self.images(writer, label)))
        gone = np.concatenate([self.indices(h.writer, h.label) for h in hidden])
        return self.without(gone), hidden

    def leave_out_writers(
        self, n_writers: int, shots: int, seed: int = 0, min_images: int = 4
    ) -> tuple[WriterMatrix, list[HiddenCell]]:
        """Remove `n_writers` whole writers; for each, hide one cell and give `shots` reference
        images of their other labels. Returns the matrix without those writers, and one
        HiddenCell per writer with `reference` images and `reference_labels` filled in.

        Candidates have a cell of >= `min_images` images and >= `shots` images of other labels.
        The choice depends only on the matrix and `seed`.
        """
        if n_writers < 1 or shots < 1:
            raise DataError("new writers and shots must be at least 1")
        rng = np.random.default_rng(seed)
        eligible = []
        for r in range(self.n_writers):
            cols = np.flatnonzero(self.counts[r] >= min_images)
            others = [c for c in cols if self.counts[r].sum() - self.counts[r, c] >= shots]
            if others:
                eligible.append((r, others))
        if len(eligible) < n_writers:
            raise DataError(
                f"cannot leave out {n_writers} writers: only {len(eligible)} have a cell of "
                f">= {min_images} images and >= {shots} images of other labels"
            )
        picked = sorted(rng.permutation(len(eligible))[:n_writers])
        cells, gone = [], []
        for k in picked:
            r, cols = eligible[k]
            c = int(rng.choice(cols))
            writer, label = str(self.writer_ids[r]), int(self.label_ids[c])
            mine = np.flatnonzero(self.rows == r)
            others = mine[self.cols[mine] != c]
            ref = np.sort(rng.choice(others, size=shots, replace=False))
            cells.append(
                HiddenCell(
                    writer,
                    label,
                    self.images(writer, label),
                    reference=self.data.images[ref],
                    reference_labels=self.data.labels[ref],
                )
            )
            gone.append(mine)
        return self.without(np.concatenate(gone)), cells


@dataclass(frozen=True, eq=False)
class HiddenCell:
    writer: str
    label: int
    images: np.ndarray  # uint8 (n, 28, 28), the real images that were hidden
    # For a writer left out of training: the few images of other labels a method may read.
    reference: np.ndarray | None = None
    reference_labels: np.ndarray | None = None
