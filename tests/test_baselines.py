import numpy as np
import pytest
from conftest import make_dataset

from inkfill.data import WriterMatrix
from inkfill.methods import load_run
from inkfill.methods.baselines import Generic, Linear, Retrieval, soft_impute


@pytest.fixture(scope="module")
def matrix():
    return WriterMatrix(make_dataset(n_writers=16, seed=3))


def _source_rows(matrix, images, label):
    """Writer rows whose images of `label` include each generated image exactly."""
    col = matrix.col(label)
    pool = matrix.data.images[matrix.cols == col]
    rows = matrix.rows[matrix.cols == col]
    out = []
    for img in images:
        hit = np.flatnonzero((pool == img).all(axis=(1, 2)))
        assert len(hit), "not a training image"
        out.append(set(rows[hit].tolist()))
    return out


@pytest.mark.parametrize(
    "cls, params", [(Generic, {}), (Retrieval, {}), (Linear, {}), (Linear, {"render": "pca"})]
)
def test_contract(cls, params, matrix, tmp_path):
    m = cls(**params).fit(matrix)
    writer, label = matrix.empty_cells()[0]
    a = m.generate(writer, label, 6, seed=1)
    assert a.shape == (6, 28, 28) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, m.generate(writer, label, 6, seed=1))
    m.save(tmp_path / "run")
    np.testing.assert_array_equal(load_run(tmp_path / "run").generate(writer, label, 6, seed=1), a)


def test_generic_draws_real_images_of_the_label_from_other_writers(matrix):
    m = Generic().fit(matrix)
    writer, label = matrix.empty_cells()[0]
    images = m.generate(writer, label, 10, seed=0)
    for rows in _source_rows(matrix, images, label):
        assert matrix.row(writer) not in rows
    assert len({im.tobytes() for im in images}) == 10  # no repeats while the pool lasts


def test_retrieval_uses_the_k_nearest_writers(matrix):
    m = Retrieval(k=2).fit(matrix)
    writer, label = matrix.empty_cells()[0]
    row, col = matrix.row(writer), matrix.col(label)
    order = m.neighbours(writer, label)
    assert row not in order and all(matrix.observed[r, col] for r in order)
    # Brute force: mean scaled distance over the labels both writers have.
    means = m.means_
    dists = []
    for r in order:
        shared = [
            d
            for d in range(matrix.n_labels)
            if d != col and matrix.observed[r, d] and matrix.observed[row, d]
        ]
        dists.append(
            np.mean([((means[r, d] - means[row, d]) ** 2).sum() for d in shared])
            if shared
            else np.inf
        )
    assert dists == sorted(dists)
    images = m.generate(writer, label, 8, seed=0)
    for rows in _source_rows(matrix, images, label):
        assert rows & set(order[:2].tolist())


def test_soft_impute_recovers_a_low_rank_matrix():
    rng = np.random.default_rng(0)
    # Rank 3, plus one for the column means soft_impute removes first.
    truth = rng.normal(size=(60, 3)) @ rng.normal(size=(3, 20))
    observed = rng.random(truth.shape) > 0.3
    completed = soft_impute(
        np.where(observed, truth, 0.0), observed, shrink=0.0, rank=4, n_iter=500
    )
    np.testing.assert_allclose(completed[observed], truth[observed])
    err = np.abs(completed - truth)[~observed].mean() / np.abs(truth).mean()
    assert err < 0.05


def test_linear_mean_image_is_closer_to_the_writer_than_the_label_mean(matrix):
    """Held-out check on synthetic data whose writers differ by a shift and a stroke width: the
    completed mean of hidden cells predicts the writers' real mean images better than the plain
    label mean does."""
    reduced, hidden = matrix.holdout(6, seed=1, min_images=2, min_other_cells=3)
    m = Linear(rank=2).fit(reduced)
    ours = theirs = 0.0
    for cell in hidden:
        truth = cell.images.reshape(len(cell.images), -1).mean(0) / 255.0
        label_mean = (
            reduced.data.images[reduced.data.labels == cell.label].reshape(-1, 784).mean(0) / 255.0
        )
        ours += np.abs(m.mean_image(cell.writer, cell.label) - truth).sum()
        theirs += np.abs(label_mean - truth).sum()
    assert ours < 0.95 * theirs


def test_linear_nearest_render_returns_real_images_of_other_writers(matrix):
    m = Linear(rank=2).fit(matrix)
    writer, label = matrix.empty_cells()[0]
    for rows in _source_rows(matrix, m.generate(writer, label, 5, seed=0), label):
        assert matrix.row(writer) not in rows
