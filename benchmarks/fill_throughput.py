"""Fill throughput: images/s when filling every empty cell of a run, in-process and through the CLI.

    python benchmarks/fill_throughput.py RUN_DIR [RUN_DIR ...] [--per-cell 16] [--repeats 3]
        [--sample PARAM=VALUE ...]   (as `inkfill fill --sample`, e.g. candidates=1)

In-process: `Method.generate_cells` over all empty cells (what `fill` calls, batched across
cells) beside the cell-by-cell loop of `generate`, as medians of `--repeats` runs. CLI: the wall
time of `inkfill fill --run RUN --missing` as a fresh process (interpreter start, imports, loading
the run, generating, writing the npz), median of `--repeats` runs.
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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--per-cell", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--loop-cells", type=int, default=200, help="cells for the cell-by-cell loop")
    p.add_argument("--sample", action="append", default=[], metavar="PARAM=VALUE")
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = [measure(run, args) for run in args.runs]
    print("\n| method | run | cells | images | in-process, batched (img/s) | cell by cell (img/s) "
          "| CLI end to end (img/s) | CLI wall s |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, run, cells, n, fast, slow, cli, cli_s in rows:
        print(f"| {name} | {run} | {cells} | {n:,} | {fast:,.0f} | {slow:,.0f} | {cli:,.0f} | "
              f"{cli_s:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
