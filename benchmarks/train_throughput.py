"""Training throughput of every generator in inkfill against a plain reference DCGAN loop.

    python benchmarks/train_throughput.py [--data femnist_digits.npz] [--steps 40] [--repeats 3]
    python benchmarks/train_throughput.py --quality 1500   # also: FID after equal training
    python benchmarks/train_throughput.py --skip-dcgan --methods completion-gan --fp32 no \
        --variant default --variant r1_every=4    # a method's step under config variants

Images/s counts the images the generator draws per training step (the batch for a DCGAN; cells x
samples per cell, plus reconstructions, for the personal generators), divided by the wall time of
the step, warm-up excluded; the median over `--repeats` timed runs of `--steps` steps is printed.
The yardstick is the loop most PyTorch users would write: the DCGAN of Radford et al. (ngf = ndf =
64, nz = 64, batch 128, fp32, D on real and fake with two backward passes, then G), adapted to
28x28. inkfill's rows time its own training functions, wrapped by the methods' real `fit`.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inkfill import train as train_module  # noqa: E402
from inkfill.cli import _parse_sets  # noqa: E402
from inkfill.data import load_dataset, to_model  # noqa: E402
from inkfill.methods import collagan as collagan_module  # noqa: E402
from inkfill.methods import completion as completion_module  # noqa: E402
from inkfill.methods import method_class  # noqa: E402
from inkfill.methods import personal as personal_module  # noqa: E402
from inkfill.models import Discriminator, Generator  # noqa: E402


class ReferenceG(nn.Module):
    def __init__(self, nz=64, ngf=64):
        super().__init__()
        self.nz = nz
        self.net = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 4, 7, 1, 0, bias=False),
            nn.BatchNorm2d(ngf * 4),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf * 2),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, 1, 4, 2, 1, bias=False),
            nn.Tanh(),
        )

    def forward(self, z, classes=None):
        return self.net(z[:, :, None, None])


class ReferenceD(nn.Module):
    def __init__(self, ndf=64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, ndf, 4, 2, 1, bias=False),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ndf * 2),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * 2, 1, 7, 1, 0, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x, classes=None):
        return self.net(x).view(-1)


def reference_loop(G, D, real, steps, batch=128, seed=0):
    """The textbook loop (as in PyTorch's DCGAN example), fp32, nothing tuned."""
    g = torch.Generator().manual_seed(seed)
    criterion = nn.BCELoss()
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    ones, zeros = torch.ones(batch), torch.zeros(batch)
    for _ in range(steps):
        x = real[torch.randint(len(real), (batch,), generator=g)]
        D.zero_grad()
        criterion(D(x), ones).backward()
        fake = G(torch.randn(batch, G.nz, generator=g))
        criterion(D(fake.detach()), zeros).backward()
        opt_d.step()
        G.zero_grad()
        criterion(D(fake), ones).backward()
        opt_g.step()


def timed(run, steps, repeats, warmup=5):
    """Median seconds per step of `run(steps)` over `repeats` runs, after a warm-up run."""
    run(warmup)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(steps)
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def dcgan_rows(real, args):
    rows = []
    ref_g, ref_d = ReferenceG(), ReferenceD()

    def ref(steps):
        reference_loop(ref_g, ref_d, real, steps)

    t = timed(ref, args.steps, args.repeats)
    rows.append(("reference DCGAN (ngf/ndf 64, fp32)", 128, t))
    base = 128 / t

    nchw = torch.contiguous_format
    variants = [  # (name, width, bf16, memory format, compiled, batch)
        ("ngf/ndf 64 (the reference's), fp32, NCHW", 64, False, nchw, False, 128),
        ("ngf/ndf 64, bf16 + channels_last", 64, True, None, False, 128),
        ("ngf/ndf 32, fp32, NCHW", 32, False, nchw, False, 128),
        ("ngf/ndf 32, fp32 + channels_last", 32, False, None, False, 128),
        ("ngf/ndf 32, bf16, NCHW", 32, True, nchw, False, 128),
        ("ngf/ndf 32, bf16 + channels_last (default)", 32, True, None, False, 128),
        ("ngf/ndf 32, bf16 + channels_last, batch 64 (conditional)", 32, True, None, False, 64),
        ("ngf/ndf 32, bf16 + channels_last, batch 32 (per-cluster)", 32, True, None, False, 32),
        ("ngf/ndf 32, fp32, NCHW, batch 32 (per-cluster)", 32, False, nchw, False, 32),
    ]
    if args.compile:
        variants.append(("ngf/ndf 32, bf16 + torch.compile", 32, True, nchw, True, 128))
    for name, width, bf16, memory_format, compiled, batch in variants:
        G, D = Generator(64, width), Discriminator(width)
        memory_format = memory_format or torch.channels_last
        if compiled:
            start = time.perf_counter()
            G, D = torch.compile(G), torch.compile(D)
            G.nz = 64
        rng = torch.Generator().manual_seed(0)

        def run(steps, G=G, D=D, bf16=bf16, batch=batch, rng=rng, fmt=memory_format):
            train_module.train_gan(G, D, real, steps=steps, batch_size=batch, rng=rng, bf16=bf16,
                                   memory_format=fmt)  # fmt: skip

        if compiled:
            run(3)
            print(f"  torch.compile warm-up {time.perf_counter() - start:.0f} s", flush=True)
        t = timed(run, args.steps, args.repeats)
        rows.append((f"inkfill train_gan, {name}", batch, t))
        print(f"  {rows[-1][0]}: {batch / t:,.0f} images/s", flush=True)
    return rows, base


def method_rows(matrix, args):
    """Time the training loop inside each personal method's real fit (setup excluded), for each
    precision and config variant asked for."""
    rows = []
    specs = [
        ("embed-gan", personal_module, "train_personal_gan"),
        ("encoder-gan", personal_module, "train_personal_gan"),
        ("completion-gan", completion_module, "train_personal_gan"),
        ("collagan", collagan_module, "train_collagan"),
    ]
    wanted = args.methods.split(",")
    precisions = (True,) if args.fp32 == "no" else (False, True)
    for (name, module, fn_name), bf16, variant in itertools.product(
        [spec for spec in specs if spec[0] in wanted], precisions, args.variant
    ):
        sets = (
            {}
            if variant == "default"
            else _parse_sets([f"{name}.{kv}" for kv in variant.split(",")])
        )
        original = getattr(module, fn_name)
        measured = {}

        def wrapper(*a, original=original, measured=measured, fn_name=fn_name, **kw):
            sample = a[4] if fn_name == "train_personal_gan" else a[2]
            kw_run = dict(kw)
            history = None

            def run(steps):
                nonlocal history
                kw_run["steps"] = steps
                history = original(*a, **kw_run)

            measured["t"] = timed(run, args.steps, args.repeats)
            b = len(sample()["labels" if fn_name == "train_personal_gan" else "target_col"])
            if fn_name == "train_personal_gan":  # the draws and the reconstructions
                measured["images"] = b * kw["samples_per_cell"] + b
            else:  # the target and the cycle's redraw
                measured["images"] = 2 * b
            return history

        setattr(module, fn_name, wrapper)
        try:
            params = {"bf16": bf16, "steps": args.steps, "classifier_epochs": 1}
            if name == "collagan":
                params.pop("classifier_epochs")
            method_class(name)(**{**params, **sets.get(name, {})}).fit(matrix)
        finally:
            setattr(module, fn_name, original)
        t = measured["t"]
        label = f"{name}, {'bf16' if bf16 else 'fp32'}" + (
            "" if variant == "default" else f", {variant}"
        )
        rows.append((label, measured["images"], t))
        print(
            f"  {label}: {measured['images'] / t:,.0f} images/s ({t * 1000:.0f} ms a step)",
            flush=True,
        )
    return rows


def quality(real, judge, steps, args):
    """FID (judge features) of 2,000 draws after `steps` steps at batch 128, reference vs ours."""
    from inkfill.metrics import fid

    real_f = judge.embed(((real[:4000, 0].numpy() + 1) * 127.5).round().astype(np.uint8))
    out = []
    for name in ("reference fp32", "inkfill bf16"):
        torch.manual_seed(0)
        start = time.perf_counter()
        if name.startswith("reference"):
            G, D = ReferenceG(), ReferenceD()
            reference_loop(G, D, real, steps)
        else:
            G, D = Generator(64, 32), Discriminator(32)
            rng = torch.Generator().manual_seed(0)
            train_module.train_gan(G, D, real, steps=steps, batch_size=128, rng=rng, bf16=True)
        took = time.perf_counter() - start
        G.eval()
        with torch.no_grad():
            fake = G(torch.randn(2000, 64, generator=torch.Generator().manual_seed(1)))
        fake = ((fake[:, 0].numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        out.append((name, took, fid(judge.embed(fake), real_f)))
        print(f"  {name}: {steps} steps in {took:.0f} s, FID {out[-1][2]:.2f}", flush=True)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=os.environ.get("INKFILL_DATA"))
    p.add_argument("--steps", type=int, default=40, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also time torch.compile")
    p.add_argument("--quality", type=int, default=0, metavar="STEPS")
    p.add_argument("--skip-methods", action="store_true")
    p.add_argument("--skip-dcgan", action="store_true", help="only the methods' rows")
    p.add_argument("--methods", default="embed-gan,encoder-gan,completion-gan,collagan")
    p.add_argument("--fp32", choices=("yes", "no"), default="yes", help="also time in fp32")
    p.add_argument(
        "--variant", action="append", metavar="PARAM=VALUE[,...]",
        help="config settings of the methods' rows (repeatable; 'default': none)",
    )  # fmt: skip
    args = p.parse_args()
    args.variant = args.variant or ["default"]
    torch.set_num_threads(os.cpu_count() or 1)
    data = load_dataset(args.data)
    from inkfill.data import WriterMatrix

    matrix = WriterMatrix(data)
    real = to_model(data.images, torch.device("cpu"))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {len(real):,} images; "
        f"median of {args.repeats} x {args.steps} steps",
        flush=True,
    )
    rows, base = ([], None) if args.skip_dcgan else dcgan_rows(real, args)
    if not args.skip_methods:
        rows += method_rows(matrix, args)
    print("\n| model | images/step | steps/s | images/s | vs reference |")
    print("|---|---:|---:|---:|---:|")
    for name, images, t in rows:
        ratio = "" if base is None else f"{images / t / base:.2f}x"
        print(f"| {name} | {images} | {1 / t:.1f} | {images / t:,.0f} | {ratio} |")
    if args.quality:
        from inkfill.bench import split_reference, train_judge
        from inkfill.config import FeatureConfig

        reduced, _ = matrix.holdout(200, seed=0)
        train_index, _ = split_reference(reduced, 0)
        judge, _ = train_judge(reduced, train_index, FeatureConfig(), 0, torch.device("cpu"))
        results = quality(real, judge, args.quality, args)
        print("\n| loop | steps (batch 128) | wall s | FID |")
        print("|---|---:|---:|---:|")
        for name, took, f in results:
            print(f"| {name} | {args.quality} | {took:.0f} | {f:.2f} |")


if __name__ == "__main__":
    main()
