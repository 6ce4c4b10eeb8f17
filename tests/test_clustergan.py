import numpy as np
import pytest
import torch

from inkfill.data import DataError, WriterMatrix
from inkfill.methods import fill, load_run
from inkfill.methods.base import NotFittedError, cell_seed
from inkfill.methods.clustergan import ClusterGAN
from inkfill.models import Discriminator, Generator
from inkfill.train import train_gan

TINY = dict(
    generator="per-cluster",
    n_clusters=3,
    n_components=8,
    ngf=8,
    ndf=8,
    nz=16,
    label_steps=6,
    cluster_steps=4,
    steps=12,
)


@pytest.fixture(scope="module")
def matrix():
    from conftest import make_dataset

    return WriterMatrix(make_dataset())


@pytest.fixture(scope="module", params=["per-cluster", "conditional"])
def fitted(request, matrix):
    return ClusterGAN(**{**TINY, "generator": request.param}).fit(matrix)


def test_model_shapes_and_one_finite_step():
    G, D = Generator(nz=16, ngf=8, n_classes=5), Discriminator(ndf=8, n_classes=5)
    z, classes = torch.randn(4, 16), torch.tensor([0, 1, 2, 4])
    fake = G(z, classes)
    assert fake.shape == (4, 1, 28, 28) and fake.abs().max() <= 1
    assert D(fake, classes).shape == (4,)
    real = torch.rand(10, 1, 28, 28) * 2 - 1
    h = train_gan(
        G,
        D,
        real,
        torch.arange(10) % 5,
        steps=1,
        batch_size=4,
        rng=torch.Generator().manual_seed(0),
        log_every=1,
    )
    assert np.isfinite(h["loss_d"][0]) and np.isfinite(h["loss_g"][0])


def test_generate_shape_and_seeding(fitted, matrix):
    writer, label = matrix.empty_cells()[0]
    a = fitted.generate(writer, label, 5, seed=1)
    assert a.shape == (5, 28, 28) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, fitted.generate(writer, label, 5, seed=1))
    assert not np.array_equal(a, fitted.generate(writer, label, 5, seed=2))


def test_a_cells_images_do_not_depend_on_other_cells(fitted, matrix):
    cells = matrix.empty_cells()[:3]
    alone = fill(fitted, cells[:1], per_cell=4, seed=7)
    together = fill(fitted, cells, per_cell=4, seed=7)
    np.testing.assert_array_equal(alone.images, together.images[:4])
    assert cell_seed(7, *cells[0]) != cell_seed(7, *cells[1])


def test_fill_only_empty_cells(fitted, matrix):
    empty = matrix.empty_cells()
    out = fill(fitted, empty, per_cell=2)
    assert len(out) == 2 * len(empty)
    filled = set(zip(out.writers.tolist(), out.labels.tolist()))
    assert filled == set(empty)
    for writer, label in filled:
        assert matrix.counts[matrix.row(writer), matrix.col(label)] == 0
    with pytest.raises(DataError, match="observed"):
        fill(fitted, [matrix.cells(observed=True)[0]], per_cell=2)


def test_save_load_round_trip(fitted, matrix, tmp_path):
    fitted.save(tmp_path / "run")
    loaded = load_run(tmp_path / "run")
    assert type(loaded) is ClusterGAN and loaded.get_params() == fitted.get_params()
    for writer, label in matrix.empty_cells()[:4]:
        np.testing.assert_array_equal(
            loaded.generate(writer, label, 3, seed=5), fitted.generate(writer, label, 3, seed=5)
        )
        assert (
            loaded.clusters_.vote(writer, label).cluster
            == fitted.clusters_.vote(writer, label).cluster
        )


def test_same_seed_same_fit(matrix):
    a = ClusterGAN(**TINY).fit(matrix)
    b = ClusterGAN(**TINY).fit(matrix)
    writer, label = matrix.empty_cells()[1]
    np.testing.assert_array_equal(
        a.generate(writer, label, 6, seed=3), b.generate(writer, label, 6, seed=3)
    )
    c = ClusterGAN(**{**TINY, "seed": 1}).fit(matrix)
    assert not np.array_equal(
        a.generate(writer, label, 6, seed=3), c.generate(writer, label, 6, seed=3)
    )


def test_errors_before_fit_and_on_unknown_ids(fitted):
    with pytest.raises(NotFittedError):
        ClusterGAN().generate("w000", 1, 2)
    with pytest.raises(DataError, match="unknown writer"):
        fitted.generate("nobody", 1, 2)
    with pytest.raises(DataError, match="not in the data"):
        fitted.generate("w000", 33, 2)


def test_cluster_check_reports_shares_and_diversity(fitted, matrix):
    check = fitted.cluster_check(matrix, n_per_cluster=16, truncations=(1.0, 0.5))
    rows = check["clusters"]
    assert len(rows) == sum(lab.n_clusters for lab in fitted.clusters_.labels_)
    for r in rows:
        assert 0 <= r["real_share"] <= 1 and r["n_real"] > 0
        for g in r["generated"].values():
            assert 0 <= g["share"] <= 1 and g["diversity"] >= 0
    labels = check["labels"]
    assert {r["truncation"] for r in labels} == {1.0, 0.5}
    # Truncating the latent shrinks the spread of generated images.
    by = {(r["label"], r["truncation"]): r["generated_diversity"] for r in labels}
    assert np.mean([by[(lab, 0.5)] for lab, _ in by]) < np.mean([by[(lab, 1.0)] for lab, _ in by])


def test_one_cluster_is_the_seeds_no_cluster_baseline(matrix):
    m = ClusterGAN(**{**TINY, "n_clusters": 1}).fit(matrix)
    assert sorted(m.generators_) == [f"{label}.0" for label in range(10)]
    assert all(m.clusters_.vote(w, lab).cluster == 0 for w, lab in matrix.empty_cells())
