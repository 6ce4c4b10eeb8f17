import numpy as np
import pytest
import torch
from conftest import make_dataset, write_leaf

from inkfill.data import (
    DataError,
    Dataset,
    NpzStream,
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


def _flagged(data: Dataset) -> Dataset:
    flags = np.arange(len(data)) % 3 == 0
    return Dataset(data.images, data.labels, data.writers, flags, {"run": "r", "seed": 7})


def _by_writer(data: Dataset) -> np.ndarray:
    return np.lexsort((np.arange(len(data)), data.writers))


@pytest.mark.parametrize("name", ["out.npz", "out.json", "out/"])
def test_generated_flags_and_source_round_trip_in_every_format(tiny, tmp_path, name):
    data = _flagged(tiny)
    data.save(str(tmp_path) + "/" + name)  # pathlib would drop the trailing / of "out/"
    assert (tmp_path / "out").is_dir() == name.endswith("/")
    back = load_dataset(tmp_path / name)
    a, b = _by_writer(data), _by_writer(back)  # LEAF groups a writer's images together
    np.testing.assert_array_equal(back.images[b], data.images[a])  # byte-identical pixels
    np.testing.assert_array_equal(back.labels[b], data.labels[a])
    np.testing.assert_array_equal(back.writers[b], data.writers[a])
    np.testing.assert_array_equal(back.generated[b], data.generated[a])
    assert back.source == {"run": "r", "seed": 7} and back.n_generated == data.n_generated


def test_leaf_export_is_leaf_shaped(tiny, tmp_path):
    import json

    Dataset(tiny.images, tiny.labels, tiny.writers).save(str(tmp_path / "leaf") + "/")
    shards = sorted((tmp_path / "leaf").glob("*.json"))
    assert [p.name for p in shards] == ["all_data_0.json"]  # 12 writers: one shard of <= 100
    blob = json.loads(shards[0].read_text())
    assert set(blob) == {"users", "num_samples", "user_data"}  # no flags when all are real
    user = blob["users"][0]
    x = np.asarray(blob["user_data"][user]["x"])
    assert x.shape == (blob["num_samples"][0], 784) and x.max() == 1.0  # background 1.0
    assert load_dataset(tmp_path / "leaf").generated is None
    with pytest.raises(DataError, match="already exists"):
        tiny.save(str(tmp_path / "leaf") + "/")


def test_npz_stream_writes_what_save_writes_and_nothing_on_failure(tiny, tmp_path):
    data = _flagged(tiny)
    stream = NpzStream(tmp_path / "s.npz", len(data), data.source)
    for start in range(0, len(data), 7):
        stream.add(data.subset(np.arange(start, min(start + 7, len(data)))))
    stream.close()
    back = load_dataset(tmp_path / "s.npz")
    np.testing.assert_array_equal(back.images, data.images)
    np.testing.assert_array_equal(back.generated, data.generated)
    assert back.source == data.source and list(tmp_path.iterdir()) == [tmp_path / "s.npz"]
    short = NpzStream(tmp_path / "t.npz", len(data) + 1)
    short.add(data)
    with pytest.raises(ValueError, match="announced"):
        short.close()
    assert list(tmp_path.iterdir()) == [tmp_path / "s.npz"]  # no half-written file


def test_a_bad_generated_flag_is_a_clear_error(tiny, tmp_path):
    np.savez(tmp_path / "x.npz", images=tiny.images, labels=tiny.labels, writers=tiny.writers,
             generated=np.zeros(3, bool))  # fmt: skip
    with pytest.raises(DataError, match="generated must be a bool array"):
        load_dataset(tmp_path / "x.npz")
