import json

import numpy as np
import pytest
from conftest import make_dataset

from inkfill.bench import collapse_warning, results_markdown, run_bench, split_reference
from inkfill.cli import main
from inkfill.config import BenchConfig, FeatureConfig
from inkfill.data import WriterMatrix, load_dataset

TINY_GAN = dict(
    generator="per-cluster", n_clusters=2, n_components=8, ngf=8, ndf=8, nz=16, label_steps=4,
    cluster_steps=2,
)  # fmt: skip


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INKFILL_CACHE", str(tmp_path / "cache"))


def test_split_reference_halves_every_cell(tiny):
    m = WriterMatrix(tiny)
    train, ref = split_reference(m, seed=0)
    assert len(np.intersect1d(train, ref)) == 0
    assert len(train) + len(ref) == len(tiny)
    for writer, label in m.cells(observed=True):
        idx = m.indices(writer, label)
        assert np.isin(idx, train).sum() == (len(idx) + 1) // 2


def _bench(tmp_path, name):
    matrix = WriterMatrix(make_dataset(n_writers=16, seed=5))
    config = BenchConfig(
        methods="generic,retrieval,linear,cluster-gan",
        hidden_cells=5,
        per_cell=4,
        seed=3,
        figure_cells=3,
    )
    return run_bench(
        matrix, config, tmp_path / name, device=__import__("torch").device("cpu"),
        feature_config=FeatureConfig(epochs=2, width=8, dim=16, batch_size=32),
        method_params={"cluster-gan": TINY_GAN},
    )  # fmt: skip


def _strip_times(rows):
    return {n: {k: v for k, v in r.items() if not k.endswith("_seconds")} for n, r in rows.items()}


def test_bench_runs_end_to_end_and_is_reproducible(tmp_path, monkeypatch):
    # The label-CAS networks' 600 steps were 80% of this test; the contract needs only a few.
    monkeypatch.setattr("inkfill.cas.LABEL_STEPS", 60)
    first = _bench(tmp_path, "a")
    assert list(first["rows"]) == [
        "ceiling (real)",
        "predicted",
        "generic",
        "retrieval",
        "linear",
        "cluster-gan",
        "no fill",
    ]
    md = results_markdown(first)
    assert md.count("\n| ") == 7 + 7 and "ceiling (real)" in md and "| predicted |" in md
    assert "## Train on fills, test on real" in md and "| real (half A of the cell) |" in md
    # Train on fills: every row scored, the no-fill reference beside them.
    none = first["rows"]["no fill"]
    for name in ("no fill", "ceiling (real)", "generic", "retrieval", "linear", "cluster-gan"):
        row = first["rows"][name]
        for key in ("writer_cas_top1", "writer_cas_top5", "personal_missing_acc"):
            assert 0 <= row[key] <= 1, (name, key)
        assert row["writer_cas_top1"] <= row["writer_cas_top5"]
    for name in ("ceiling (real)", "generic", "retrieval", "linear", "cluster-gan"):
        assert 0 <= first["rows"][name]["label_cas"] <= 1
    assert 0 <= none["label_cas_real"] <= 1 and 0 <= none["shared_missing_acc"] <= 1
    first["rows"].pop("no fill")
    predicted = first["rows"].pop("predicted")  # a prototype, no images: ranks only
    assert 0 < predicted["mrr"] <= 1 and len(predicted["ranks"]) == 5 and "fid" not in predicted
    for row in first["rows"].values():
        assert 0 < row["mrr"] <= 1 and len(row["ranks"]) == 5 and np.isfinite(row["fid"])
        assert row["diversity_ratio"] > 0 and row["feature_diversity_ratio"] > 0
        assert 0 <= row["copy_rate"] <= 1 and 0 <= row["label_accuracy"] <= 1
    assert "cluster_share" in first["rows"]["cluster-gan"]
    # Retrieval hands out real training images: every one is a copy.
    assert first["rows"]["retrieval"]["copy_rate"] == 1.0
    for name in (
        "results.md",
        "results.json",
        "figures/hidden_cells.png",
        "figures/mrr.png",
        "figures/writer_cas.png",
        "fills/linear.npz",
    ):
        assert (tmp_path / "a" / name).exists(), name
    assert (tmp_path / "a" / "runs" / "cluster-gan" / "model.safetensors").exists()
    second = _bench(tmp_path, "b")  # judge now comes from the cache: same numbers
    assert second["judge"]["cached"] and not first["judge"]["cached"]
    assert second["rows"].pop("predicted") == predicted
    second_none = second["rows"].pop("no fill")
    assert _strip_times({"n": second_none}) == _strip_times({"n": none})
    assert _strip_times(first["rows"]) == _strip_times(second["rows"])


def test_bench_cli_refuses_bad_sets(tiny_npz, tmp_path, capsys):
    for argv, words in [
        (["--set", "cluster-gan.nope=1"], "no parameter"),
        (["--set", "cluster-gan.ngf=many"], "not a int"),
        (["--set", "generic"], "METHOD.PARAM=VALUE"),
        (["--methods", "generic,unknown"], "unknown method"),
        (["--methods", "generic", "--set", "linear.rank=2"], "not among --methods"),
    ]:
        code = main(
            ["bench", "--data", str(tiny_npz), "--out", str(tmp_path / "b"), "--no-progress", *argv]
        )
        err = capsys.readouterr().err
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_a_collapsed_row_is_flagged_in_the_results():
    """Stop 36's collapsed seed-5 fit: the judge read 0.61 of its fills as their label, 0.98 of
    the real images; a weak but working method (0.90) is not flagged."""
    ceiling = {"label_accuracy": 0.98}
    assert collapse_warning("m", {"label_accuracy": 0.90}, ceiling) is None
    warning = collapse_warning("m", {"label_accuracy": 0.61}, ceiling)
    assert "61% of m's fills" in warning and "runs/m/metrics.jsonl" in warning
    results = {
        "config": {"per_cell": 2, "seed": 0},
        "hidden_cells": [{}],
        "rows": {"ceiling (real)": {**ceiling, "candidates": 5, "chance_mrr": 0.2},
                 "m": {"label_accuracy": 0.61, "warning": warning}},
    }  # fmt: skip
    assert f"**Warning, m:** {warning}" in results_markdown(results)


def test_bench_on_real_digits_separates_ceiling_from_floor(real_digits_half, tmp_path, capsys):
    """On real FEMNIST the judge must tell writers apart: the real ceiling far above generic."""
    argv = [
        "bench",
        "--data",
        real_digits_half,
        "--methods",
        "generic,retrieval",
        "--hidden-cells",
        60,
    ]
    argv += ["--per-cell", 8, "--feature-epochs", 3, "--out", tmp_path / "real", "--no-progress"]
    code = main([str(a) for a in argv])
    assert code == 0
    rows = json.loads((tmp_path / "real" / "results.json").read_text())["rows"]
    ceiling, generic = rows["ceiling (real)"], rows["generic"]
    assert ceiling["mrr"] > 3 * generic["mrr"]
    # Generic fills carry no writer: the true writer lands mid-pack. The median rank, not the MRR,
    # because with 60 cells a single lucky rank-1 hit moves the MRR by 0.017 (3x chance is 0.056).
    assert ceiling["median_rank"] <= 3
    assert generic["median_rank"] > ceiling["candidates"] / 5
    # The nearest writers' real images carry some of the writer: nearer the top than generic.
    assert rows["retrieval"]["median_rank"] < generic["median_rank"]
    assert ceiling["label_accuracy"] > 0.9
    # The writer's other cells predict the hidden one far better than chance.
    assert rows["predicted"]["mrr"] > 3 * generic["mrr"]
    assert ceiling["diversity_ratio"] == 1.0 and 0.5 < generic["diversity_ratio"] < 3
    # generic fills are other writers' images of the label: more varied than one writer's, in
    # pixels and in the judge's embedding
    assert ceiling["feature_diversity_ratio"] == 1.0 and generic["feature_diversity_ratio"] > 1
    assert len(load_dataset(tmp_path / "real" / "fills" / "generic.npz")) == 60 * 8
    assert not any("warning" in row for row in rows.values())  # real images do not collapse
    # Train on fills: the real half A of a hidden cell teaches the probe that writer's label
    # (far above no fill); generic fills teach labels but not the writer. On these 258 writers:
    # top-1 0.103 against 0.034 with no fill, top-5 0.343 against 0.131; generic 0.083 / 0.277.
    none = rows["no fill"]
    for k in ("writer_cas_top1", "writer_cas_top5"):
        assert ceiling[k] > 2 * none[k], k
    assert rows["generic"]["writer_cas_top1"] < ceiling["writer_cas_top1"]
    assert rows["generic"]["label_cas"] > 0.8 and none["label_cas_real"] > 0.8
    # The hidden cells' own real images teach the labels about as well (fewer writers).
    assert ceiling["label_cas"] > 0.8
