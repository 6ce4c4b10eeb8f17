"""A bounded load test of `inkfill serve` on loopback: latency percentiles and errors.

    python benchmarks/load_test.py RUN_DIR [--requests 200] [--concurrency 8] [--n 16]

Serves RUN_DIR in-process on a free port and GETs generated cells of random (writer, label)
pairs, `--concurrency` at a time (plus one pass of the writer pages), as the viewer does.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inkfill.serve import LiveServer, create_app, load_test  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("--data", default=None)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--n", type=int, default=16, help="images per generated cell")
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    app = create_app(args.run, args.data)
    from urllib.parse import quote

    rng = random.Random(0)
    with LiveServer(app) as base:
        import json
        import urllib.request

        meta = json.loads(urllib.request.urlopen(f"{base}/api/info").read())
        writers = json.loads(urllib.request.urlopen(f"{base}/api/writers?limit=200").read())
        writers, labels = writers["writers"], meta["labels"]
        urls = [
            f"{base}/api/generate.png?writer={quote(rng.choice(writers))}"
            f"&label={rng.choice(labels)}&n={args.n}&seed={k}"
            for k in range(args.requests)
        ]
        stats = load_test(urls, args.concurrency)
        pages = load_test([f"{base}/api/writer?writer={quote(w)}" for w in writers[:100]],
                          args.concurrency)  # fmt: skip
    print(f"{meta['method']} run {args.run}, torch threads {torch.get_num_threads()}")
    print("| requests | concurrency | errors | p50 ms | p95 ms | p99 ms | max ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for name, s in ((f"generate n={args.n}", stats), ("writer pages", pages)):
        print(f"| {s['requests']} ({name}) | {args.concurrency} | {s['errors']} | {s['p50']:.1f} "
              f"| {s['p95']:.1f} | {s['p99']:.1f} | {s['max']:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
