"""Fit time and peak memory as the data grows, up to the seed's scale (~390k images, ~3,500
writers), for cluster-gan and the best personal method.

    python benchmarks/scale.py --sizes 35000,100000,390000 --methods cluster-gan,embed-gan

The real FEMNIST digits (~35k images, 516 writers) are the first size. Larger sets are made of
pseudo-writers: each is a real writer whose every image goes through one small random affine map
(rotation +-8 degrees, scale 0.9-1.1, shear +-0.15, shift +-1 px: a new hand with the same
habits), its cells resampled with replacement (each copy with its own sub-pixel jitter) so that
the set reaches the seed's ~111 images per writer. Each fit runs as its own `inkfill fit` process
under /usr/bin/time, which reports the wall time and the peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inkfill.data import Dataset, load_dataset  # noqa: E402

SEED_IMAGES, SEED_WRITERS = 390_000, 3_500


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


def pseudo_writers(real: Dataset, n_images: int, seed: int = 0) -> Dataset:
    """A dataset of ~n_images: the real writers, then pseudo-writers until the size is reached."""
    if n_images <= len(real):
        return real
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    writers = np.unique(real.writers)
    by_writer = {w: np.flatnonzero(real.writers == w) for w in writers}
    per_writer = SEED_IMAGES / SEED_WRITERS
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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=os.environ.get("INKFILL_DATA"))
    p.add_argument("--sizes", default="35000,100000,390000")
    p.add_argument("--methods", default="cluster-gan,embed-gan")
    p.add_argument("--work", type=Path, default=None, help="where datasets and runs go")
    p.add_argument("--results", type=Path, default=Path("benchmarks/results/scale.jsonl"))
    args = p.parse_args()
    real = load_dataset(args.data)
    work = args.work or Path(tempfile.mkdtemp(prefix="inkfill-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    inkfill = Path(sys.executable).with_name("inkfill")
    for size in [int(s) for s in args.sizes.split(",")]:
        data = pseudo_writers(real, size)
        path = work / f"data_{size}.npz"
        data.save(path)
        n_writers = len(np.unique(data.writers))
        print(f"{size:,}: {len(data):,} images, {n_writers:,} writers -> {path}", flush=True)
        for method in args.methods.split(","):
            run = work / f"{method}_{size}"
            timing = work / f"{method}_{size}.time"
            cmd = ["/usr/bin/time", "-o", str(timing), "-f", "%e %M", str(inkfill), "fit",
                   "--method", method, "--data", str(path), "--out", str(run), "--overwrite",
                   "--figures", "none", "--no-progress"]  # fmt: skip
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            wall, kib = timing.read_text().split()[-2:]
            fit_s = json.loads((run / "metrics.json").read_text())["fit_seconds"]
            row = {"method": method, "images": len(data), "writers": n_writers,
                   "fit_s": round(fit_s, 1), "command_s": float(wall),
                   "peak_rss_gib": round(int(kib) / 2**20, 2)}  # fmt: skip
            with args.results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"  {method}: fit {fit_s / 60:.1f} min, whole command {float(wall) / 60:.1f} "
                  f"min, peak memory {row['peak_rss_gib']:.2f} GiB", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
