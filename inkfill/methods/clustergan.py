"""cluster-gan: the seed's approach 3, "cluster-GAN-cluster" (Fang, sections 6.3 and 8).

Cluster writers per label (KMeans), pick the cluster of label j that writer i's related writers
fall in most (the voting map), generate from a DCGAN trained on that (label, cluster)'s images,
and check with the clustering that generated images land in the intended cluster.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import torch

from ..cluster import WriterClustering, vote_accuracy
from ..config import ClusterGANConfig
from ..data import WriterMatrix, label_name, to_images, to_model
from ..metrics import mean_pairwise_distance, share_in
from ..models import Discriminator, Generator
from ..plots import save_loss_curves, save_real_fake, save_tradeoff
from ..progress import tqdm
from ..train import train_gan
from .base import INFER_CHUNK, Method, cell_generator, cell_seed

log = logging.getLogger(__name__)


class ClusterGAN(Method):
    name = "cluster-gan"
    data_parallel = True  # every network trains in train.train_gan
    Config = ClusterGANConfig

    # -- fitting -------------------------------------------------------------------------------

    def _fit(self, matrix: WriterMatrix, progress: bool) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            with self._phase("clustering"):
                self.clusters_ = WriterClustering(
                    self.n_clusters, self.n_components, self.vote_rule, random_state=self.seed
                ).fit(matrix)
            self._set_offsets()
            real = to_model(matrix.data.images, self.device_)
            clusters = torch.as_tensor(
                self.clusters_.assign_[matrix.rows, matrix.cols], device=self.device_
            )
            cols = torch.as_tensor(matrix.cols, device=self.device_)
            self.history_: dict[str, dict] = {}
            with self._phase("gan"):
                if self.generator == "conditional":
                    self._fit_conditional(real, cols, clusters, progress)
                else:
                    self._fit_per_cluster(real, cols, clusters, progress)

    def _set_offsets(self) -> None:
        sizes = [lab.n_clusters for lab in self.clusters_.labels_]
        self.offsets_ = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def _train(self, G, D, real, classes, steps, name, bar, batch_size=None, negatives=None):
        modules = {"g": G, "d": D}
        done = self._finished(name, modules)
        if done is not None:  # trained before an interruption: loaded, not retrained
            self.history_[name] = done
            bar.update(steps)
            return
        rng = torch.Generator().manual_seed(cell_seed(self.seed, "train", name))
        self.history_[name] = train_gan(
            G, D, real, classes, steps=steps, batch_size=batch_size or self.batch_size,
            lr=self.lr, beta1=self.beta1, rng=rng, bf16=self.bf16, progress=bar,
            negatives=negatives, negative_weight=self.conditional_negative_weight
            if self.generator == "conditional" else self.negative_weight,
            checkpoint=self._loop(name, modules),
        )  # fmt: skip
        self._finish(name, modules, self.history_[name])

    def _fit_conditional(self, real, cols, clusters, progress) -> None:
        n_classes = int(self.offsets_[-1])
        classes = torch.as_tensor(self.offsets_, device=self.device_)[cols] + clusters
        G = Generator(self.nz, self.ngf, n_classes=n_classes).to(self.device_)
        D = Discriminator(self.ndf, n_classes=n_classes).to(self.device_)
        # Negatives: real images paired with another cluster of their own label (a mismatch of
        # style, not of digit), for labels with more than one cluster.
        k_of = torch.as_tensor(np.diff(self.offsets_), device=self.device_)[cols]  # (N,)
        can = k_of > 1

        def mismatched(idx, rng):
            idx = idx[: len(idx) // 2]  # half a batch is enough and keeps the step cheap
            idx = idx[can[idx]]
            shift = (
                torch.rand(len(idx), generator=rng).to(self.device_) * (k_of[idx] - 1)
            ).long() + 1
            other = (clusters[idx] + shift) % k_of[idx]
            return real[idx], classes[idx] - clusters[idx] + other

        with tqdm(total=self.steps, desc="cluster-gan conditional", disable=not progress) as bar:
            self._train(G, D, real, classes, self.steps, "conditional", bar, negatives=mismatched)
        self.generators_ = {"conditional": G}

    def _sampler(self, others: torch.Tensor):
        """Negatives for one (label, cluster) DCGAN: random real images of the label's other
        clusters, which its discriminator learns to reject as well as the fakes."""
        if not len(others):
            return None

        def negatives(idx: torch.Tensor, rng: torch.Generator):
            pick = torch.randint(len(others), (len(idx),), generator=rng).to(others.device)
            return others[pick], None

        return negatives

    def _fit_per_cluster(self, real, cols, clusters, progress) -> None:
        n_labels = len(self.clusters_.labels_)
        n_gans = int(self.offsets_[-1])
        if self.warm_start:
            total = n_labels * self.label_steps + n_gans * self.cluster_steps
        else:
            total = n_gans * (self.label_steps + self.cluster_steps)
        self.generators_ = {}
        with tqdm(total=total, desc="cluster-gan per-cluster", disable=not progress) as bar:
            for c, lab in enumerate(self.clusters_.labels_):
                label = int(self.clusters_.label_ids_[c])
                in_label = cols == c
                if self.warm_start:
                    G0, D0 = Generator(self.nz, self.ngf), Discriminator(self.ndf)
                    G0, D0 = G0.to(self.device_), D0.to(self.device_)
                    self._train(G0, D0, real[in_label], None, self.label_steps, f"{label}", bar)
                for k in range(lab.n_clusters):
                    mine = in_label & (clusters == k)
                    negatives = self._sampler(real[in_label & (clusters != k)])
                    if self.warm_start:
                        G, D, steps = copy.deepcopy(G0), copy.deepcopy(D0), self.cluster_steps
                    else:
                        G, D = Generator(self.nz, self.ngf), Discriminator(self.ndf)
                        G, D = G.to(self.device_), D.to(self.device_)
                        steps = self.label_steps + self.cluster_steps
                    name = f"{label}.{k}"
                    self._train(
                        G, D, real[mine], None, steps, name, bar, self.cluster_batch_size, negatives
                    )
                    self.generators_[f"{label}.{k}"] = G
                    log.debug("trained %s.%d on %d images", label, k, int(mine.sum()))

    # -- sampling ------------------------------------------------------------------------------

    def _generate(self, writer: str, label: int, n: int, rng: torch.Generator) -> np.ndarray:
        cluster = self.clusters_.vote(writer, label).cluster
        return self.sample(label, cluster, n, rng)

    @torch.no_grad()
    def _generate_cells(self, cells, n, seed):
        psi = self.truncation
        pairs = [(label, self.clusters_.vote(writer, label).cluster) for writer, label in cells]
        z = psi * torch.cat([torch.randn(n, self.nz, generator=cell_generator(seed, w, lab))
                             for w, lab in cells])  # fmt: skip
        if self.generator == "conditional":
            classes = torch.as_tensor(
                [int(self.offsets_[self.matrix_.col(lab)]) + k for lab, k in pairs]
            ).repeat_interleave(n)
            images = self._forward(self.generators_["conditional"], z, classes)
        else:  # one forward pass per (label, cluster) generator, over all its cells
            images = np.zeros((len(z), 28, 28), np.uint8)
            owner = np.repeat(np.array([f"{lab}.{k}" for lab, k in pairs]), n)
            for key in np.unique(owner):
                at = torch.as_tensor(np.flatnonzero(owner == key))
                images[at.numpy()] = self._forward(self.generators_[str(key)], z[at])
        return list(images.reshape(len(cells), n, 28, 28))

    def _forward(self, G, z, classes=None, chunk: int = INFER_CHUNK) -> np.ndarray:
        out = []
        with self._inference():
            for s in range(0, len(z), chunk):
                c = None if classes is None else classes[s : s + chunk].to(self.device_)
                out.append(to_images(G(z[s : s + chunk].to(self.device_), c)))
        return np.concatenate(out) if out else np.zeros((0, 28, 28), np.uint8)

    @torch.no_grad()
    def sample(
        self,
        label: int,
        cluster: int,
        n: int,
        rng: torch.Generator,
        truncation: float | None = None,
    ) -> np.ndarray:
        """n images from the generator of (label, cluster): uint8 (n, 28, 28)."""
        psi = self.truncation if truncation is None else truncation
        z = (psi * torch.randn(n, self.nz, generator=rng)).to(self.device_)
        if self.generator == "conditional":
            c = self.matrix_.col(label)
            classes = torch.full((n,), int(self.offsets_[c]) + cluster, device=self.device_)
            return self._forward(self.generators_["conditional"], z, classes)
        return self._forward(self.generators_[f"{label}.{cluster}"], z)

    # -- the seed's check ----------------------------------------------------------------------

    def cluster_check(
        self,
        matrix: WriterMatrix,
        n_per_cluster: int = 200,
        truncations: tuple[float, ...] = (1.0,),
        seed: int = 0,
        progress: bool = False,
    ) -> dict:
        """For every (label, cluster): the share of generated images that the clustering assigns to
        the cluster they were generated for, beside the same share for the cluster's own real
        images, and the mean pairwise distance (diversity) of both. Per label: means over its
        clusters. One entry per truncation value, so the share/diversity trade-off is visible.
        """
        self.check_fitted()
        rows = []
        todo = [
            (c, k) for c, lab in enumerate(self.clusters_.labels_) for k in range(lab.n_clusters)
        ]
        for c, k in tqdm(todo, desc="cluster check", disable=not progress):
            lab = self.clusters_.labels_[c]
            label = int(self.clusters_.label_ids_[c])
            mine = (matrix.cols == c) & (self.clusters_.assign_[matrix.rows, c] == k)
            real = matrix.data.images[mine]
            row = {
                "label": label,
                "cluster": k,
                "n_writers": int((self.clusters_.assign_[:, c] == k).sum()),
                "n_real": len(real),
                "real_share": share_in(lab.predict(real), k),
                "real_diversity": mean_pairwise_distance(real),
                "generated": {},
            }
            for psi in truncations:
                rng = torch.Generator().manual_seed(cell_seed(seed, f"check:{psi}", f"{label}.{k}"))
                fake = self.sample(label, k, n_per_cluster, rng, truncation=psi)
                row["generated"][str(psi)] = {
                    "share": share_in(lab.predict(fake), k),
                    "diversity": mean_pairwise_distance(fake),
                }
            rows.append(row)
        return {"clusters": rows, "labels": summarise_check(rows, truncations)}

    def evaluate(self, matrix: WriterMatrix, progress: bool = False) -> dict:
        truncations = tuple(sorted({self.truncation, *CHECK_TRUNCATIONS}, reverse=True))
        n_clusters = [lab.n_clusters for lab in self.clusters_.labels_]
        return {
            "cluster_check": self.cluster_check(matrix, truncations=truncations, progress=progress),
            "vote_check": vote_accuracy(self.clusters_.assign_, n_clusters, self.vote_rule),
        }

    def format_metrics(self, metrics: dict) -> str:
        v = metrics["vote_check"]
        votes = (
            f"voting map, leave one label out over {v['cells']:,} observed cells: recovers the "
            f"writer's own cluster {v['accuracy']:.3f} of the time (biggest cluster "
            f"{v['majority_accuracy']:.3f}, size-weighted chance {v['chance_accuracy']:.3f})"
        )
        return format_check(metrics["cluster_check"]["labels"], self.truncation) + "\n\n" + votes

    def save_figures(self, matrix: WriterMatrix, out_dir: Path, level: str, metrics: dict) -> None:
        rng = np.random.default_rng(self.seed)
        for c, lab in enumerate(self.clusters_.labels_):
            label = int(self.clusters_.label_ids_[c])
            in_label = matrix.cols == c
            real = matrix.data.images[in_label]
            real = real[rng.permutation(len(real))[:64]]
            # The no-cluster view (seed Figure 9): clusters drawn in proportion to their images.
            sizes = np.bincount(
                self.clusters_.assign_[matrix.rows[in_label], c], minlength=lab.n_clusters
            )
            picks = np.bincount(
                rng.choice(lab.n_clusters, 64, p=sizes / sizes.sum()), minlength=lab.n_clusters
            )
            gen = torch.Generator().manual_seed(cell_seed(self.seed, "figure", label))
            fake = np.concatenate(
                [self.sample(label, k, int(n), gen) for k, n in enumerate(picks) if n]
            )
            fake = fake[rng.permutation(len(fake))]
            name = label_name(label)
            save_real_fake(real, fake, out_dir / f"label_{name}.png", f"label {name}, all clusters")
            if self.generator == "per-cluster":
                curves = {
                    key: h for key, h in self.history_.items() if key.split(".")[0] == str(label)
                }
                save_loss_curves(
                    curves,
                    out_dir / "losses" / f"label_{name}.png",
                    f"label {name}: G and D losses",
                )
            if level == "all":
                for k in range(lab.n_clusters):
                    mine = in_label & (self.clusters_.assign_[matrix.rows, c] == k)
                    real_k = matrix.data.images[mine][:64]
                    fake_k = self.sample(
                        label,
                        k,
                        64,
                        torch.Generator().manual_seed(
                            cell_seed(self.seed, "figure", f"{label}.{k}")
                        ),
                    )
                    title = f"label {name}, cluster {k} ({int(mine.sum())} real images)"
                    save_real_fake(
                        real_k,
                        fake_k,
                        out_dir / "clusters" / f"label_{name}_cluster_{k}.png",
                        title,
                    )
        if self.generator == "conditional":
            save_loss_curves(
                self.history_,
                out_dir / "losses" / "conditional.png",
                "conditional DCGAN: G and D losses",
            )
        if "cluster_check" in metrics:
            save_tradeoff(
                metrics["cluster_check"]["labels"],
                out_dir / "cluster_check_tradeoff.png",
                SEED_SHARES,
            )

    # -- state ---------------------------------------------------------------------------------

    def _modules(self):
        return list(getattr(self, "generators_", {}).values())

    def _state(self):
        tensors = {
            f"clusters.{k}": torch.from_numpy(np.ascontiguousarray(v))
            for k, v in self.clusters_.state().items()
        }
        for name, G in self.generators_.items():
            for key, value in G.state_dict().items():
                tensors[f"generator.{name}.{key}"] = value
        return tensors, {"generators": sorted(self.generators_)}

    def _set_state(self, tensors, config):
        state = {
            k[len("clusters.") :]: v.numpy()
            for k, v in tensors.items()
            if k.startswith("clusters.")
        }
        self.clusters_ = WriterClustering.from_state(
            {"n_clusters": self.n_clusters, "n_components": self.n_components,
             "vote_rule": self.vote_rule, "random_state": self.seed},
            state, self.matrix_.writer_ids, self.matrix_.label_ids,
        )  # fmt: skip
        self._set_offsets()
        self.generators_ = {}
        for name in config["generators"]:
            n_classes = int(self.offsets_[-1]) if name == "conditional" else 0
            G = Generator(self.nz, self.ngf, n_classes=n_classes)
            prefix = f"generator.{name}."
            G.load_state_dict(
                {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            )
            self.generators_[name] = G.eval()


def summarise_check(rows: list[dict], truncations) -> list[dict]:
    """Per label and truncation: mean shares and diversities over the label's clusters."""
    out = []
    for label in sorted({r["label"] for r in rows}):
        mine = [r for r in rows if r["label"] == label]
        real_share = float(np.mean([r["real_share"] for r in mine]))
        real_div = float(np.nanmean([r["real_diversity"] for r in mine]))
        for psi in truncations:
            gen = [r["generated"][str(psi)] for r in mine]
            gen_div = float(np.nanmean([g["diversity"] for g in gen]))
            out.append(
                {
                    "label": label,
                    "truncation": psi,
                    "n_clusters": len(mine),
                    "real_share": real_share,
                    "generated_share": float(np.mean([g["share"] for g in gen])),
                    "real_diversity": real_div,
                    "generated_diversity": gen_div,
                    "diversity_ratio": gen_div / real_div if real_div else float("nan"),
                }
            )
    return out


CHECK_TRUNCATIONS = (1.0, 0.8, 0.6, 0.4, 0.2)
SEED_SHARES = {0: 0.80, 2: 0.85}  # the seed's reported check: digit 0 >= 80%, digit 2 >= 85%


def format_check(rows: list[dict], truncation: float) -> str:
    """The cluster check as a table at `truncation`, then the trade-off over all truncations.

    A label is on target when its generated share is at least its real images' share and its
    diversity is within 20% of theirs.
    """
    lines = [
        f"cluster check at truncation {truncation:g}: share of images in their own cluster",
        "label  clusters  real share  gen share  real div  gen div  div ratio",
    ]
    for r in (r for r in rows if r["truncation"] == truncation):
        lines.append(
            f"{label_name(r['label']):>5}  {r['n_clusters']:>8}  {r['real_share']:>10.3f}  "
            f"{r['generated_share']:>9.3f}  {r['real_diversity']:>8.2f}  "
            f"{r['generated_diversity']:>7.2f}  {r['diversity_ratio']:>9.2f}"
        )
    lines += [
        "",
        "truncation  mean gen share  mean div ratio  labels on target  seed's shares met",
    ]
    for psi in sorted({r["truncation"] for r in rows}, reverse=True):
        at = [r for r in rows if r["truncation"] == psi]
        ok = sum(
            r["generated_share"] >= r["real_share"] and abs(r["diversity_ratio"] - 1) <= 0.2
            for r in at
        )
        seed = [r for r in at if r["label"] in SEED_SHARES]
        met = all(r["generated_share"] >= SEED_SHARES[r["label"]] for r in seed) if seed else False
        lines.append(
            f"{psi:>10g}  {np.mean([r['generated_share'] for r in at]):>14.3f}  "
            f"{np.mean([r['diversity_ratio'] for r in at]):>14.2f}  {ok:>9} of {len(at):<3}  "
            f"{'yes' if met else 'no':>17}"
        )
    return "\n".join(lines)
