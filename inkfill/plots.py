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


def save_real_fake(
    real: np.ndarray, fake: np.ndarray, path: str | os.PathLike, title: str = "", n_cols: int = 8
) -> None:
    """Two n_cols x n_cols panels, real beside generated images (the seed's Figures 9, 13-16)."""
    fig = Figure(figsize=(8, 4.3))
    for k, (images, name) in enumerate(((real, "Real images"), (fake, "Fake images"))):
        ax = fig.add_subplot(1, 2, k + 1)
        grid = tile(ink_on_paper(images[: n_cols * n_cols]), n_cols, pad=2)
        ax.imshow(grid, interpolation="nearest")
        ax.set_title(f"{name} ({min(len(images), n_cols * n_cols)} of {len(images)})", fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


def save_loss_curves(
    histories: Mapping[str, Mapping[str, list]], path: str | os.PathLike, title: str = ""
) -> None:
    """Generator and discriminator losses by step, one panel per model (seed Figs 10, 17-20)."""
    names = list(histories)
    n_cols = min(4, len(names))
    n_rows = -(-len(names) // n_cols)
    fig = Figure(figsize=(3.2 * n_cols, 2.4 * n_rows), layout="constrained")
    for k, name in enumerate(names):
        h = histories[name]
        ax = fig.add_subplot(n_rows, n_cols, k + 1)
        ax.plot(h["step"], h["loss_g"], label="G", color="tab:blue", lw=1)
        ax.plot(h["step"], h["loss_d"], label="D", color="tab:orange", lw=1)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        ax.tick_params(labelsize=7)
        if k == 0:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


def save_tradeoff(
    rows: Sequence[Mapping], path: str | os.PathLike, seed_shares: Mapping[int, float] | None = None
) -> None:
    """Cluster share and diversity ratio against sampling truncation, one line per label, with the
    real-image share marked and the seed's reported shares (digit 0 >= 80%, digit 2 >= 85%)."""
    labels = sorted({r["label"] for r in rows})
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    cmap = [f"C{i % 10}" for i in range(len(labels))]
    for color, label in zip(cmap, labels):
        mine = sorted((r for r in rows if r["label"] == label), key=lambda r: r["truncation"])
        psi = [r["truncation"] for r in mine]
        ax1.plot(
            psi,
            [r["generated_share"] for r in mine],
            "o-",
            color=color,
            ms=3,
            lw=1,
            label=label_name(label),
        )
        ax1.axhline(mine[0]["real_share"], color=color, lw=0.6, ls=":")
        ax2.plot(psi, [r["diversity_ratio"] for r in mine], "o-", color=color, ms=3, lw=1)
    for label, share in (seed_shares or {}).items():
        if label in labels:
            ax1.axhline(share, color="k", lw=0.8, ls="--")
            ax1.text(
                min(r["truncation"] for r in rows),
                share,
                f" seed: digit {label} >= {share:.0%}",
                fontsize=7,
                va="bottom",
            )
    ax2.axhspan(0.8, 1.2, color="tab:green", alpha=0.1, label="within 20% of real")
    ax1.set(
        xlabel="truncation (z scale)",
        ylabel="share in intended cluster",
        title="cluster check (dotted: real images)",
    )
    ax2.set(xlabel="truncation (z scale)", ylabel="diversity / real diversity", title="diversity")
    ax1.legend(fontsize=7, ncol=2, title="label", title_fontsize=7)
    ax2.legend(fontsize=7)
    save_figure(fig, path)


def save_hidden_cells(
    hidden, fills: Mapping[str, Sequence[np.ndarray]], path: str | os.PathLike, n_show: int = 8
) -> None:
    """One row per hidden cell: its real images, then each method's fill (n_show images each)."""
    columns = ["real (hidden)", *fills]
    strip_w = n_show * 29 + 1
    gap = 10
    rows = []
    for k, cell in enumerate(hidden):
        groups = [cell.images[:n_show]] + [fills[name][k][:n_show] for name in fills]
        strips = []
        for g in groups:
            strip = tile(ink_on_paper(g), n_show, pad=1)
            canvas = np.full((30, strip_w, 3), 255, dtype=np.uint8)
            canvas[: strip.shape[0], : strip.shape[1]] = strip
            strips.append(canvas)
            strips.append(np.full((30, gap, 3), 255, dtype=np.uint8))
        rows.append(np.concatenate(strips[:-1], axis=1))
    grid = np.concatenate(rows, axis=0)
    fig = Figure(figsize=(grid.shape[1] / 55, grid.shape[0] / 55 + 0.6))
    ax = fig.add_subplot()
    ax.imshow(grid, interpolation="nearest")
    ax.set_xticks([i * (strip_w + gap) + strip_w / 2 for i in range(len(columns))])
    ax.set_xticklabels(columns, fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks([k * 30 + 15 for k in range(len(hidden))])
    ax.set_yticklabels([f"{c.writer} / {label_name(c.label)}" for c in hidden], fontsize=7)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    save_figure(fig, path, dpi=130)


def save_bar_chart(
    values: Mapping[str, float], path: str | os.PathLike, ceiling: float | None = None,
    chance: float | None = None, ylabel: str = "", ceiling_label: str = "real ceiling",
    chance_label: str = "chance",
) -> None:  # fmt: skip
    """One bar per method, with the real ceiling and chance (or other references) as lines."""
    fig = Figure(figsize=(1.1 * len(values) + 2, 3.2), layout="constrained")
    ax = fig.add_subplot()
    names = list(values)
    ax.bar(names, [values[n] for n in names], color="tab:blue")
    for i, n in enumerate(names):
        ax.text(i, values[n], f"{values[n]:.3f}", ha="center", va="bottom", fontsize=8)
    if ceiling is not None:
        ax.axhline(
            ceiling, color="tab:green", ls="--", lw=1, label=f"{ceiling_label} {ceiling:.3f}"
        )
    if chance is not None:
        ax.axhline(chance, color="grey", ls=":", lw=1, label=f"{chance_label} {chance:.3f}")
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", labelsize=8, rotation=20)
    ax.legend(fontsize=8)
    save_figure(fig, path)
