import numpy as np
import pytest

from inkfill.cluster import WriterClustering, vote, vote_accuracy
from inkfill.data import DataError, WriterMatrix

A, B, C, G = 0, 1, 2, 6  # the seed's clusters a, b, c, g among k = 7


def figure6() -> np.ndarray:
    """The seed's Figure 6: users 0-10, digits 0 and 1; user 5 has no digit 1."""
    assign = np.full((11, 2), -1)
    for cluster, users in {A: [0, 1, 3], B: [2, 9, 10], C: [4, 5, 6, 7], G: [8]}.items():
        assign[users, 0] = cluster
    for cluster, users in {A: [1, 4, 7], B: [0, 2], C: [10], G: [3, 6]}.items():
        assign[users, 1] = cluster
    return assign


def test_seed_worked_example_user5_digit1_is_cluster_a():
    cluster, counts, sizes, related, fallback = vote(figure6(), row=5, col=1, n_clusters=7)
    # Related through digit 0 (cluster c): users 4, 6, 7; in digit 1: 4 and 7 in a, 6 in g.
    assert related == {0: 3}
    assert counts.tolist() == [2, 0, 0, 0, 0, 0, 1]
    assert cluster == A and not fallback
    assert sizes.tolist() == [3, 2, 1, 0, 0, 0, 2]


def test_ties_go_to_the_bigger_cluster_then_the_lower_index():
    assign = np.array(
        [
            [0, -1],  # target writer, label 1 missing
            [0, 0],  # related, votes for 0
            [0, 1],  # related, votes for 1
            [1, 1],  # unrelated: makes cluster 1 bigger
        ]
    )
    cluster, counts, sizes, _, fallback = vote(assign, row=0, col=1, n_clusters=2)
    assert counts.tolist() == [1, 1] and sizes.tolist() == [1, 2]
    assert cluster == 1 and not fallback
    assign[3, 1] = -1  # now equal sizes too: lowest index wins
    assert vote(assign, row=0, col=1, n_clusters=2)[0] == 0


def test_fallback_without_related_writers_is_the_biggest_cluster():
    lonely = np.array([[-1, -1], [0, 1], [1, 1], [2, 1]])  # writer 0 has no label at all
    cluster, counts, sizes, related, fallback = vote(lonely, row=0, col=1, n_clusters=2)
    assert fallback and counts.sum() == 0 and cluster == 1 and related == {}
    # Related writers exist but none has the target label: also a fallback.
    assign = np.array([[0, -1], [0, -1], [1, 0], [1, 1], [2, 1]])
    cluster, counts, _, related, fallback = vote(assign, row=0, col=1, n_clusters=2)
    assert fallback and related == {0: 1} and cluster == 1


def test_pairs_rule_counts_each_shared_label():
    # Writer 1 shares writer 0's cluster in labels 0 and 1; writers 2 and 3 only in label 0.
    assign = np.array([[0, 0, -1], [0, 0, 0], [0, 1, 1], [0, 1, 1]])
    assert vote(assign, 0, 2, 2, rule="writers")[0] == 1  # 2 writers beat 1
    cluster, counts, *_ = vote(assign, 0, 2, 2, rule="pairs")
    assert counts.tolist() == [2, 2] and cluster == 1  # tie at 2: cluster 1 has more writers
    with pytest.raises(ValueError):
        vote(assign, 0, 2, 2, rule="nonsense")


def test_writer_clustering_fits_predicts_and_round_trips(tiny):
    m = WriterMatrix(tiny)
    wc = WriterClustering(n_clusters=3, n_components=8).fit(m)
    assert wc.assign_.shape == (m.n_writers, m.n_labels)
    assert ((wc.assign_ >= 0) == m.observed).all()
    for c in range(m.n_labels):
        assert set(wc.assign_[m.observed[:, c], c].tolist()) <= {0, 1, 2}
    lab = wc.for_label(4)
    pred = lab.predict(m.data.images[m.data.labels == 4])
    assert pred.min() >= 0 and pred.max() < 3
    again = WriterClustering.from_state(wc.get_params(), wc.state(), wc.writer_ids_, wc.label_ids_)
    np.testing.assert_array_equal(
        again.for_label(4).predict(m.data.images), lab.predict(m.data.images)
    )
    writer, label = m.empty_cells()[0]
    v1, v2 = wc.vote(writer, label), again.vote(writer, label)
    assert v1.cluster == v2.cluster and (v1.counts == v2.counts).all()
    with pytest.raises(DataError):
        wc.vote("nobody", 1)


def test_single_images_mostly_fall_in_their_writers_cluster(tiny):
    """The clustering separates the synthetic writers' styles far better than chance."""
    m = WriterMatrix(tiny)
    wc = WriterClustering(n_clusters=3, n_components=8).fit(m)
    shares = []
    for c in range(m.n_labels):
        mask = m.cols == c
        shares.append(
            np.mean(wc.labels_[c].predict(m.data.images[mask]) == wc.assign_[m.rows[mask], c])
        )
    assert np.mean(shares) > 0.8


def test_vote_accuracy_is_perfect_when_clusters_agree_across_labels():
    # Writers 0-8 in three groups that keep their cluster in every label.
    assign = np.repeat(np.arange(3), 3)[:, None].repeat(4, axis=1)
    result = vote_accuracy(assign, [3] * 4)
    assert result["accuracy"] == 1.0 and result["cells"] == 36 and result["fallbacks"] == 0
    assert result["chance_accuracy"] == pytest.approx(1 / 3)
    # Break the groups in one label: there each cluster holds one writer of every group, so a
    # writer's group-mates sit in the two other clusters and the vote misses all 9 of its cells,
    # while the other 27 cells are still voted right by the group-mates in the consistent labels.
    assign[:, 3] = np.arange(9) % 3
    assert vote_accuracy(assign, [3] * 4)["accuracy"] == pytest.approx(27 / 36)
