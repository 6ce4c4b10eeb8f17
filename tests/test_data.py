import numpy as np
import pytest
import torch
from conftest import make_dataset, write_leaf

from inkfill.data import (
    DataError,
    Dataset,
    WriterMatrix,
    leaf_shards,
    load_dataset,
    to_images,
    to_model,
)


def _same(a: Dataset, b: Dataset) -> bool:
    """Same multiset of (writer, label, image) triples."""

    def key(d):
        return sorted(zip(d.writers.tolist(), d.labels.tolist(), (im.tobytes() for im in d.images)))

    return key(a) == key(b)


def test_npz_round_trip(tiny, tiny_npz):
    loaded = load_dataset(tiny_npz)
    assert loaded.images.dtype == np.uint8 and loaded.images.shape[1:] == (28, 28)
    assert loaded.labels.dtype == np.int64
    np.testing.assert_array_equal(loaded.images, tiny.images)
    np.testing.assert_array_equal(loaded.labels, tiny.labels)
    np.testing.assert_array_equal(loaded.writers, tiny.writers)


def test_leaf_file_inverts_and_keeps_orientation(tmp_path):
    # An asymmetric image: ink along the top row only, stronger on the left.
    img = np.zeros((1, 28, 28), dtype=np.uint8)
    img[0, 0, :] = np.linspace(255, 10, 28).round().astype(np.uint8)
    data = Dataset(img, np.array([3]), np.array(["f0001_00"]))
    loaded = load_dataset(write_leaf(data, tmp_path / "one.json"))
    np.testing.assert_array_equal(loaded.images, img)  # upright, ink high, exact
    assert loaded.images[0, 0, 0] == 255 and loaded.images[0, 27, 0] == 0


def test_leaf_dir_merges_train_and_test(tmp_path, tiny):
    train_mask = np.arange(len(tiny)) % 3 != 0
    write_leaf(tiny.subset(train_mask), tmp_path / "data" / "train" / "all_data_0_train_9.json")
    write_leaf(tiny.subset(~train_mask), tmp_path / "data" / "test" / "all_data_0_test_9.json")
    loaded = load_dataset(tmp_path / "data")
    assert _same(loaded, tiny)
    # One writer's samples from both shards sit together.
    change = np.flatnonzero(loaded.writers[1:] != loaded.writers[:-1])
    assert len(change) == len(np.unique(tiny.writers)) - 1


def test_leaf_dir_prefers_final_split_over_intermediate_copies(tmp_path, tiny):
    write_leaf(tiny, tmp_path / "all_data" / "all_data_0.json")
    write_leaf(tiny, tmp_path / "train" / "t.json")
    assert [p.parent.name for p in leaf_shards(tmp_path)] == ["train"]
    assert len(load_dataset(tmp_path)) == len(tiny)


def test_label_filter(tmp_path):
    data = make_dataset(labels=(0, 5, 12, 40), p_empty=0.0)
    path = tmp_path / "mixed.npz"
    data.save(path)
    assert set(load_dataset(path).labels.tolist()) == {0, 5}
    assert set(load_dataset(path, labels="all").labels.tolist()) == {0, 5, 12, 40}


def test_model_tensor_round_trip(tiny):
    x = to_model(tiny.images[:7])
    assert x.shape == (7, 1, 28, 28) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    np.testing.assert_array_equal(to_images(x), tiny.images[:7])


def test_matrix_cells(tiny):
    m = WriterMatrix(tiny)
    assert m.counts.sum() == len(tiny)
    assert m.counts.shape == (len(np.unique(tiny.writers)), 10)
    for writer, label in m.cells(observed=True):
        idx = m.indices(writer, label)
        assert len(idx) == m.counts[m.row(writer), m.col(label)]
        assert (tiny.writers[idx] == writer).all() and (tiny.labels[idx] == label).all()
    for writer, label in m.empty_cells():
        assert len(m.indices(writer, label)) == 0
        assert not ((tiny.writers == writer) & (tiny.labels == label)).any()
    assert len(m.empty_cells()) + int(m.observed.sum()) == m.counts.size
    with pytest.raises(DataError, match="unknown writer"):
        m.indices("nobody", 0)
    with pytest.raises(DataError, match="not in the data"):
        m.col(42)


def test_holdout_is_deterministic_and_hides_whole_cells(tiny):
    m = WriterMatrix(tiny)
    reduced, hidden = m.holdout(4, seed=3, min_images=2, min_other_cells=3)
    reduced2, hidden2 = m.holdout(4, seed=3, min_images=2, min_other_cells=3)
    assert [(h.writer, h.label) for h in hidden] == [(h.writer, h.label) for h in hidden2]
    np.testing.assert_array_equal(reduced.counts, reduced2.counts)
    assert len({h.writer for h in hidden}) == 4  # at most one cell per writer
    for h in hidden:
        np.testing.assert_array_equal(h.images, m.images(h.writer, h.label))
        assert len(h.images) >= 2
        assert reduced.counts[reduced.row(h.writer), reduced.col(h.label)] == 0
        assert reduced.observed[reduced.row(h.writer)].sum() >= 3
    assert len(reduced.data) == len(tiny) - sum(len(h.images) for h in hidden)
    np.testing.assert_array_equal(reduced.label_ids, m.label_ids)
    other = m.holdout(4, seed=4, min_images=2, min_other_cells=3)[1]
    assert [(h.writer, h.label) for h in other] != [(h.writer, h.label) for h in hidden]
    with pytest.raises(DataError, match="cannot hide"):
        m.holdout(1000)


def test_real_leaf_matches_npz(real_leaf, real_all):
    leaf = load_dataset(real_leaf, labels="all")
    ref = load_dataset(real_all, labels="all")
    assert len(np.unique(leaf.writers)) == 5 and len(leaf) == 837
    for writer in np.unique(leaf.writers):
        mine = leaf.images[leaf.writers == writer].astype(np.float32)
        theirs = ref.images[ref.writers == writer].astype(np.float32)
        # Mean absolute grey-level gap to the nearest image of the same writer.
        gap = np.abs(mine[:, None] - theirs[None]).mean(axis=(2, 3)).min(axis=1)
        assert gap.mean() <= 1.0, writer
        # Transposed copies would be far apart: the loader keeps LEAF's upright row-major order.
        flipped = (
            np.abs(mine.transpose(0, 2, 1)[:, None] - theirs[None]).mean(axis=(2, 3)).min(axis=1)
        )
        assert flipped.mean() > 3.0
