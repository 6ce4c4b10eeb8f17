"""Figures: image grids (the seed's real vs fake panels), loss curves, the writers x labels matrix.

Uses matplotlib's object API (no pyplot state), so figures can be drawn from any thread.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from .data import Cell, WriterMatrix, atomic_path, label_name

REAL_INK = np.array([20, 20, 20], dtype=np.float32)
FILL_INK = np.array([25, 80, 200], dtype=np.float32)
FILL_FRAME = np.array([240, 140, 20], dtype=np.uint8)
PAPER = np.array([255, 255, 255], dtype=np.float32)
EMPTY = np.array([228, 228, 228], dtype=np.uint8)


def ink_on_paper(images: np.ndarray, ink: np.ndarray = REAL_INK) -> np.ndarray:
    """uint8 (..., 28, 28) ink-high -> uint8 RGB (..., 28, 28, 3), dark ink on white paper."""
    alpha = images.astype(np.float32)[..., None] / 255.0
    return (PAPER * (1 - alpha) + ink * alpha).round().astype(np.uint8)


def tile(images: np.ndarray, n_cols: int, pad: int = 1, fill: int = 255) -> np.ndarray:
    """(N, H, W[, 3]) -> one (rows*(H+pad)+pad, n_cols*(W+pad)+pad[, 3]) mosaic, row-major."""
    n, h, w = images.shape[:3]
    n_rows = max(1, -(-n // n_cols))
    shape = (n_rows * (h + pad) + pad, n_cols * (w + pad) + pad) + images.shape[3:]
    out = np.full(shape, fill, dtype=images.dtype)
    for k in range(n):
        r, c = divmod(k, n_cols)
        out[
            pad + r * (h + pad) : pad + r * (h + pad) + h,
            pad + c * (w + pad) : pad + c * (w + pad) + w,
        ] = images[k]
    return out


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> None:
    """Save atomically (temporary file, then rename), so a figure is never half-written."""
    path = Path(path)
    tmp = atomic_path(path)
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_matrix_figure(
    matrix: WriterMatrix,
    writers: Sequence[str],
    path: str | os.PathLike,
    filled: Mapping[Cell, np.ndarray] | None = None,
    title: str | None = None,
) -> None:
    """One row per writer, one column per label: a real image where the cell is observed, a
    generated one (blue ink, orange frame) where `filled` has the cell, grey where empty.
    """
    filled = filled or {}
    pad = 2
    size = 28 + 2 * pad
    canvas = np.full((len(writers) * size, matrix.n_labels * size, 3), 255, dtype=np.uint8)
    for r, writer in enumerate(writers):
        for c, label in enumerate(matrix.label_ids.tolist()):
            y, x = r * size, c * size
            real = matrix.images(writer, label)
            if len(real):
                tile_rgb = ink_on_paper(real[0])
            elif (writer, label) in filled and len(filled[(writer, label)]):
                canvas[y : y + size, x : x + size] = FILL_FRAME
                tile_rgb = ink_on_paper(filled[(writer, label)][0], ink=FILL_INK)
            else:
                tile_rgb = np.broadcast_to(EMPTY, (28, 28, 3))
            canvas[y + pad : y + pad + 28, x + pad : x + pad + 28] = tile_rgb
    scale = 0.32
    fig = Figure(
        figsize=(max(4.0, matrix.n_labels * scale + 1.5), max(2.0, len(writers) * scale + 0.8))
    )
    ax = fig.add_subplot()
    ax.imshow(canvas, interpolation="nearest")
    ax.set_xticks(np.arange(matrix.n_labels) * size + size / 2 - 0.5)
    ax.set_xticklabels([label_name(v) for v in matrix.label_ids.tolist()], fontsize=7)
    ax.set_yticks(np.arange(len(writers)) * size + size / 2 - 0.5)
    ax.set_yticklabels(list(writers), fontsize=6)
    ax.tick_params(length=0)
    ax.xaxis.tick_top()
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        ax.set_title(title, fontsize=9, pad=14)
    save_figure(fig, path, dpi=150)
