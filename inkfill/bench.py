"""`inkfill bench`: hide whole observed cells, fit every method on the rest, fill the hidden cells
and score all methods on the same cells against the real images that were hidden.

The judge is a FeatureNet trained in-project on one half of every observed cell of the reduced
data; the other half are reference images that it never saw. Scores: writer retrieval (is the
fill recognisably writer i's?), label accuracy, FID and Inception Score in the judge's space, copy
rate and within-cell diversity, and the real ceiling (hidden real images in place of a fill).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import metrics
from .cas import TrainOnFills
from .completion import PrototypeRegression, cell_prototypes
from .config import BenchConfig, FeatureConfig, InkfillError
from .data import Dataset, HiddenCell, WriterMatrix, atomic_path, file_mode, to_model
from .methods import fill, method_class, reference_methods
from .methods.base import COLLAPSE_GAP, HISTORY_FILE, write_history, write_json
from .models import FeatureNet
from .plots import save_bar_chart, save_hidden_cells
from .progress import tqdm
from .train import train_feature_net

log = logging.getLogger(__name__)

FEATURE_VERSION = 1  # bump when FeatureNet or its training changes, to invalidate caches
CAS_SEED = 1_000_003  # the train-on-fills backbone: the judge's recipe with another seed


def cache_dir() -> Path:
    return Path(os.environ.get("INKFILL_CACHE", Path.home() / ".cache" / "inkfill"))


# ---------------------------------------------------------------------------------------------
# The judge


def split_reference(matrix: WriterMatrix, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the judge's training half and the reference half of every observed cell.

    A cell's images are shuffled (seeded) and the first ceil(n / 2) train the judge; a cell of one
    image has no reference image.
    """
    rng = np.random.default_rng(seed)
    train, reference = [], []
    for writer, label in matrix.cells(observed=True):
        idx = rng.permutation(matrix.indices(writer, label))
        k = (len(idx) + 1) // 2
        train.append(idx[:k])
        reference.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(reference))


class Judge:
    """A trained FeatureNet behind numpy in, numpy out: embeddings and label probabilities."""

    def __init__(self, net: FeatureNet, label_ids: np.ndarray, device: torch.device):
        self.net = net.eval().to(device)
        self.label_ids = label_ids
        self.device = device

    @torch.no_grad()
    def _run(self, images: np.ndarray, batch: int = 1024):
        embs, probs = [], []
        for s in range(0, len(images), batch):
            emb = self.net(to_model(images[s : s + batch], self.device))
            embs.append(emb.float().cpu())
            probs.append(torch.softmax(self.net.label_head(emb), dim=1).float().cpu())
        if not embs:
            dim = self.net.label_head.in_features
            return np.zeros((0, dim), np.float32), np.zeros((0, len(self.label_ids)), np.float32)
        return torch.cat(embs).numpy(), torch.cat(probs).numpy()

    def embed(self, images: np.ndarray) -> np.ndarray:
        return self._run(images)[0]

    def label_probs(self, images: np.ndarray) -> np.ndarray:
        return self._run(images)[1]


def train_judge(
    matrix: WriterMatrix,
    train_index: np.ndarray,
    config: FeatureConfig,
    seed: int,
    device: torch.device,
    progress: bool = False,
) -> tuple[Judge, dict]:
    """Train (or load from the cache) the judge on matrix.data[train_index]."""
    images = matrix.data.images[train_index]
    cols, rows = matrix.cols[train_index], matrix.rows[train_index]
    h = hashlib.sha256()
    for part in (images, cols.astype(np.int64), rows.astype(np.int64)):
        h.update(np.ascontiguousarray(part).tobytes())
    h.update(
        json.dumps(
            [asdict(config), seed, FEATURE_VERSION, matrix.n_labels, matrix.n_writers]
        ).encode()
    )
    key = h.hexdigest()[:20]
    path = cache_dir() / "judges" / f"{key}.safetensors"
    net = FeatureNet(matrix.n_labels, matrix.n_writers, config.width, config.dim)
    if path.exists():
        try:
            net.load_state_dict(load_file(str(path)))
            history = json.loads(path.with_suffix(".json").read_text())
            log.info("judge loaded from cache %s", path)
            return Judge(net, matrix.label_ids, device), {**history, "cached": True}
        except Exception as e:  # a damaged cache entry is retrained, never trusted
            log.warning("ignoring damaged judge cache %s: %s", path, e)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FeatureNet(matrix.n_labels, matrix.n_writers, config.width, config.dim).to(device)
        x = to_model(images, device)
        steps = config.epochs * max(1, len(x) // config.batch_size)
        with tqdm(total=steps, desc="judge", disable=not progress) as bar:
            history = train_feature_net(
                net, x, torch.as_tensor(cols, device=device), torch.as_tensor(rows, device=device),
                epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                rng=torch.Generator().manual_seed(seed), progress=bar,
            )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(path)
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(tmp))
    os.chmod(tmp, file_mode())
    os.replace(tmp, path)
    write_json(path.with_suffix(".json"), history)
    return Judge(net, matrix.label_ids, device), {**history, "cached": False}


# ---------------------------------------------------------------------------------------------
# Scoring


class Scorer:
    """Everything that does not depend on the method, computed once: the candidates of writer
    retrieval for each label, each hidden cell's halves, the copy-rate threshold."""

    def __init__(
        self,
        reduced: WriterMatrix,
        hidden: list[HiddenCell],
        reference: np.ndarray,
        judge: Judge,
        seed: int,
    ):
        self.reduced, self.hidden, self.judge = reduced, hidden, judge
        data = reduced.data
        ref_emb = judge.embed(data.images[reference])
        ref_rows, ref_cols = reduced.rows[reference], reduced.cols[reference]
        # Per label: the writers with reference images of it and their mean embedding.
        self.candidates: dict[int, np.ndarray] = {}
        for c in range(reduced.n_labels):
            mine = ref_cols == c
            rows = np.unique(ref_rows[mine])
            self.candidates[c] = (
                np.stack([ref_emb[mine & (ref_rows == r)].mean(0) for r in rows])
                if len(rows)
                else np.zeros((0, ref_emb.shape[1]))
            )
        rng = np.random.default_rng(seed)
        # Per hidden cell: half A stands in for a fill (the ceiling), half B is i's reference.
        self.halves = []
        for cell in hidden:
            perm = rng.permutation(len(cell.images))
            k = len(perm) // 2
            self.halves.append((cell.images[perm[:k]], cell.images[perm[k:]]))
        self.b_emb = [judge.embed(b) for _, b in self.halves]
        self.real_div = np.array([metrics.mean_pairwise_distance(c.images) for c in hidden])
        # and in what the judge sees (its embedding): a cell's images can differ in pixels and
        # still all be the same digit to a reader
        self.real_feature_div = np.array(
            [metrics.mean_pairwise_spread(judge.embed(c.images)) for c in hidden]
        )
        self._reference = (ref_emb, ref_rows, ref_cols, seed)
        self.b_all = np.concatenate(self.b_emb)
        # Copy rate: nearest training image of the same label, for every hidden real image.
        self.bank = {c: data.images[reduced.cols == c] for c in range(reduced.n_labels)}
        self.real_nn = np.concatenate(
            [
                metrics.nearest_distances(cell.images, self.bank[reduced.col(cell.label)])
                for cell in hidden
            ]
        )

    def predicted(self) -> np.ndarray:
        """Each hidden cell's prototype in the judge's space, predicted from its writer's other
        cells (reference halves; for a new writer, their few reference images) by a regression
        fitted across the reduced data's writers, each weighing as many images as its target cell
        has (for new writers, on rows of a few images each, as PrototypeRegression.fit_shots
        draws them)."""
        ref_emb, ref_rows, ref_cols, seed = self._reference
        r = self.reduced
        protos, counts = cell_prototypes(ref_emb, ref_rows, ref_cols, r.n_writers, r.n_labels)
        regression = PrototypeRegression(ref_emb.shape[1], seed=seed).fit(protos, counts)
        codes = regression.codes(protos)
        if any(h.reference is not None for h in self.hidden):
            regression.fit_shots(ref_emb, ref_rows, ref_cols, protos)
        out = []
        for h in self.hidden:
            if h.reference is None:
                row = codes[[r.row(h.writer)]]
            else:
                cols = np.asarray([r.col(int(v)) for v in h.reference_labels])
                mine, _ = cell_prototypes(
                    self.judge.embed(h.reference), np.zeros(len(cols), int), cols, 1, r.n_labels
                )
                row = regression.codes(mine)
            code = regression.predict(row, r.col(h.label), shots=h.reference is not None)
            out.append(regression.embed(code[0]))
        return np.stack(out)

    def rank_rows(self, queries: np.ndarray) -> dict:
        """Retrieval scores of one query embedding per hidden cell (no images)."""
        ranks, n_cand = [], []
        for k, (cell, query) in enumerate(zip(self.hidden, queries)):
            c = self.reduced.col(cell.label)
            candidates = np.concatenate([self.b_emb[k].mean(0, keepdims=True), self.candidates[c]])
            ranks.append(metrics.retrieval_rank(query, candidates, 0))
            n_cand.append(len(candidates))
        return {**metrics.summarise_ranks(ranks, n_cand), "ranks": [int(r) for r in ranks]}

    def score(self, fills: list[np.ndarray]) -> dict:
        """Scores of one method's fills, fills[k] being the images for hidden[k]."""
        ranks, n_cand, fid_parts, label_hits, nn, div, feature_div = [], [], [], [], [], [], []
        all_probs = []
        for k, (cell, images) in enumerate(zip(self.hidden, fills)):
            c = self.reduced.col(cell.label)
            emb, probs = self.judge._run(images)
            query = emb.mean(0)
            candidates = np.concatenate([self.b_emb[k].mean(0, keepdims=True), self.candidates[c]])
            ranks.append(metrics.retrieval_rank(query, candidates, 0))
            n_cand.append(len(candidates))
            fid_parts.append(emb[: len(self.halves[k][0])])  # as many as the ceiling's half A
            label_hits.append(probs.argmax(1) == c)
            all_probs.append(probs)
            nn.append(metrics.nearest_distances(images, self.bank[c]))
            div.append(metrics.mean_pairwise_distance(images))
            feature_div.append(metrics.mean_pairwise_spread(emb))
        out = metrics.summarise_ranks(ranks, n_cand)
        out.update(
            label_accuracy=float(np.concatenate(label_hits).mean()),
            fid=metrics.fid(np.concatenate(fid_parts), self.b_all),
            inception_score=metrics.inception_score(np.concatenate(all_probs)),
            copy_rate=metrics.copy_rate(np.concatenate(nn), self.real_nn),
            diversity=float(np.nanmean(div)),
            diversity_ratio=float(np.nanmedian(np.asarray(div) / self.real_div)),
            feature_diversity_ratio=float(
                np.nanmedian(np.asarray(feature_div) / self.real_feature_div)
            ),
            ranks=[int(r) for r in ranks],
        )
        return out

    def ceiling(self) -> dict:
        """The same scores with half A of each hidden cell standing in for a fill."""
        out = self.score([a for a, _ in self.halves])
        # Diversity and IS of the real cells use all their images, as the fills' use all of theirs.
        out["diversity"] = float(
            np.nanmean([metrics.mean_pairwise_distance(c.images) for c in self.hidden])
        )
        out["inception_score"] = metrics.inception_score(
            self.judge.label_probs(np.concatenate([c.images for c in self.hidden]))
        )
        out["copy_rate"] = metrics.copy_rate(self.real_nn, self.real_nn)
        out["diversity_ratio"] = 1.0
        out["feature_diversity_ratio"] = 1.0
        return out


# ---------------------------------------------------------------------------------------------
# The protocol


def run_bench(
    matrix: WriterMatrix,
    config: BenchConfig,
    out_dir: Path,
    device: torch.device,
    feature_config: FeatureConfig | None = None,
    method_params: dict[str, dict] | None = None,
    progress: bool = False,
    echo: Callable[[str], None] = lambda line: None,
) -> dict:
    """Run the whole protocol, writing DIR/results.{md,json}, DIR/figures, DIR/runs, DIR/fills."""
    feature_config = feature_config or FeatureConfig()
    names = [m.strip() for m in config.methods.split(",") if m.strip()]
    classes = [method_class(name) for name in names]  # unknown names fail before any work
    method_params = method_params or {}
    for name in method_params:
        if name not in names:
            raise InkfillError(f"--set {name}.*: {name} is not among --methods")
    methods = {
        name: cls(**{"seed": config.seed, **method_params.get(name, {})})
        for name, cls in zip(names, classes)
    }
    for m in methods.values():
        _ = m.config  # validate hyperparameters before any work
    new = config.new_writers > 0
    if new:
        cannot = [n for n, m in methods.items() if not hasattr(m, "generate_from_reference")]
        if cannot:
            raise InkfillError(
                f"--new-writers: {', '.join(cannot)} cannot fill writers they were not trained "
                f"on (methods that can: {', '.join(reference_methods())})"
            )
        reduced, hidden = matrix.leave_out_writers(config.new_writers, config.shots, config.seed)
        echo(f"left out {len(hidden)} writers, {config.shots} reference images each; "
             f"fitting on {len(reduced.data):,} images")  # fmt: skip
    else:
        reduced, hidden = matrix.holdout(config.hidden_cells, seed=config.seed)
        echo(f"hid {len(hidden)} cells ({sum(len(h.images) for h in hidden):,} images); "
             f"fitting on {len(reduced.data):,} images")  # fmt: skip
    train_index, reference = split_reference(reduced, config.seed)
    start = time.perf_counter()
    judge, judge_history = train_judge(
        reduced, train_index, feature_config, config.seed, device, progress
    )
    took = "cached" if judge_history["cached"] else f"{time.perf_counter() - start:.0f} s"
    echo(f"judge ({took}): training label acc {judge_history['label_acc'][-1]:.3f}, "
         f"writer acc {judge_history['writer_acc'][-1]:.3f}")  # fmt: skip
    scorer = Scorer(reduced, hidden, reference, judge, config.seed)
    cells = [(h.writer, h.label) for h in hidden]

    cas = None
    if config.cas and not new:
        start = time.perf_counter()
        backbone, _ = train_judge(
            reduced, train_index, feature_config, config.seed + CAS_SEED, device, progress
        )
        cas = TrainOnFills(
            reduced,
            np.asarray([reduced.row(h.writer) for h in hidden]),
            np.asarray([reduced.col(h.label) for h in hidden]),
            [b for _, b in scorer.halves],
            backbone.net,
            train_index,
            reference,
            config.seed,
            device,
        )
        echo(f"train-on-fills backbone ready ({time.perf_counter() - start:.0f} s)")
    rows = {"ceiling (real)": scorer.ceiling()}
    rows["predicted"] = scorer.rank_rows(scorer.predicted())
    echo(f"predicted (the cell's prototype regressed from the writer's other cells, no "
         f"images): MRR {rows['predicted']['mrr']:.3f}")  # fmt: skip
    fills: dict[str, list[np.ndarray]] = {}
    for name, method in methods.items():
        echo(f"{name}: fitting")
        start = time.perf_counter()
        method.fit(reduced, device=device, progress=progress)
        fit_s = time.perf_counter() - start
        method.save(out_dir / "runs" / name, extra={"bench": asdict(config)})
        write_history(out_dir / "runs" / name / HISTORY_FILE, getattr(method, "history_", {}))
        start = time.perf_counter()
        if new:
            filled = _fill_new(method, hidden, config.per_cell, config.seed)
        else:
            filled = fill(method, cells, config.per_cell, seed=config.seed)
        fill_s = time.perf_counter() - start
        filled.save(out_dir / "fills" / f"{name}.npz")
        fills[name] = [
            filled.images[k * config.per_cell : (k + 1) * config.per_cell]
            for k in range(len(cells))
        ]
        row = scorer.score(fills[name])
        row.update(fit_seconds=fit_s, fill_seconds=fill_s)
        if cas is not None:
            start = time.perf_counter()
            row.update(cas.score(fills[name]), cas_seconds=time.perf_counter() - start)
        if hasattr(method, "cluster_check"):
            check = method.cluster_check(reduced)["labels"]
            row["cluster_share"] = float(np.mean([r["generated_share"] for r in check]))
            row["cluster_share_real"] = float(np.mean([r["real_share"] for r in check]))
        rows[name] = row
        echo(f"{name}: MRR {row['mrr']:.3f}, top-1 {row['top1']:.3f}, "
             f"label acc {row['label_accuracy']:.3f}, FID {row['fid']:.2f} "
             f"(fit {fit_s:.0f} s, fill {fill_s:.2f} s)")  # fmt: skip
        warning = collapse_warning(name, row, rows["ceiling (real)"])
        if warning:
            row["warning"] = warning
            history = out_dir / "runs" / name / HISTORY_FILE
            log.warning("%s (loss history: %s)", warning, history)
            echo(f"warning: {warning} (loss history: {history})")

    if cas is not None:
        _cas_references(rows, cas, scorer, fills)
    results = {
        "config": asdict(config),
        "feature_config": asdict(feature_config),
        "method_params": {name: m.get_params() for name, m in methods.items()},
        "hidden_cells": [
            {"writer": h.writer, "label": h.label, "n_real": len(h.images)} for h in hidden
        ],
        "judge": {k: v for k, v in judge_history.items()},
        "rows": rows,
    }
    write_json(out_dir / "results.json", results)
    md = results_markdown(results)
    tmp = atomic_path(out_dir / "results.md")
    tmp.write_text(md)
    os.replace(tmp, out_dir / "results.md")
    pick = np.random.default_rng(config.seed).permutation(len(hidden))[: config.figure_cells]
    save_hidden_cells(
        [hidden[k] for k in sorted(pick)],
        {name: [fills[name][k] for k in sorted(pick)] for name in fills},
        out_dir / "figures" / "hidden_cells.png",
    )
    save_bar_chart(
        {
            name: row["mrr"]
            for name, row in rows.items()
            if name != "ceiling (real)" and "mrr" in row
        },
        out_dir / "figures" / "mrr.png",
        ceiling=rows["ceiling (real)"]["mrr"],
        chance=rows["ceiling (real)"]["chance_mrr"],
        ylabel="writer-retrieval MRR",
    )
    if cas is not None:
        save_bar_chart(
            {name: row["writer_cas_top1"] for name, row in rows.items() if name in fills},
            out_dir / "figures" / "writer_cas.png",
            ceiling=rows["ceiling (real)"]["writer_cas_top1"],
            chance=rows["no fill"]["writer_cas_top1"],
            ylabel="writer CAS top-1 (train on fills)",
            ceiling_label="real half A as fills",
            chance_label="no fill",
        )
    return results


def collapse_warning(name: str, row: dict, ceiling: dict) -> str | None:
    """A warning when the judge reads a method's fills as their label COLLAPSE_GAP less often
    than the hidden cells' real images (a collapsed fit, not just a weak method)."""
    acc, real = row["label_accuracy"], ceiling["label_accuracy"]
    if acc >= real - COLLAPSE_GAP:
        return None
    return (
        f"the judge reads only {acc:.0%} of {name}'s fills as their label (the hidden cells' "
        f"real images: {real:.0%}): its fit has likely collapsed, or it is not trained enough "
        f"(its loss history is kept beside its run in runs/{name}/{HISTORY_FILE})"
    )


def _cas_references(rows: dict, cas: TrainOnFills, scorer: Scorer, fills: dict) -> None:
    """The rows the train-on-fills scores are read against: no fills at all, the real half A of
    each hidden cell as the fills (the ceiling), as many real images of other cells as the fills
    (label CAS), and the shared label head before fine-tuning.

    The ceiling's label CAS trains on half A of each hidden cell drawn with replacement up to as
    many images as a fill has: what a perfect generator of these cells would teach. It sees only
    the hidden cells' writers, where `label_cas_real` sees as many images of every writer."""
    halves = [a for a, _ in scorer.halves]
    emb = [cas.embed(a) for a in halves]  # its label CAS comes below, on half A drawn to size
    rows["ceiling (real)"].update({**cas.writer_cas(emb), **cas.personalization(emb)})
    rows["no fill"] = cas.score(None)
    shared = cas.shared()
    rows["no fill"]["shared_missing_acc"] = shared["personal_missing_acc"]
    rows["no fill"]["shared_other_acc"] = shared["personal_other_acc"]
    if fills:
        first = next(iter(fills.values()))
        rows["no fill"]["label_cas_real"] = cas.label_cas_real(first)
        rng = np.random.default_rng(cas.seed)
        drawn = [a[rng.choice(len(a), len(f))] if len(a) else a for a, f in zip(halves, first)]
        rows["ceiling (real)"]["label_cas"] = cas.label_cas(drawn)["label_cas"]


def _fill_new(method, hidden: list[HiddenCell], per_cell: int, seed: int) -> Dataset:
    """Each left-out writer's hidden cell, filled from their few reference images."""
    parts = []
    for h in hidden:
        images = method.generate_from_reference(
            h.reference, h.reference_labels, h.label, per_cell, seed, h.writer
        )
        parts.append(Dataset(images, np.full(per_cell, h.label), np.full(per_cell, h.writer)))
    return Dataset.concat(parts)


COLUMNS = [
    ("mrr", "MRR", "{:.3f}"),
    ("top1", "top-1", "{:.3f}"),
    ("top5", "top-5", "{:.3f}"),
    ("median_rank", "median rank", "{:.0f}"),
    ("label_accuracy", "label acc", "{:.3f}"),
    ("fid", "FID", "{:.2f}"),
    ("inception_score", "IS", "{:.2f}"),
    ("copy_rate", "copy rate", "{:.3f}"),
    ("diversity", "diversity", "{:.2f}"),
    ("diversity_ratio", "div ratio", "{:.2f}"),
    ("feature_diversity_ratio", "feature div ratio", "{:.2f}"),
    ("fit_seconds", "fit s", "{:.0f}"),
    ("fill_seconds", "fill s", "{:.2f}"),
]


def results_markdown(results: dict) -> str:
    """The results table (one row per method plus the real ceiling) with a short legend."""
    cfg = results["config"]
    rows = results["rows"]
    ceiling = rows["ceiling (real)"]
    what = f"{len(results['hidden_cells'])} hidden cells"
    if cfg.get("new_writers"):
        what = f"{cfg['new_writers']} new writers ({cfg['shots']} reference images each)"
    lines = [
        f"# inkfill bench: {what}, {cfg['per_cell']} images each, seed {cfg['seed']}",
        "",
        "| method | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
        "|---|" + "---:|" * len(COLUMNS),
    ]
    for name, row in rows.items():
        if name != "no fill":
            lines.append(_table_row(name, row, COLUMNS))
    lines += [
        f"\n**Warning, {name}:** {row['warning']}."
        for name, row in rows.items()
        if "warning" in row
    ]
    checks = [(n, r) for n, r in rows.items() if "cluster_share" in r]
    lines += [
        "",
        f"Writer retrieval ranks writer i among {ceiling['candidates']:.0f} candidates on average "
        f"(chance MRR {ceiling['chance_mrr']:.3f}). The ceiling row scores half of each hidden "
        "cell's real images as if they were a fill; FID compares each fill (as many images per "
        "cell as that half) with the other half; IS uses the judge's label head; copy rate is the "
        "share of images nearer to a training image than 95% of real held-out images are (real: "
        "0.05). Diversity is the mean pairwise pixel distance of a cell's images; div ratio the "
        "median over cells of a fill's diversity over the real hidden cell's; feature div ratio "
        "the same in the judge's embedding (what a reader sees: pixels can differ while the "
        "images stay one drawing). `predicted` ranks "
        "the hidden cell's prototype as predicted in the judge's space from the writer's other "
        "cells by a ridge regression fitted across writers, each weighted by the images of their "
        "target cell (no images): how predictable a cell is.",
    ]
    for name, row in checks:
        lines.append(
            f"{name} cluster check: generated share {row['cluster_share']:.3f}, "
            f"real images {row['cluster_share_real']:.3f}."
        )
    if "no fill" in rows:
        lines += cas_markdown(rows)
    return "\n".join(lines) + "\n"


CAS_COLUMNS = [
    ("writer_cas_top1", "writer CAS top-1", "{:.3f}"),
    ("writer_cas_top5", "writer CAS top-5", "{:.3f}"),
    ("label_cas", "label CAS", "{:.3f}"),
    ("personal_missing_acc", "personal: missing label", "{:.3f}"),
    ("personal_other_acc", "personal: other labels", "{:.3f}"),
    ("cas_seconds", "s", "{:.0f}"),
]


def _table_row(label: str, row: dict, columns: list) -> str:
    """One markdown table row: the row's value of each column, blank where it has none."""
    cells = [fmt.format(row[key]) if key in row else "" for key, _, fmt in columns]
    return f"| {label} | " + " | ".join(cells) + " |"


def cas_markdown(rows: dict) -> list[str]:
    """The train-on-fills table and its legend."""
    none = rows["no fill"]
    lines = [
        "",
        "## Train on fills, test on real",
        "",
        "| fills | " + " | ".join(title for _, title, _ in CAS_COLUMNS) + " |",
        "|---|" + "---:|" * len(CAS_COLUMNS),
    ]
    order = ["no fill", "ceiling (real)"] + [n for n in rows if n not in ("no fill", "predicted")]
    for name in dict.fromkeys(order):
        row = rows[name]
        if "writer_cas_top1" not in row:
            continue
        label = {"ceiling (real)": "real (half A of the cell)"}.get(name, name)
        lines.append(_table_row(label, row, CAS_COLUMNS))
    lines += [
        "",
        "Writer CAS: a linear writer classifier on a frozen CNN (the judge's recipe, another "
        "seed), trained on the reduced data plus the row's fills of the hidden cells, tested on "
        "half B of the real hidden cells (which writer wrote this?). Label CAS: a small CNN "
        "trained from scratch on the fills alone, tested on 5,000 real images of other cells; "
        "the same CNN on as many real images of the same labels scores "
        f"{none.get('label_cas_real', float('nan')):.3f} (the real row: half A of the hidden "
        "cells drawn with replacement to as many images, only the hidden cells' writers). "
        "Personalization: per writer with a "
        "hidden cell, the shared label head fine-tuned on half of the writer's own images plus the "
        "fills, tested on the hidden cell's half B (missing label) and on the writer's other "
        "half (other labels); before fine-tuning the shared head scores "
        f"{none.get('shared_missing_acc', float('nan')):.3f} / "
        f"{none.get('shared_other_acc', float('nan')):.3f}.",
    ]
    return lines
