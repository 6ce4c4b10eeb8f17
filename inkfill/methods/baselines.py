"""Baselines any generator must beat, with the same fit/generate contract:

- generic: real images of label j from random other writers (the floor: no personalisation);
- retrieval: real images of j from the k writers most similar to i on the labels both have;
- linear: the seed's "linear matrix completion": low-rank completion (SoftImpute, Mazumder et al.
  2010) of the writers x labels matrix of per-cell mean images in a per-label PCA space, plus the
  within-cell variation of real images of j in that space; images are PCA reconstructions
  (render="pca"), or the real images of j nearest to the completed mean (render="nearest").
"""

from __future__ import annotations

import numpy as np
import torch

from ..cluster import label_pca
from ..config import GenericConfig, LinearConfig, RetrievalConfig
from ..data import WriterMatrix
from .base import Method, cell_seed


class _ImageBank(Method):
    """Shared state of the baselines that hand out (or build on) the training images."""

    def _fit(self, matrix: WriterMatrix, progress: bool) -> None:
        self.images_ = matrix.data.images
        self.rows_ = matrix.rows.astype(np.int64)  # writer row of each image
        self.cols_ = matrix.cols.astype(np.int64)  # label column of each image

    def _bank_state(self) -> dict[str, torch.Tensor]:
        return {
            "images": torch.from_numpy(np.ascontiguousarray(self.images_)),
            "rows": torch.from_numpy(self.rows_),
            "cols": torch.from_numpy(self.cols_),
        }

    def _set_bank(self, tensors: dict[str, torch.Tensor]) -> None:
        self.images_ = tensors["images"].numpy()
        self.rows_ = tensors["rows"].numpy()
        self.cols_ = tensors["cols"].numpy()

    def _pick(self, pool: np.ndarray, n: int, rng: torch.Generator) -> np.ndarray:
        """n of the image indices in `pool`: without repeats while they last, seeded by the cell."""
        order = torch.randperm(len(pool), generator=rng).numpy()
        return pool[order[np.arange(n) % len(pool)]]


class Generic(_ImageBank):
    name = "generic"
    Config = GenericConfig

    def _generate(self, writer, label, n, rng):
        row, col = self.matrix_.row(writer), self.matrix_.col(label)
        pool = np.flatnonzero((self.cols_ == col) & (self.rows_ != row))
        return self.images_[self._pick(pool, n, rng)]

    def _state(self):
        return self._bank_state(), {}

    def _set_state(self, tensors, config):
        self._set_bank(tensors)


def _cell_means(matrix: WriterMatrix, n_components: int, seed: int):
    """Per-label PCA and each observed cell's mean image in it.

    Returns means (n_writers, n_labels, p) with NaN for empty cells, and the PCA (mean,
    components) of each label.
    """
    p = n_components
    means = np.full((matrix.n_writers, matrix.n_labels, p), np.nan, dtype=np.float32)
    pcas = []
    for c in range(matrix.n_labels):
        mask = matrix.cols == c
        x = matrix.data.images[mask].reshape(int(mask.sum()), -1).astype(np.float32) / 255.0
        mean, components = label_pca(x, p, seed)
        e = (x - mean) @ components.T  # (n, <=p)
        rows = matrix.rows[mask]
        sums = np.zeros((matrix.n_writers, e.shape[1]), dtype=np.float64)
        np.add.at(sums, rows, e)
        counts = np.bincount(rows, minlength=matrix.n_writers)
        has = counts > 0
        means[has, c, : e.shape[1]] = sums[has] / counts[has, None]
        means[has, c, e.shape[1] :] = 0.0
        pad = np.zeros((p, x.shape[1]), dtype=np.float32)
        pad[: len(components)] = components
        pcas.append((mean, pad))
    return means, pcas


class Retrieval(_ImageBank):
    name = "retrieval"
    Config = RetrievalConfig

    def _fit(self, matrix, progress):
        super()._fit(matrix, progress)
        means, pcas = _cell_means(matrix, self.n_components, self.seed)
        # Distances are compared across labels: scale each label by its mean squared spread.
        self.scale_ = 1.0 / np.sqrt(
            np.nanmean(((means - np.nanmean(means, axis=0)) ** 2).sum(-1), axis=0)
        ).astype(np.float32)  # (n_labels,)
        self.means_ = means * self.scale_[None, :, None]
        self.pca_mean_ = np.stack([m for m, _ in pcas])  # (n_labels, 784)
        self.pca_components_ = np.stack([c for _, c in pcas])  # (n_labels, p, 784)

    def _nearest(self, query: np.ndarray, col: int, exclude: int = -1) -> np.ndarray:
        """Rows of the writers that have label `col`, nearest to `query` (n_labels, p; NaN where
        unknown) first, by mean squared distance on the labels both have (but `col`)."""
        observed = ~np.isnan(self.means_[:, :, 0])
        shared = observed & ~np.isnan(query[None, :, 0])
        shared[:, col] = False
        d2 = np.nan_to_num(((self.means_ - query[None]) ** 2).sum(-1), nan=0.0)
        n_shared = shared.sum(1)
        dist = np.where(shared, d2, 0.0).sum(1) / np.maximum(n_shared, 1)
        dist[n_shared == 0] = np.inf
        candidates = np.flatnonzero(observed[:, col] & (np.arange(len(dist)) != exclude))
        order = np.lexsort((candidates, dist[candidates]))
        return candidates[order]

    def neighbours(self, writer: str, label: int) -> np.ndarray:
        """Rows of the writers that have `label`, nearest first (mean distance on shared labels)."""
        row, col = self.matrix_.row(writer), self.matrix_.col(label)
        return self._nearest(self.means_[row], col, exclude=row)

    def _from_rows(self, nearest: np.ndarray, col: int, n: int, rng) -> np.ndarray:
        pool = np.flatnonzero((self.cols_ == col) & np.isin(self.rows_, nearest[: self.k]))
        return self.images_[self._pick(pool, n, rng)]

    def _generate(self, writer, label, n, rng):
        return self._from_rows(self.neighbours(writer, label), self.matrix_.col(label), n, rng)

    def generate_from_reference(self, images, labels, label, n, seed=0, name="new"):
        """Real images of `label` from the k training writers nearest to a new writer known only
        from `images` (any labels): the retrieval baseline for writers never seen in training."""
        self.check_fitted()
        col = self.matrix_.col(label)
        query = np.full(self.means_.shape[1:], np.nan, dtype=np.float32)
        x = images.reshape(len(images), -1).astype(np.float32) / 255.0
        cols = np.array([self.matrix_.col(int(v)) for v in labels])
        for c in np.unique(cols):
            e = (x[cols == c] - self.pca_mean_[c]) @ self.pca_components_[c].T
            query[c] = e.mean(0) * self.scale_[c]
        rng = torch.Generator().manual_seed(cell_seed(seed, name, label))
        return self._from_rows(self._nearest(query, col), col, n, rng)

    def _state(self):
        return {
            **self._bank_state(),
            "means": torch.from_numpy(self.means_),
            "scale": torch.from_numpy(self.scale_),
            "pca_mean": torch.from_numpy(self.pca_mean_),
            "pca_components": torch.from_numpy(self.pca_components_),
        }, {}

    def _set_state(self, tensors, config):
        self._set_bank(tensors)
        self.means_ = tensors["means"].numpy()
        self.scale_ = tensors["scale"].numpy()
        self.pca_mean_ = tensors["pca_mean"].numpy()
        self.pca_components_ = tensors["pca_components"].numpy()


def soft_impute(x: np.ndarray, observed: np.ndarray, shrink: float, rank: int, n_iter: int = 200):
    """Complete x (n, m) where `observed` is False: SoftImpute with singular values shrunk by
    `shrink` times the largest one and at most `rank` of them kept. Returns the completed matrix."""
    mu = np.where(observed, x, 0).sum(0) / np.maximum(observed.sum(0), 1)
    z = np.where(observed, x, mu[None])
    lam = None
    for _ in range(n_iter):
        u, s, vt = np.linalg.svd(z - mu, full_matrices=False)
        if lam is None:
            lam = shrink * s[0]
        s = np.maximum(s - lam, 0)[:rank]
        low = mu + (u[:, :rank] * s) @ vt[:rank]
        new = np.where(observed, x, low)
        if np.abs(new - z).max() < 1e-5:
            z = new
            break
        z = new
    return z


class Linear(_ImageBank):
    name = "linear"
    Config = LinearConfig

    def _fit(self, matrix, progress):
        super()._fit(matrix, progress)
        means, pcas = _cell_means(matrix, self.n_components, self.seed)
        n_w, n_l, p = means.shape
        flat = means.reshape(n_w, n_l * p).astype(np.float64)
        observed = ~np.isnan(flat)
        completed = soft_impute(np.nan_to_num(flat), observed, self.shrink, self.rank)
        self.completed_ = completed.reshape(n_w, n_l, p).astype(np.float32)
        self.pca_mean_ = np.stack([m for m, _ in pcas])  # (n_labels, 784)
        self.pca_components_ = np.stack([c for _, c in pcas])  # (n_labels, p, 784)
        # Each real image minus its own cell's mean, in its label's PCA space: the variation
        # within a cell, which a linear model adds to the completed mean.
        x = self.images_.reshape(len(self.images_), -1).astype(np.float32) / 255.0
        coords = np.einsum(
            "nd,npd->np", x - self.pca_mean_[self.cols_], self.pca_components_[self.cols_]
        )
        self.residuals_ = (coords - means[self.rows_, self.cols_]).astype(np.float32)

    def mean_image(self, writer: str, label: int) -> np.ndarray:
        """The completed cell's mean image, float (784,) in pixel units [0, 1]."""
        row, col = self.matrix_.row(writer), self.matrix_.col(label)
        return self.pca_mean_[col] + self.completed_[row, col] @ self.pca_components_[col]

    def _generate(self, writer, label, n, rng):
        row, col = self.matrix_.row(writer), self.matrix_.col(label)
        pool = np.flatnonzero((self.cols_ == col) & (self.rows_ != row))
        target = self.completed_[row, col]
        if self.render == "nearest":
            # Real images of j from other writers nearest to the completed mean (copies, but sharp).
            coords = self.residuals_[pool] + self._cell_mean_of(pool)
            dist = ((coords - target) ** 2).sum(1)
            closest = pool[np.argsort(dist, kind="stable")[: 2 * n]]
            return self.images_[self._pick(closest, n, rng)]
        coords = target[None] + self.residuals_[self._pick(pool, n, rng)]
        x = self.pca_mean_[col] + coords @ self.pca_components_[col]
        return (np.clip(x, 0, 1) * 255).round().astype(np.uint8).reshape(n, 28, 28)

    def _cell_mean_of(self, index: np.ndarray) -> np.ndarray:
        """The (observed, so completed = observed) cell mean of the images at `index`."""
        return self.completed_[self.rows_[index], self.cols_[index]]

    def _state(self):
        arrays = {
            "completed": self.completed_,
            "pca_mean": self.pca_mean_,
            "pca_components": self.pca_components_,
            "residuals": self.residuals_,
        }
        return {
            **self._bank_state(),
            **{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()},
        }, {}

    def _set_state(self, tensors, config):
        self._set_bank(tensors)
        self.completed_ = tensors["completed"].numpy()
        self.pca_mean_ = tensors["pca_mean"].numpy()
        self.pca_components_ = tensors["pca_components"].numpy()
        self.residuals_ = tensors["residuals"].numpy()
