"""Fill throughput: images/s when filling every empty cell of a run, in-process and through the CLI.

    python benchmarks/fill_throughput.py RUN_DIR [RUN_DIR ...] [--per-cell 16] [--repeats 3]
        [--sample PARAM=VALUE ...]   (as `inkfill fill --sample`, e.g. candidates=1)

In-process: `Method.generate_cells` over all empty cells (what `fill` calls, batched across
cells) beside the cell-by-cell loop of `generate`, as medians of `--repeats` runs. CLI: the wall
time of `inkfill fill --run RUN --missing` as a fresh process (interpreter start, imports, loading
the run, generating, writing the npz), median of `--repeats` runs.

    python benchmarks/fill_throughput.py RUN --compare default --compare style_spread=0 \
        --compare herd_to=mean --repeats 7

compares sampling settings (each a comma-separated list, as `refill_scores.py --variant`) on one
loaded run, alternating them round by round in one process: the machine's speed drifts by tens of
percent between minutes, so only rows measured side by side compare.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inkfill.cli import _apply_sampling  # noqa: E402
from inkfill.methods import load_run  # noqa: E402


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(run: Path, args) -> tuple:
    method = load_run(run)
    _apply_sampling(method, args.sample)
    cells = method.matrix_.empty_cells()
    n = len(cells) * args.per_cell
    batched = median_time(lambda: method.generate_cells(cells, args.per_cell), args.repeats)
    few = cells[: args.loop_cells]
    loop = median_time(
        lambda: [method.generate(w, lab, args.per_cell) for w, lab in few], args.repeats
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "filled.npz"
        inkfill = Path(sys.executable).with_name("inkfill")
        cmd = [str(inkfill), "fill", "--run", str(run), "--missing", "--per-cell",
               str(args.per_cell), "--out", str(out), "--no-progress"]  # fmt: skip
        cmd += [f"--sample={item}" for item in args.sample]

        def cli():
            subprocess.run(cmd, check=True, capture_output=True)
            out.unlink()

        cli_s = median_time(cli, args.repeats)
    print(f"  {method.name}: {n / batched:,.0f} images/s in-process, CLI {cli_s:.2f} s",
          flush=True)  # fmt: skip
    return (method.name, run, len(cells), n, n / batched, len(few) * args.per_cell / loop,
            n / cli_s, cli_s)  # fmt: skip


def compare(run: Path, args) -> None:
    method = load_run(run)
    _apply_sampling(method, args.sample)  # what every compared setting starts from
    cells = method.matrix_.empty_cells()
    n = len(cells) * args.per_cell
    keys = {kv.partition("=")[0].replace("-", "_")
            for item in args.compare if item != "default" for kv in item.split(",")}  # fmt: skip
    base = {key: getattr(method, key) for key in keys}
    times = {item: [] for item in args.compare}
    method.generate_cells(cells, args.per_cell)  # warm-up
    for _ in range(args.repeats):
        for item in args.compare:
            for key, value in base.items():
                setattr(method, key, value)
            _apply_sampling(method, [] if item == "default" else item.split(","))
            start = time.perf_counter()
            method.generate_cells(cells, args.per_cell)
            times[item].append(time.perf_counter() - start)
    print(f"\n{method.name}, {run}: {len(cells)} cells, {n:,} images, {args.repeats} rounds")
    print("| sampling | in-process, batched (img/s, median) | slowest | fastest |")
    print("|---|---:|---:|---:|")
    for item, ts in times.items():
        print(f"| {item} | {n / statistics.median(ts):,.0f} | {n / max(ts):,.0f} | "
              f"{n / min(ts):,.0f} |")  # fmt: skip


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--per-cell", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--loop-cells", type=int, default=200, help="cells for the cell-by-cell loop")
    p.add_argument("--sample", action="append", default=[], metavar="PARAM=VALUE")
    p.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="P=V[,P=V]|default",
        help="sampling settings to alternate in one process (in-process fills only)",
    )
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.compare:
        for run in args.runs:
            compare(run, args)
        return
    rows = [measure(run, args) for run in args.runs]
    print("\n| method | run | cells | images | in-process, batched (img/s) | cell by cell (img/s) "
          "| CLI end to end (img/s) | CLI wall s |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, run, cells, n, fast, slow, cli, cli_s in rows:
        print(f"| {name} | {run} | {cells} | {n:,} | {fast:,.0f} | {slow:,.0f} | {cli:,.0f} | "
              f"{cli_s:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
