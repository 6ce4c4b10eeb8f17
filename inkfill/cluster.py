"""Per-label KMeans over writers and the seed's voting map (Fang, "Personalized Data Generation
using GAN", section 6.3, Figures 6-7): which cluster of label j should fill writer i's empty cell.

A writer is represented, for each label, by the mean of their images of it in a PCA space fitted
on all images of that label; single images (real or generated) are assigned to the nearest
centre in the same space, which is how the seed checks its generated images.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA

from .config import VOTE_RULES
from .data import DataError, WriterMatrix


def label_pca(x: np.ndarray, n_components: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """PCA of flattened images x (n, 784): mean (784,) and components (<= n_components, 784)."""
    k = max(1, min(n_components, len(x) - 1, x.shape[1]))
    if len(x) < 2:
        return x.mean(axis=0).astype(np.float32), np.zeros((1, x.shape[1]), dtype=np.float32)
    pca = PCA(n_components=k, random_state=seed).fit(x)
    return pca.mean_.astype(np.float32), pca.components_.astype(np.float32)


@dataclass(frozen=True, eq=False)
class LabelClusters:
    """The fitted clustering of one label: a PCA projection and KMeans centres."""

    mean: np.ndarray  # (784,)
    components: np.ndarray  # (n_components, 784)
    centers: np.ndarray  # (n_clusters, n_components)

    @property
    def n_clusters(self) -> int:
        return len(self.centers)

    def embed(self, images: np.ndarray) -> np.ndarray:
        """uint8 (n, 28, 28) -> (n, n_components)."""
        x = images.reshape(len(images), -1).astype(np.float32) / 255.0
        return (x - self.mean) @ self.components.T

    def predict(self, images: np.ndarray) -> np.ndarray:
        """The nearest centre of each single image, (n,)."""
        e = self.embed(images)
        d = ((e[:, None, :] - self.centers[None]) ** 2).sum(-1)
        return d.argmin(axis=1)


@dataclass(frozen=True)
class Vote:
    """The outcome of the voting map for one cell, with what it was based on."""

    cluster: int
    counts: np.ndarray  # (n_clusters,) related writers (or pairs) in each cluster of the label
    sizes: np.ndarray  # (n_clusters,) writers in each cluster of the label
    related_by_label: dict[int, int] = field(default_factory=dict)  # label d -> related writers
    fallback: bool = False


def vote(
    assign: np.ndarray, row: int, col: int, n_clusters: int, rule: str = "writers"
) -> tuple[int, np.ndarray, np.ndarray, dict[int, int], bool]:
    """The seed's voting map on an assignment matrix.

    assign: (n_writers, n_labels) cluster of each writer in each label, -1 where the cell is empty.
    For every other label d that writer `row` has, the writers sharing its cluster in d are
    related. rule="writers" (the seed) counts each related writer once in each cluster of label
    `col`; rule="pairs" counts them once per label they are related through. The cluster with the
    most votes wins; ties go to the cluster with more writers, then to the lowest index. With no
    votes at all (the writer has no other label, or no related writer has label `col`), the
    fallback is the cluster with the most writers.
    """
    if rule not in VOTE_RULES:
        raise ValueError(f"unknown vote rule {rule!r}; choose from {VOTE_RULES}")
    n_writers = assign.shape[0]
    related = np.zeros(n_writers, dtype=np.int64)
    related_by_label = {}
    for d in np.flatnonzero(assign[row] >= 0):
        if d == col:
            continue
        same = assign[:, d] == assign[row, d]
        same[row] = False
        related += same
        related_by_label[int(d)] = int(same.sum())
    has = assign[:, col] >= 0
    has[row] = False
    weights = related if rule == "pairs" else (related > 0).astype(np.int64)
    counts = np.bincount(assign[has, col], weights=weights[has], minlength=n_clusters).astype(
        np.int64
    )
    sizes = np.bincount(assign[assign[:, col] >= 0, col], minlength=n_clusters).astype(np.int64)
    fallback = counts.sum() == 0
    score = sizes if fallback else counts
    # Lexicographic: most votes, then most writers, then lowest index.
    order = np.lexsort((np.arange(n_clusters), -sizes, -score))
    return int(order[0]), counts, sizes, related_by_label, bool(fallback)


class WriterClustering:
    """KMeans over writers separately for each label (the seed's first "cluster" step)."""

    def __init__(
        self,
        n_clusters: int = 7,
        n_components: int = 32,
        vote_rule: str = "writers",
        random_state: int = 0,
    ):
        self.n_clusters = n_clusters
        self.n_components = n_components
        self.vote_rule = vote_rule
        self.random_state = random_state

    def fit(self, matrix: WriterMatrix) -> WriterClustering:
        if self.n_clusters < 1:
            raise DataError("n_clusters must be at least 1")
        self.writer_ids_ = matrix.writer_ids.copy()
        self.label_ids_ = matrix.label_ids.copy()
        self.assign_ = np.full((matrix.n_writers, matrix.n_labels), -1, dtype=np.int64)
        self.labels_: list[LabelClusters] = []
        for c in range(matrix.n_labels):
            self.labels_.append(self._fit_label(matrix, c))
        self._row_of = {w: i for i, w in enumerate(self.writer_ids_.tolist())}
        return self

    def _fit_label(self, matrix: WriterMatrix, c: int) -> LabelClusters:
        mask = matrix.cols == c
        images, rows = matrix.data.images[mask], matrix.rows[mask]
        x = images.reshape(len(images), -1).astype(np.float32) / 255.0
        mean, components = label_pca(x, self.n_components, self.random_state)
        embedded = (x - mean) @ components.T
        writers = np.unique(rows)
        # A writer's point: the mean of their images in PCA space (= PCA of their mean image).
        points = np.stack([embedded[rows == r].mean(axis=0) for r in writers])
        k = min(self.n_clusters, len(writers))
        km = KMeans(n_clusters=k, n_init=10, random_state=self.random_state).fit(points)
        self.assign_[writers, c] = km.labels_
        return LabelClusters(mean, components, km.cluster_centers_.astype(np.float32))

    # -- queries -------------------------------------------------------------------------------

    def _rc(self, writer: str, label: int) -> tuple[int, int]:
        if writer not in self._row_of:
            raise DataError(f"unknown writer {writer!r}")
        c = np.flatnonzero(self.label_ids_ == label)
        if len(c) == 0:
            raise DataError(f"label {label!r} not in the data")
        return self._row_of[writer], int(c[0])

    def for_label(self, label: int) -> LabelClusters:
        return self.labels_[self._rc(self.writer_ids_[0], label)[1]]

    def members(self, label: int, cluster: int) -> np.ndarray:
        """Writer ids in `cluster` of `label`."""
        c = self._rc(self.writer_ids_[0], label)[1]
        return self.writer_ids_[self.assign_[:, c] == cluster]

    def vote(self, writer: str, label: int) -> Vote:
        r, c = self._rc(writer, label)
        cluster, counts, sizes, related, fallback = vote(
            self.assign_, r, c, self.labels_[c].n_clusters, self.vote_rule
        )
        return Vote(cluster, counts, sizes, related, fallback)

    # -- state ---------------------------------------------------------------------------------

    def state(self) -> dict[str, np.ndarray]:
        """Arrays that, with get_params(), rebuild the fitted clustering (see from_state)."""
        out = {"assign": self.assign_}
        for c, lab in enumerate(self.labels_):
            out[f"pca_mean.{c}"] = lab.mean
            out[f"pca_components.{c}"] = lab.components
            out[f"centers.{c}"] = lab.centers
        return out

    def get_params(self) -> dict:
        return {
            "n_clusters": self.n_clusters,
            "n_components": self.n_components,
            "vote_rule": self.vote_rule,
            "random_state": self.random_state,
        }

    @classmethod
    def from_state(
        cls, params: dict, state: dict[str, np.ndarray], writer_ids, label_ids
    ) -> WriterClustering:
        self = cls(**params)
        self.writer_ids_ = np.asarray(writer_ids, dtype=str)
        self.label_ids_ = np.asarray(label_ids, dtype=np.int64)
        self.assign_ = np.asarray(state["assign"], dtype=np.int64)
        self.labels_ = [
            LabelClusters(
                state[f"pca_mean.{c}"], state[f"pca_components.{c}"], state[f"centers.{c}"]
            )
            for c in range(len(self.label_ids_))
        ]
        self._row_of = {w: i for i, w in enumerate(self.writer_ids_.tolist())}
        return self


def vote_accuracy(assign: np.ndarray, n_clusters: list[int], rule: str = "writers") -> dict:
    """How often the voting map recovers a writer's own cluster in a label they do have, voting
    from their other labels only (leave-one-label-out over every observed cell).

    Baselines: always the biggest cluster ("majority"), and a random cluster drawn with the
    clusters' sizes ("chance", the sum of squared size shares).
    """
    hits = majority = fallbacks = 0
    chance = []
    rows, cols = np.nonzero(assign >= 0)
    for r, c in zip(rows, cols):
        cluster, _, sizes, _, fallback = vote(assign, int(r), int(c), n_clusters[c], rule)
        hits += cluster == assign[r, c]
        majority += int(np.argmax(sizes)) == assign[r, c]
        fallbacks += fallback
        share = sizes / sizes.sum()
        chance.append((share**2).sum())
    n = len(rows)
    return {
        "cells": n,
        "accuracy": float(hits / n) if n else float("nan"),
        "majority_accuracy": float(majority / n) if n else float("nan"),
        "chance_accuracy": float(np.mean(chance)) if n else float("nan"),
        "fallbacks": int(fallbacks),
    }
