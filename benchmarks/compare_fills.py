"""Draw the fills of several benches of the same split side by side: one row per hidden cell of a
label, its real images, then each bench's fill of it (the bench's saved `fills/METHOD.npz`).

    python benchmarks/compare_fills.py --data ../shared/data/femnist/femnist_digits.npz \
        --label 8 --out docs/fills_8.png default=BENCH_A "6,000 steps=BENCH_B"

Each NAME=BENCH_DIR is an `inkfill bench --out` directory; all must share the seed and the number
of hidden cells (checked). Cheap: nothing is fitted or filled again.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inkfill.data import WriterMatrix, load_dataset  # noqa: E402
from inkfill.plots import save_hidden_cells  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("benches", nargs="+", metavar="NAME=BENCH_DIR")
    p.add_argument("--data", required=True)
    p.add_argument("--labels", default="digits")
    p.add_argument("--method", default="completion-gan")
    p.add_argument("--label", type=int, required=True, help="the hidden cells of this label")
    p.add_argument("--cells", type=int, default=6, help="rows (hidden cells) to draw")
    p.add_argument("--show", type=int, default=8, help="images per cell and column")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    named = [item.rpartition("=")[::2] for item in args.benches]
    if any(not name or not path for name, path in named):
        sys.exit("compare_fills.py: each bench is NAME=BENCH_DIR")
    configs = [json.loads((Path(path) / "results.json").read_text())["config"] for _, path in named]
    split = {(c["seed"], c["hidden_cells"], c["per_cell"]) for c in configs}
    if len(split) != 1:
        sys.exit(f"compare_fills.py: the benches hold out different cells: {sorted(split)}")
    seed, n_hidden, per_cell = split.pop()
    matrix = WriterMatrix(load_dataset(args.data, labels=args.labels))
    _, hidden = matrix.holdout(n_hidden, seed=seed)
    picked = [k for k, h in enumerate(hidden) if h.label == args.label][: args.cells]
    if not picked:
        sys.exit(f"compare_fills.py: no hidden cell of label {args.label}")
    fills = {}
    for name, path in named:
        saved = np.load(Path(path) / "fills" / f"{args.method}.npz")
        images = saved["images"].reshape(n_hidden, per_cell, 28, 28)
        writers = saved["writers"].reshape(n_hidden, per_cell)[:, 0]
        assert [str(w) for w in writers] == [h.writer for h in hidden], f"{path}: another split"
        fills[name] = [images[k] for k in picked]
    save_hidden_cells([hidden[k] for k in picked], fills, args.out, n_show=args.show)
    print(f"{args.out}: {len(picked)} hidden cells of label {args.label}, {len(named)} benches")


if __name__ == "__main__":
    main()
