"""Re-fill a finished bench's hidden cells from one of its saved runs under sampling variants, and
score each as the bench does (its rows and train-on-fills), without refitting anything.

    python benchmarks/refill_scores.py BENCH_DIR --data ../shared/data/femnist/femnist_digits.npz \
        --method completion-gan --variant default --variant candidates=1 \
        --variant truncation=1.25,herd=rendered

BENCH_DIR is an `inkfill bench --out` directory (hidden cells, not --new-writers): its
results.json gives the seed and the number of hidden cells, so the split, the judge and the
train-on-fills backbone are the bench's own (both cached by the bench; trained again if the cache
is gone). A variant is a comma-separated list of `fill --sample` settings ("default": none).

--ceiling adds what label CAS could be without a generator: the same network trained on the
hidden cells' own real images (half A, as the bench's real row, and the whole cell, each drawn
with replacement to per_cell images a cell) and on as many real images of other cells; and, for
every row, the errors on the real test images by true label (where fills teach less than real
images do). --swap (implies --ceiling) tells which label's fills cost the most: for each variant
and label, the network trained on the whole real hidden cells with only that label's cells
replaced by the variant's fills.

--oracle adds, for each variant, the same fill with each hidden cell's predicted code replaced by
the code of its real half A (those images through the run's classifier; half B, what writer CAS
tests on, stays unseen): what the generator makes of a perfect prediction, which tells whether a
number is bounded by the prediction or by the rendering (completion-gan and predicted-retrieval).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inkfill.bench import CAS_SEED, Scorer, split_reference, train_judge  # noqa: E402
from inkfill.cas import TrainOnFills  # noqa: E402
from inkfill.cli import _apply_sampling  # noqa: E402
from inkfill.config import FeatureConfig  # noqa: E402
from inkfill.data import WriterMatrix, label_name, load_dataset  # noqa: E402
from inkfill.methods import fill, load_run  # noqa: E402
from inkfill.methods.personal import embed_images  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("bench", type=Path)
    p.add_argument("--data", required=True)
    p.add_argument("--labels", default="digits")
    p.add_argument("--method", default="completion-gan")
    p.add_argument("--variant", action="append", default=[])
    p.add_argument("--ceiling", action="store_true", help="label CAS of real images too")
    p.add_argument("--swap", action="store_true", help="one label's real cells swapped for fills")
    p.add_argument("--oracle", action="store_true", help="also fill from half A's real codes")
    args = p.parse_args()
    args.ceiling |= args.swap
    torch.set_num_threads(os.cpu_count() or 1)
    saved = json.loads((args.bench / "results.json").read_text())
    config = saved["config"]
    if config["new_writers"]:
        sys.exit("refill_scores.py: a --new-writers bench has no hidden cells to re-fill")
    seed, per_cell, dev = config["seed"], config["per_cell"], torch.device("cpu")
    matrix = WriterMatrix(load_dataset(args.data, labels=args.labels))
    reduced, hidden = matrix.holdout(config["hidden_cells"], seed=seed)
    assert [h.writer for h in hidden] == [c["writer"] for c in saved["hidden_cells"]], (
        "not the bench's hidden cells: another --data or --labels?"
    )
    train, reference = split_reference(reduced, seed)
    features = FeatureConfig(**saved["feature_config"])
    judge, _ = train_judge(reduced, train, features, seed, dev)
    scorer = Scorer(reduced, hidden, reference, judge, seed)
    backbone, _ = train_judge(reduced, train, features, seed + CAS_SEED, dev)
    cols = np.asarray([reduced.col(h.label) for h in hidden])
    rows = np.asarray([reduced.row(h.writer) for h in hidden])
    cas = TrainOnFills(reduced, rows, cols, [b for _, b in scorer.halves], backbone.net,
                       train, reference, seed, dev)  # fmt: skip
    cells = [(h.writer, h.label) for h in hidden]
    names = [label_name(int(v)) for v in reduced.label_ids]
    errors = {}  # row -> errors on the real test images, by true label
    if args.ceiling:
        rng = np.random.default_rng(seed)
        whole = [np.concatenate([a, b]) for a, b in scorer.halves]
        real = {
            "half A": [a[rng.choice(len(a), per_cell)] for a, _ in scorer.halves],
            "whole cell": [w[rng.choice(len(w), per_cell)] for w in whole],
        }
        for name, images in real.items():
            errors[f"real {name}, drawn to {per_cell}"] = _label_errors(cas, images)
        print(f"label CAS of the hidden cells' real images ({sum(map(len, whole))} in all):")
        for name, err in errors.items():
            print(f"  {name}: {1 - err.sum() / len(cas.label_test[1]):.3f}")
        print(f"  as many real images of other cells: {cas.label_cas_real(real['half A']):.3f}")
    print(
        "| variant | MRR | label acc | FID | div ratio | feature div ratio "
        "| writer CAS top-1 / top-5 | label CAS | personal: missing / other labels |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    runs = [(v, False) for v in args.variant or ["default"]]
    if args.oracle:
        runs = [(v, o) for v, _ in runs for o in (False, True)]
    for variant, oracle in runs:
        method = load_run(args.bench / "runs" / args.method)
        if oracle:
            _condition_on_half_a(method, reduced, hidden, [a for a, _ in scorer.halves])
        if hasattr(method, "set_neighbour_bank") and getattr(method, "bank_", None) is None:
            # a run saved before completion-gan kept its training embeddings: the same ones,
            # from the bench's reduced data through the run's classifier
            with torch.inference_mode():
                bank = embed_images(method.classifier_, reduced.data.images, dev).numpy()
            method.set_neighbour_bank(bank, reduced.cols)
        _apply_sampling(method, [] if variant == "default" else variant.split(","))
        start = time.perf_counter()
        filled = fill(method, cells, per_cell, seed=seed)
        fills = [filled.images[k * per_cell : (k + 1) * per_cell] for k in range(len(cells))]
        row, score = scorer.score(fills), cas.score(fills)
        personal = f"{score['personal_missing_acc']:.3f} / {score['personal_other_acc']:.3f}"
        figures = [f"{row['mrr']:.3f}", f"{row['label_accuracy']:.3f}", f"{row['fid']:.2f}",
                   f"{row['diversity_ratio']:.2f}", f"{row['feature_diversity_ratio']:.2f}",
                   f"{score['writer_cas_top1']:.3f} / {score['writer_cas_top5']:.3f}",
                   f"{score['label_cas']:.3f}", personal]  # fmt: skip
        name = f"{variant}, oracle (half A's code)" if oracle else variant
        print(f"| {name} | {' | '.join(figures)} |", flush=True)
        if args.ceiling:
            errors[variant] = _label_errors(cas, fills)
        for c in np.unique(cols) if args.swap else []:
            swapped = [f if k == c else w for f, w, k in zip(fills, real["whole cell"], cols)]
            errors[f"{variant}: real cells, {names[c]}'s filled"] = _label_errors(cas, swapped)
        print(f"  ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    if errors:
        print("\nlabel CAS errors on the real test images, by true label:")
        print(f"| trained on | {' | '.join(map(str, names))} | all |")
        print(f"|---|{'---:|' * (len(names) + 1)}")
        for row, err in errors.items():
            print(f"| {row} | {' | '.join(map(str, err))} | {err.sum()} |")


def _condition_on_half_a(method, reduced: WriterMatrix, hidden, halves_a) -> None:
    """Set each hidden cell's predicted code in `method` (completion-gan, predicted-retrieval)
    to the code of the cell's real half A, embedded by the run's own classifier."""
    if not hasattr(method, "predicted_"):
        sys.exit(f"refill_scores.py: --oracle needs a style-space method, not {method.name}")
    for h, images in zip(hidden, halves_a):
        row, col = method.matrix_.row(h.writer), method.matrix_.col(h.label)
        with torch.inference_mode():
            emb = embed_images(method.classifier_, images, torch.device("cpu")).float().numpy()
        method.predicted_[row, col] = method.regression_.codes(emb.mean(0, keepdims=True))[0]


def _label_errors(cas: TrainOnFills, cells: list[np.ndarray]) -> np.ndarray:
    """The label CAS network trained on `cells` (one array per hidden cell): how many real test
    images of each label it gets wrong."""
    labels = np.repeat(cas.cols, [len(c) for c in cells])
    truth = cas.label_test[1]
    wrong = cas.label_predictions(np.concatenate(cells), labels) != truth
    return np.bincount(truth[wrong], minlength=cas.reduced.n_labels)


if __name__ == "__main__":
    main()
