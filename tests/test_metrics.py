import numpy as np
import pytest

from inkfill import metrics


def _spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T + d * np.eye(d)


def _frechet_by_sqrtm(mu1, s1, mu2, s2):
    """Independent route: the general matrix square root of S1 S2 (SciPy)."""
    from scipy import linalg

    covmean = np.real(linalg.sqrtm(s1 @ s2))
    return ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    d1, d2 = rng.uniform(0.5, 2, 6), rng.uniform(0.5, 2, 6)
    diag = ((mu1 - mu2) ** 2).sum() + (d1 + d2 - 2 * np.sqrt(d1 * d2)).sum()
    assert metrics.frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(
        diag, rel=1e-9
    )
    s1, s2 = _spd(rng, 6), _spd(rng, 6)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(
        _frechet_by_sqrtm(mu1, s1, mu2, s2), rel=1e-7
    )
    assert metrics.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-6)


def test_fid_of_samples_matches_their_statistics_and_grows_with_shift():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(4000, 5))
    b = rng.normal(size=(4000, 5)) + 1.0
    fid = metrics.fid(a, b)
    assert fid == pytest.approx(5.0, rel=0.1)  # mean shift of 1 in each of 5 dimensions
    assert metrics.fid(a, a) == pytest.approx(0, abs=1e-6)


def test_fid_with_singular_covariances_is_finite():
    # Fewer samples than dimensions (a few images per cell): both covariances are singular.
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(12, 40)), rng.normal(size=(12, 40)) + 0.5
    assert np.isfinite(metrics.fid(a, b)) and metrics.fid(a, b) > 0
    scale = np.trace(np.cov(a, rowvar=False))  # ~40: rounding is relative to the traces
    assert metrics.fid(a, a) == pytest.approx(0, abs=1e-7 * scale)


def test_inception_score_limits():
    uniform = np.full((100, 10), 0.1)
    assert metrics.inception_score(uniform) == pytest.approx(1.0)
    confident = np.eye(10)[np.arange(100) % 10]
    assert metrics.inception_score(confident) == pytest.approx(10.0, rel=1e-6)
    one_class = np.eye(10)[np.zeros(100, dtype=int)]
    assert metrics.inception_score(one_class) == pytest.approx(1.0, rel=1e-6)


def test_retrieval_rank_and_summary():
    candidates = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    assert metrics.retrieval_rank(np.array([1.0, 0.1]), candidates, 0) == 1
    assert metrics.retrieval_rank(np.array([0.0, 1.0]), candidates, 0) == 3
    # A tie counts against the true candidate.
    assert metrics.retrieval_rank(np.array([1.0, 0.0]), np.array([[1.0, 0.0], [2.0, 0.0]]), 0) == 2
    s = metrics.summarise_ranks([1, 2, 4, 10], [10, 10, 10, 10])
    assert s["top1"] == 0.25 and s["top5"] == 0.75 and s["median_rank"] == 3
    assert s["mrr"] == pytest.approx((1 + 0.5 + 0.25 + 0.1) / 4)
    assert s["chance_mrr"] == pytest.approx(np.mean(1 / np.arange(1, 11)))


def test_nearest_distances_and_copy_rate():
    rng = np.random.default_rng(2)
    bank = rng.integers(0, 256, (50, 28, 28), dtype=np.uint8)
    queries = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    q = queries.reshape(7, -1) / 255.0
    b = bank.reshape(50, -1) / 255.0
    brute = np.sqrt(((q[:, None] - b[None]) ** 2).sum(-1)).min(1)
    np.testing.assert_allclose(metrics.nearest_distances(queries, bank, chunk=3), brute, rtol=1e-6)
    assert metrics.nearest_distances(bank[:5], bank).max() < 1e-5
    real_nn = rng.uniform(1, 2, 1000)
    assert metrics.copy_rate(real_nn, real_nn) == pytest.approx(0.05, abs=0.002)
    assert metrics.copy_rate(np.zeros(10), real_nn) == 1.0
    assert metrics.copy_rate(np.full(10, 3.0), real_nn) == 0.0


def test_diversity_and_share():
    same = np.zeros((5, 28, 28), dtype=np.uint8)
    assert metrics.mean_pairwise_distance(same) == 0.0
    two = np.zeros((2, 28, 28), dtype=np.uint8)
    two[1, 0, :4] = 255  # four pixels apart by 1.0 each: distance 2
    assert metrics.mean_pairwise_distance(two) == pytest.approx(2.0)
    assert np.isnan(metrics.mean_pairwise_distance(two[:1]))
    assert metrics.share_in(np.array([1, 1, 2, 1]), 1) == 0.75
