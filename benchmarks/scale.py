"""Fit time and peak memory as the data grows, up to full FEMNIST (~805k images, ~3,550 writers,
62 labels), for cluster-gan and the best personal method, in one process and under torchrun.

    python benchmarks/scale.py --sizes 35000,100000,390000 --methods cluster-gan,completion-gan
    python benchmarks/scale.py --labels all --sizes 805000 --methods completion-gan --nproc 1,2 \
        --fit-args "--steps 300 --classifier-epochs 1"      # a short fit: memory and rates
    python benchmarks/scale.py --plot benchmarks/results/scale.png     # the figure of every row

The real FEMNIST (digits: ~35k images, 516 writers; all 62 labels: ~53k, 540 writers) is the
first size. Larger sets are made of pseudo-writers: each is a real writer whose every image goes
through one small random affine map (rotation +-8 degrees, scale 0.9-1.1, shear +-0.15, shift +-1
px: a new hand with the same habits), its cells resampled with replacement (each copy with its own
sub-pixel jitter) up to the target's images per writer: the seed's ~111 (390k / 3,500) for
digits, full FEMNIST's ~227 (805k / 3,550) for all labels. Each fit runs as its own `inkfill fit`
process (or `torchrun --nproc_per_node N -m inkfill fit`); the peak memory is the largest sum of
the resident memory of the fit's processes, sampled every 0.2 s (for N processes it counts the
pages they share, such as PyTorch's libraries, N times: an upper bound). A row with --fit-args is
a short fit: its phase times (RUN/metrics.json) give the rates from which a full fit is projected.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inkfill.data import Dataset, load_dataset  # noqa: E402

SEED_IMAGES, SEED_WRITERS = 390_000, 3_500
FULL_IMAGES, FULL_WRITERS = 805_263, 3_550  # FEMNIST, 62 labels (LEAF)


def affine_batch(images: np.ndarray, theta: torch.Tensor) -> np.ndarray:
    """uint8 (N, 28, 28) through (N, 2, 3) affine maps, bilinear, ink outside the frame = 0."""
    x = torch.as_tensor(images, dtype=torch.float32)[:, None] / 255.0
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    y = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (y[:, 0] * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def random_theta(n: int, g: torch.Generator, rot=8.0, scale=0.1, shear=0.15, shift=1.0):
    angle = (torch.rand(n, generator=g) * 2 - 1) * math.radians(rot)
    s = 1 + (torch.rand(n, generator=g) * 2 - 1) * scale
    sh = (torch.rand(n, generator=g) * 2 - 1) * shear
    t = (torch.rand(n, 2, generator=g) * 2 - 1) * shift * 2 / 28  # pixels -> [-1, 1] units
    cos, sin = torch.cos(angle), torch.sin(angle)
    a = torch.stack([torch.stack([cos, -sin + sh], 1), torch.stack([sin, cos], 1)], 1)
    return torch.cat([a / s[:, None, None], t[:, :, None]], 2)  # (n, 2, 3)


def pseudo_writers(
    real: Dataset, n_images: int, per_writer: float = SEED_IMAGES / SEED_WRITERS, seed: int = 0
) -> Dataset:
    """A dataset of ~n_images: the real writers, then pseudo-writers of ~per_writer images each
    until the size is reached."""
    if n_images <= len(real):
        return real
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    writers = np.unique(real.writers)
    by_writer = {w: np.flatnonzero(real.writers == w) for w in writers}
    parts, total, k = [real], len(real), 0
    while total < n_images:
        source = writers[rng.integers(len(writers))]
        idx = by_writer[source]
        grow = per_writer / (len(real) / len(writers))  # resample up to ~111 images per writer
        take = rng.choice(idx, size=max(1, int(round(len(idx) * grow))), replace=True)
        theta = random_theta(1, g).expand(len(take), -1, -1).clone()
        theta += (torch.rand(theta.shape, generator=g) * 2 - 1) * 0.02  # per-copy jitter
        images = affine_batch(real.images[take], theta)
        parts.append(Dataset(images, real.labels[take], np.full(len(take), f"pseudo{k:05d}")))
        total += len(take)
        k += 1
    return Dataset.concat(parts)


class PeakMemory:
    """The largest total resident memory of a process and its descendants, sampled in a thread."""

    def __init__(self, pid: int, every: float = 0.2):
        self.pid, self.every, self.peak = pid, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(entry))
        out, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo.extend(children.get(pid, []))
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for pid in self._tree():
                try:
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1]) * 1024
                except OSError:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.every)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def fit_command(method: str, data: Path, run: Path, nproc: int, fit_args: list[str]) -> list[str]:
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node", str(nproc), "-m", "inkfill"]  # fmt: skip
    else:
        launcher = [str(Path(sys.executable).with_name("inkfill"))]
    return [*launcher, "fit", "--method", method, "--data", str(data), "--out", str(run),
            "--overwrite", "--figures", "none", "--no-progress", "--labels", "all",
            *fit_args]  # fmt: skip


LABEL_MARKERS = {"digits": "o", "all": "s"}  # 10 digits; all 62 labels


def plot(results: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["method"], r.get("generator", ""), r.get("processes", 1), r.get("fit_args", ""))
        groups.setdefault(key, []).append(r)
    for (method, generator, nproc, fit_args), part in sorted(groups.items()):
        short = bool(fit_args)
        part = sorted(part, key=lambda r: r["images"])
        x = [r["images"] for r in part]
        label = f"{method}{f' ({generator})' if generator else ''}, "
        label += f"{nproc} process{'es' if nproc > 1 else ''}"
        if short:
            label += f" (short fit: {fit_args})"
        for ax, y in ((axes[0], [r["fit_s"] / 60 for r in part]),
                      (axes[1], [r["peak_rss_gib"] for r in part])):  # fmt: skip
            (line,) = ax.plot(x, y, label=label, linestyle="--" if short else "-")
            for xi, yi, r in zip(x, y, part):  # the label set of each point: its marker
                ax.plot(xi, yi, LABEL_MARKERS[r.get("labels", "digits")], color=line.get_color())
    axes[0].set(xscale="log", yscale="log", xlabel="images", ylabel="fit time (min)",
                title="fit time on 2 CPU cores")  # fmt: skip
    axes[0].axhline(120, color="grey", lw=0.8, ls=":")
    axes[1].set(xscale="log", xlabel="images", ylabel="peak memory (GiB)", title="peak memory")
    axes[1].axhline(8, color="grey", lw=0.8, ls=":")
    for ax in axes:
        ax.set_xticks([35_000, 100_000, 390_000, 805_000], ["35k", "100k", "390k", "805k"])
        ax.minorticks_off()
        ax.grid(alpha=0.3, which="both")
    handles, _ = axes[0].get_legend_handles_labels()
    handles += [
        plt.Line2D([], [], color="grey", marker=m, linestyle="", label=f"{name} labels")
        for name, m in LABEL_MARKERS.items()
    ]
    fig.legend(handles=handles, fontsize=7, loc="lower center", ncol=3, frameon=False)
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    fig.savefig(out, dpi=120)
    print(f"plot written to {out}")


def projected_seconds(
    method: str, phases: dict, fit_args: list[str], summary: dict
) -> float | None:
    """A full default fit's time from a short completion-gan fit's phase times: the classifier
    scaled to the default epochs, the GAN to the default (adaptive) steps, the rest as measured."""
    if method != "completion-gan" or not phases:
        return None
    from inkfill.config import CompletionGANConfig
    from inkfill.methods.completion import auto_steps
    from inkfill.methods.personal import auto_classifier_epochs

    default = CompletionGANConfig()
    full_epochs = default.classifier_epochs or auto_classifier_epochs(summary["images"])

    def given(flag, fallback):
        return float(fit_args[fit_args.index(flag) + 1]) if flag in fit_args else fallback

    epochs = given("--classifier-epochs", full_epochs)
    steps = given("--steps", 0) or auto_steps(summary["observed_cells"], default.batch_cells)
    full_steps = auto_steps(summary["observed_cells"], default.batch_cells)
    total = sum(v for k, v in phases.items() if k not in ("classifier", "gan"))
    return total + phases["classifier"] * full_epochs / epochs + phases["gan"] * full_steps / steps


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=None, help="real data (default: the file of --labels)")
    p.add_argument("--labels", choices=["digits", "all"], default="digits")
    p.add_argument("--sizes", default="35000,100000,390000")
    p.add_argument("--methods", default="cluster-gan,completion-gan")
    p.add_argument("--nproc", default="1", help="process counts (torchrun when > 1), e.g. 1,2")
    p.add_argument("--fit-args", default="", help="more `inkfill fit` arguments (a short fit)")
    p.add_argument("--work", type=Path, default=None, help="where datasets and runs go")
    p.add_argument("--results", type=Path, default=Path("benchmarks/results/scale.jsonl"))
    p.add_argument("--plot", type=Path, default=None, help="only draw the results as a figure")
    args = p.parse_args()
    if args.plot:
        return plot(args.results, args.plot)
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "femnist"
    default = {"digits": "femnist_digits.npz", "all": "femnist_all.npz"}[args.labels]
    real = load_dataset(args.data or os.environ.get("INKFILL_DATA") or shared / default, "all")
    per_writer = (FULL_IMAGES / FULL_WRITERS if args.labels == "all"
                  else SEED_IMAGES / SEED_WRITERS)  # fmt: skip
    work = args.work or Path(tempfile.mkdtemp(prefix="inkfill-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    fit_args = args.fit_args.split()
    for size in [int(s) for s in args.sizes.split(",")]:
        path = work / f"data_{args.labels}_{size}.npz"
        if path.exists():
            data = load_dataset(path, "all")
        else:
            data = pseudo_writers(real, size, per_writer)
            data.save(path)
        n_writers = len(np.unique(data.writers))
        n_labels = len(np.unique(data.labels))
        print(f"{size:,}: {len(data):,} images, {n_writers:,} writers, {n_labels} labels -> {path}",
              flush=True)  # fmt: skip
        for method in args.methods.split(","):
            for nproc in [int(n) for n in args.nproc.split(",")]:
                run = work / f"{method}_{args.labels}_{size}_{nproc}"
                env = {**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // nproc))}
                start = time.perf_counter()
                proc = subprocess.Popen(fit_command(method, path, run, nproc, fit_args), env=env,
                                        stdout=subprocess.DEVNULL)  # fmt: skip
                memory = PeakMemory(proc.pid)
                if proc.wait():
                    raise SystemExit(f"{method} at {size} failed (exit {proc.returncode})")
                peak = memory.stop()
                wall = time.perf_counter() - start
                metrics = json.loads((run / "metrics.json").read_text())
                config = json.loads((run / "config.json").read_text())
                summary = config["data"]
                phases = metrics.get("phase_seconds", {})
                row = {"method": method, "labels": args.labels, "images": len(data),
                       "writers": n_writers, "processes": nproc, "fit_args": args.fit_args,
                       "fit_s": round(metrics["fit_seconds"], 1), "command_s": round(wall, 1),
                       "peak_rss_gib": round(peak / 2**30, 2), "phase_seconds": phases}  # fmt: skip
                if config["params"].get("generator"):  # cluster-gan: conditional or per-cluster
                    row["generator"] = config["params"]["generator"]
                projected = projected_seconds(method, phases, fit_args, summary)
                if fit_args and projected is not None:
                    row["projected_fit_s"] = round(projected, 1)
                with args.results.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                extra = (f", projected full fit {projected / 60:.1f} min"
                         if fit_args and projected else "")  # fmt: skip
                print(f"  {method} x{nproc}: fit {metrics['fit_seconds'] / 60:.1f} min, whole "
                      f"command {wall / 60:.1f} min, peak memory {row['peak_rss_gib']:.2f} GiB"
                      f"{extra}; phases {phases}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
