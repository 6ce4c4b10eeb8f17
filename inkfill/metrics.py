"""Pure metric functions on images or features; nothing here imports training code.

Feature-space metrics receive features (or a feature extractor as a callable), as clean-fid does.
"""

from __future__ import annotations

import numpy as np


def _flat01(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


def mean_pairwise_distance(images: np.ndarray, max_images: int = 256, seed: int = 0) -> float:
    """Mean L2 distance between distinct pairs of images (pixels in [0, 1]).

    A diversity figure: a mode-collapsed generator scores near 0. With more than `max_images`
    images a seeded subset is used, so the cost stays quadratic in `max_images` only.
    """
    if len(images) > max_images:
        images = images[np.random.default_rng(seed).choice(len(images), max_images, replace=False)]
    return mean_pairwise_spread(_flat01(images))


def mean_pairwise_spread(x: np.ndarray) -> float:
    """Mean L2 distance between distinct pairs of the rows of x (N, d): the spread of a set of
    vectors (the bench's feature diversity, on the judge's embeddings of a cell's images)."""
    if len(x) < 2:
        return float("nan")
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    sq = (x * x).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0)
    iu = np.triu_indices(len(x), 1)
    return float(np.sqrt(d2[iu]).mean())


def share_in(assigned: np.ndarray, target: int) -> float:
    """The seed's cluster check: N_correct / N_all, the share of images assigned to `target`."""
    return float(np.mean(np.asarray(assigned) == target)) if len(assigned) else float("nan")


# ---------------------------------------------------------------------------------------------
# Feature-space metrics (features come from a callable the caller owns, e.g. bench's FeatureNet)


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (d,) and covariance (d, d) of features (n, d), in float64."""
    f = np.asarray(features, dtype=np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)): the Frechet distance of two Gaussians
    (Dowson & Landau 1982), i.e. FID when the statistics come from a feature network.

    Tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2),
    a symmetric positive semi-definite matrix with the same spectrum as S1 S2: two symmetric
    eigendecompositions, real throughout and defined for singular covariances, with no general
    matrix square root (scipy.linalg.sqrtm, whose `disp` argument goes away in SciPy 1.18)."""
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root @ s2 @ root)
    trace_covmean = np.sqrt(np.clip(inner, 0, None)).sum()
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * trace_covmean)


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    return frechet_distance(*gaussian_stats(features_a), *gaussian_stats(features_b))


def inception_score(probs: np.ndarray, eps: float = 1e-12) -> float:
    """exp(E_x KL(p(y|x) || p(y))) over all rows of probs (n, n_classes) (Salimans et al. 2016),
    computed in one split; with a label classifier in place of Inception."""
    p = np.asarray(probs, dtype=np.float64)
    marginal = p.mean(axis=0, keepdims=True)
    kl = (p * (np.log(p + eps) - np.log(marginal + eps))).sum(axis=1)
    return float(np.exp(kl.mean()))


def retrieval_rank(query: np.ndarray, candidates: np.ndarray, true_index: int) -> int:
    """1-based rank of candidates[true_index] by cosine similarity to query; ties count against
    the true candidate (rank = 1 + the number of candidates at least as similar)."""
    q = query / (np.linalg.norm(query) + 1e-12)
    c = candidates / (np.linalg.norm(candidates, axis=1, keepdims=True) + 1e-12)
    sims = c @ q
    others = np.delete(sims, true_index)
    return int(1 + (others >= sims[true_index]).sum())


def summarise_ranks(ranks, n_candidates) -> dict[str, float]:
    """Top-1, top-5, mean reciprocal rank, median rank, mean candidate count, and the MRR of
    picking at random among the candidates (chance)."""
    r = np.asarray(ranks, dtype=np.float64)
    n = np.asarray(n_candidates, dtype=np.float64)
    chance = np.mean([np.mean(1.0 / np.arange(1, k + 1)) for k in n.astype(int)])
    return {
        "top1": float(np.mean(r == 1)),
        "top5": float(np.mean(r <= 5)),
        "mrr": float(np.mean(1.0 / r)),
        "median_rank": float(np.median(r)),
        "candidates": float(n.mean()),
        "chance_mrr": float(chance),
    }


def nearest_distances(queries: np.ndarray, bank: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """For each query image, the pixel L2 distance (pixels in [0, 1]) to its nearest bank image."""
    q, b = _flat01(queries).astype(np.float64), _flat01(bank).astype(np.float64)
    bb = (b * b).sum(1)
    out = np.empty(len(q))
    for s in range(0, len(q), chunk):
        part = q[s : s + chunk]
        d2 = (part * part).sum(1)[:, None] + bb[None, :] - 2 * part @ b.T
        out[s : s + chunk] = np.sqrt(np.maximum(d2.min(axis=1), 0))
    return out


def copy_rate(generated_nn: np.ndarray, real_nn: np.ndarray, percentile: float = 5.0) -> float:
    """Share of generated images nearer to a training image than the `percentile`-th percentile
    of real held-out images' nearest-training distances (real images score `percentile`%)."""
    threshold = np.percentile(real_nn, percentile)
    return float(np.mean(np.asarray(generated_nn) < threshold))
