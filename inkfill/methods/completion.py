"""Complete the writers x labels matrix in a style space, then render (the seed's section 5.1).

Both methods here share one style space: a label+writer classifier trained on the training images
(personal.train_classifier), each observed cell summed up by its prototype (mean embedding), and a
ridge regression per label, refined for picking the writer out (InfoNCE, `rank_steps`), that
predicts a cell's prototype from the writer's other cells (completion.PrototypeRegression).

- predicted-retrieval: real images of the label, of other writers, near the predicted
  prototype: of the `neighbours` nearest, the set whose spread is theirs moved onto the
  prediction (kernel herding, as below). A reference a generator must beat with new images.
- completion-gan: a generator G(z, style(predicted code, label), label) trained on the task it is
  tested on: a training cell is drawn from its prototype as predicted *without* it (out-of-fold
  regressions) or from its real prototype, and the m draws are compared with the real cell: mean
  embedding (feature loss), rank among the label's writers (InfoNCE), spread (pixel distance
  between draws, against the real cell's), plus the cVAE and adversarial terms
  (train.CellLoss in the loop of every personal generator, train.train_personal_gan).
  A fill keeps, of `candidates` noises per image, the set that spreads like the real images of
  the label nearest the cell's predicted prototype, moved onto it (kernel herding; or, with
  herd_to="mean", the set whose mean code is nearest the predicted code), scoring each candidate
  by the embedding a small network (models.DrawPredictor, fitted after the GAN) predicts for its
  draw, so that only the kept images are drawn.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from .. import distributed, metrics
from ..completion import PrototypeRegression, cell_prototypes
from ..config import CompletionGANConfig, InkfillError, PredictedRetrievalConfig
from ..data import ModelImages, WriterMatrix, to_images
from ..models import (
    CodeStyle,
    DrawPredictor,
    FeatureNet,
    PersonalDiscriminator,
    PersonalGenerator,
    PosteriorEncoder,
    folded,
)
from ..progress import tqdm
from ..train import EMA, CellLoss, recalibrate_batch_norm, train_personal_gan
from .base import (
    COLLAPSE_GAP,
    INFER_CHUNK,
    Method,
    blank_margin,
    cell_generator,
    cell_seed,
    save_generator_figures,
)
from .personal import _CellSampler, _PersonalGAN, embed_images, train_classifier


class _StyleSpace(Method):
    """The shared part: classifier, prototypes, regressions, each cell's predicted code."""

    data_parallel = True  # the classifier and the GAN average their gradients under torchrun

    def _fit_space(self, matrix: WriterMatrix, progress: bool) -> None:
        with self._phase("classifier"):
            self.classifier_ = train_classifier(
                self, matrix, progress, self.classifier_width, bf16=self.classifier_bf16
            )
        with self._phase("embeddings"):
            emb = embed_images(self.classifier_, matrix.data.images, self.device_).cpu().numpy()
        with self._phase("regressions"):
            protos, counts = cell_prototypes(
                emb, matrix.rows, matrix.cols, matrix.n_writers, matrix.n_labels
            )
            self.regression_ = PrototypeRegression(
                self.n_components,
                seed=self.seed,
                rank_steps=self.rank_steps,
                rank_temperature=self.rank_temperature,
            ).fit(protos, counts)
            self.regression_.fit_shots(emb, matrix.rows, matrix.cols, protos)
            self.codes_ = self.regression_.codes(protos)  # (W, L, k), NaN where empty
            self.predicted_ = self.regression_.predict_all(self.codes_)  # (W, L, k)
        self.embeddings_, self.protos_, self.counts_ = emb, protos, counts

    def _reference_codes(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """The (1, n_labels, k) code row of a writer known only from `images` with `labels`."""
        cols = np.asarray([self.matrix_.col(int(v)) for v in labels])
        emb = embed_images(self.classifier_, images, self.device_).cpu().numpy()
        protos, _ = cell_prototypes(
            emb, np.zeros(len(cols), int), cols, 1, len(self.matrix_.label_ids)
        )
        return self.regression_.codes(protos)

    def _space_state(self) -> dict[str, torch.Tensor]:
        tensors = {f"classifier.{k}": v for k, v in self.classifier_.state_dict().items()}
        tensors.update(
            {f"regression.{k}": torch.from_numpy(v) for k, v in self.regression_.state().items()}
        )
        tensors["predicted"] = torch.from_numpy(np.ascontiguousarray(self.predicted_, np.float32))
        return tensors

    def _set_space(self, tensors: dict[str, torch.Tensor]) -> None:
        n_labels, n_writers = len(self.matrix_.label_ids), len(self.matrix_.writer_ids)
        width = tensors["classifier.body.0.weight"].shape[0]
        self.classifier_ = FeatureNet(n_labels, n_writers, width=width, dim=128)
        self.classifier_.load_state_dict(
            {k[11:]: v for k, v in tensors.items() if k.startswith("classifier.")}
        )
        self.classifier_.eval()
        self.regression_ = PrototypeRegression.from_state(
            {k[11:]: v.numpy() for k, v in tensors.items() if k.startswith("regression.")}
        )
        self.predicted_ = tensors["predicted"].numpy()


class PredictedRetrieval(_StyleSpace):
    """Real images of label j, of writers other than i, near (in the classifier's embedding) the
    prototype of (i, j) predicted from i's other cells, spread as real images of that style are
    (see _picked)."""

    name = "predicted-retrieval"
    Config = PredictedRetrievalConfig

    def _fit(self, matrix, progress):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self._fit_space(matrix, progress)
        self.rows_ = matrix.rows.astype(np.int64)
        self.cols_ = matrix.cols.astype(np.int64)
        self.images_ = matrix.data.images
        del self.protos_, self.counts_

    def _picked(self, code: np.ndarray, col: int, n: int, row: int = -1) -> np.ndarray:
        """n real images of label column `col`, of writers other than row `row`, for the
        predicted code `code` (k,): the n nearest its prototype, or, with `neighbours` > n, n of
        the `neighbours` nearest picked by kernel herding toward those same images moved so that
        their mean is the prediction (the spread of real images of that style, centred on it)."""
        pool = np.flatnonzero((self.cols_ == col) & (self.rows_ != row))
        proto = self.regression_.embed(code)
        d = ((self.embeddings_[pool] - proto) ** 2).sum(1)
        order = pool[np.argsort(d, kind="stable")]
        if self.neighbours <= n or len(order) <= n:
            return self.images_[order[np.arange(n) % len(order)]]
        near = order[: self.neighbours]
        near_codes = torch.from_numpy(self.regression_.codes(self.embeddings_[near])).double()
        target = near_codes - near_codes.mean(0) + torch.from_numpy(code).double()
        picks = kernel_herd(near_codes[None], target[None], n)[0].numpy()
        return self.images_[near[picks]]

    def _generate(self, writer, label, n, rng):
        row, col = self.matrix_.row(writer), self.matrix_.col(label)
        return self._picked(self.predicted_[row, col], col, n, row)

    def generate_from_reference(self, images, labels, label, n, seed=0, name="new"):
        self.check_fitted()
        col = self.matrix_.col(label)
        codes = self._reference_codes(images, labels)
        return self._picked(self.regression_.predict(codes, col, shots=True)[0], col, n)

    def _modules(self):
        return [self.classifier_]

    def _state(self):
        tensors = self._space_state()
        tensors.update(
            embeddings=torch.from_numpy(self.embeddings_),
            images=torch.from_numpy(np.ascontiguousarray(self.images_)),
            rows=torch.from_numpy(self.rows_),
            cols=torch.from_numpy(self.cols_),
        )
        return tensors, {}

    def _set_state(self, tensors, config):
        self._set_space(tensors)
        self.embeddings_ = tensors["embeddings"].numpy()
        self.images_ = tensors["images"].numpy()
        self.rows_, self.cols_ = tensors["rows"].numpy(), tensors["cols"].numpy()


class CompletionGAN(_StyleSpace):
    """A generator trained to draw a cell from its prototype as predicted from the writer's other
    cells, matched against the real cell in mean, rank among writers and spread."""

    name = "completion-gan"
    Config = CompletionGANConfig

    def _fit(self, matrix, progress):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            rng = distributed.generator(cell_seed(self.seed, "train", self.name))
            self._fit_space(matrix, progress)
            dev = self.device_
            codes = self.codes_
            oof = codes  # a placeholder where no cell is conditioned on a prediction
            if self.predicted_share > 0:
                with self._phase("out-of-fold regressions"):
                    oof = self.regression_.out_of_fold(self.protos_, self.counts_)
            # Codes enter the style network centred on their label and on a unit scale.
            self.code_scale_ = float(np.nanstd(codes - self.regression_.label_means_[None]))
            emb = torch.from_numpy(self.embeddings_).to(dev)
            sampler = _CellSampler(
                matrix, dev, self.batch_cells, 1, rng, emb,
                real_per_cell=ENERGY_REAL if self.energy_weight > 0 else 0,
            )  # fmt: skip
            if not len(sampler):
                raise InkfillError(f"{self.name}: no writer has two labels to learn a style from")
            steps = self.steps or auto_steps(len(sampler), self.batch_cells)
            with self._phase("cell spreads"):
                spread = _cell_spreads(matrix)
            tables = {
                "real_code": torch.from_numpy(np.nan_to_num(self._scaled(codes))).to(dev),
                "oof_code": torch.from_numpy(np.nan_to_num(self._scaled(oof))).to(dev),
                "spread": torch.from_numpy(spread).to(dev),
            }
            if self.source:  # each training cell's real neighbours, for either condition
                with self._phase("source neighbours"):
                    real_near = self._source_table(codes, matrix)
                    oof_near = self._source_table(oof, matrix)
                    oof_near = np.where(oof_near < 0, real_near, oof_near)
                    tables["real_source"] = torch.from_numpy(real_near).to(dev)
                    tables["oof_source"] = torch.from_numpy(oof_near).to(dev)
            protos = torch.from_numpy(np.nan_to_num(self.protos_)).to(dev).transpose(0, 1)
            valid = torch.from_numpy(~np.isnan(self.protos_[..., 0])).to(dev).transpose(0, 1)

            def sample():
                batch = sampler()
                rows, cols = batch["rows"], batch["labels"]
                use_oof = torch.rand(len(rows), generator=rng).to(dev) < self.predicted_share
                batch["condition"] = torch.where(
                    use_oof[:, None],
                    tables["oof_code"][rows, cols],
                    tables["real_code"][rows, cols],
                )
                batch["spread"] = tables["spread"][rows, cols]
                if self.source:  # each draw edits one of the cell's K neighbours, at random
                    near = torch.where(
                        use_oof[:, None],
                        tables["oof_source"][rows, cols],
                        tables["real_source"][rows, cols],
                    )  # (B, K)
                    m = self.samples_per_cell
                    pos = torch.randint(near.shape[1], (len(rows), m + 1), generator=rng)
                    picked = near.gather(1, pos.to(dev))
                    batch["source"] = sampler.images[picked[:, :m].reshape(-1)]
                    batch["source_real"] = sampler.images[picked[:, m]]
                return batch

            n_labels = matrix.n_labels
            k = codes.shape[-1]
            support = None
            if self.support > 0:
                support = torch.from_numpy(ink_support(matrix.data.images, self.support))
            self.generator_ = PersonalGenerator(
                n_labels, self.style_dim, self.nz, self.ngf,
                head=self.head, blur=self.blur, support=support, source=self.source,
            ).to(dev)  # fmt: skip
            self.style_ = CodeStyle(k, n_labels, self.style_dim).to(dev)
            disc = PersonalDiscriminator(n_labels, self.style_dim, self.ndf, stem=self.stem)
            disc = disc.to(dev)
            posterior = None
            if self.recon_weight > 0:
                posterior = PosteriorEncoder(n_labels, self.style_dim, self.nz, self.ndf).to(dev)
            loss = CellLoss(
                folded(self.classifier_), protos, valid,
                classify_weight=self.classify_weight,
                feature_weight=self.feature_weight, nce_weight=self.nce_weight,
                nce_temperature=self.nce_temperature, spread_weight=self.spread_weight,
                recon_weight=self.recon_weight,
                kl_weight=self.kl_weight if posterior is not None else 0.0,
                energy_weight=self.energy_weight,
            )  # fmt: skip
            modules = {"generator": self.generator_, "style": self.style_, "discriminator": disc}
            if posterior is not None:
                modules["posterior"] = posterior
            ema = None
            if self.ema_halflife > 0:
                ema = EMA([self.generator_, self.style_], self.ema_halflife)
                modules["generator_ema"], modules["style_ema"] = ema.averaged
            done = self._finished(self.name, modules)
            if done is None:
                with (
                    self._phase("gan"),
                    tqdm(total=steps, desc=self.name, disable=not progress) as bar,
                ):
                    self.style_.train()
                    done = train_personal_gan(
                        self.generator_, disc,
                        lambda batch: self.style_(batch["condition"], batch["labels"]),
                        [*self.style_.parameters()], sample, loss,
                        steps=steps, samples_per_cell=self.samples_per_cell, lr=self.lr,
                        style_lr=self.style_lr, beta1=self.beta1, label_weight=self.label_weight,
                        r1_weight=self.r1_weight, r1_every=self.r1_every,
                        judge_style=self.judge_style, shift=self.shift, rng=rng,
                        posterior=posterior, bf16=self.bf16, progress=bar,
                        checkpoint=self._loop(self.name, modules), ema=ema,
                    )  # fmt: skip
                    if ema is not None:
                        self._recalibrate(*ema.averaged, sample, rng)
                self._finish(self.name, modules, done)
            if ema is not None:  # the run keeps the averaged generator
                self.generator_, self.style_ = ema.averaged
            self.history_ = {self.name: done}
            self.style_.eval()
            self.set_neighbour_bank(
                self.embeddings_, matrix.cols, matrix.data.images if self.source else None
            )
            self.draw_predictor_ = None
            if self.predictor_draws:
                with self._phase("draw predictor"):
                    self.draw_predictor_, _ = self._fit_draw_predictor(progress)
        del self.embeddings_, self.protos_, self.counts_

    def set_neighbour_bank(
        self, embeddings: np.ndarray, cols: np.ndarray, images: np.ndarray | None = None
    ) -> None:
        """Keep the classifier's embeddings (N, d) of training images of label columns `cols`
        (N,), at most BANK_PER_LABEL of each label (a seeded random subset), for herd_to=
        "neighbours" (and, given them, the `images` (N, 28, 28) themselves, which a `source`
        generator edits). fit() calls it; a run saved without a bank can be given one here."""
        rng = np.random.default_rng(cell_seed(self.seed, "neighbour bank", self.name))
        keep = []
        for c in np.unique(cols):
            mine = np.flatnonzero(cols == c)
            if len(mine) > BANK_PER_LABEL:
                mine = np.sort(rng.choice(mine, BANK_PER_LABEL, replace=False))
            keep.append(mine)
        keep = np.concatenate(keep)
        # float16, as the run stores them: a loaded run herds exactly as the fitted one
        bank = torch.from_numpy(np.ascontiguousarray(embeddings[keep], np.float32))
        self.bank_ = bank.half().float()
        self.bank_cols_ = torch.from_numpy(np.asarray(cols)[keep].astype(np.int64))
        self.bank_images_ = None if images is None else np.ascontiguousarray(images[keep])
        self._pools = {}

    def _source_table(self, codes: np.ndarray, matrix: WriterMatrix) -> np.ndarray:
        """(W, L, K) indices of training images, K = `neighbours`: for each cell with a code
        (codes (W, L, k), NaN where none), the K images of its label, of other writers, nearest
        the code's prototype in the classifier's embedding (-1 where the cell has no code; a
        label with fewer images repeats its nearest ones)."""
        n_w, n_l, _ = codes.shape
        k = self.neighbours
        out = np.full((n_w, n_l, k), -1, np.int64)
        emb = torch.from_numpy(self.embeddings_).double()
        for c in range(n_l):
            pool = np.flatnonzero(matrix.cols == c)
            have = np.flatnonzero(~np.isnan(codes[:, c, 0]))
            if len(pool) == 0 or len(have) == 0:
                continue
            e = emb[pool]
            writers = torch.from_numpy(matrix.rows[pool])
            have_k = min(k, len(pool))
            for part in np.array_split(have, max(1, len(have) // 256)):
                proto = torch.from_numpy(self.regression_.embed(codes[part, c])).double()
                d = e.square().sum(1)[None] - 2 * proto @ e.T  # (P, N) up to |proto|^2
                d[writers[None] == torch.from_numpy(part)[:, None]] = float("inf")
                near = d.topk(have_k, largest=False).indices  # (P, have_k)
                out[part, c] = pool[near[:, torch.arange(k) % have_k].numpy()]
        return out

    def _neighbour_targets(self, codes: np.ndarray, cols: np.ndarray) -> torch.Tensor:
        """The (C, K, k) targets of _neighbours alone."""
        return self._neighbours(codes, cols)[0]

    def _neighbours(self, codes: np.ndarray, cols: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """(C, K, k) in the regression's code space, K = `neighbours`: for each of C cells
        (predicted codes (C, k), label columns (C,)), the K bank images of its label nearest its
        predicted prototype in the classifier's embedding, moved so that their mean is the
        predicted code: the spread of real images of that style, centred where the writer's cell
        is predicted. A label with fewer than K bank images repeats its nearest ones in turn (a
        label without any gives the predicted code K times), so a cell's targets never depend on
        the other cells filled with it. Also (C, K): the bank rows of those images (-1 for a
        label without any), the images a `source` generator edits.

        The search needs no pass over the full embedding: the prototype lies in the code
        space's plane (mean + code @ components, orthonormal components), so its squared
        distance to a bank image x is |code - code(x)|^2 + |x - mean|^2 - |code(x)|^2, which
        orders the bank as |x - mean|^2 - 2 code . code(x) does (both kept per label)."""
        labels = np.unique(cols)
        for c in labels:  # each label's bank in the code space, made once per bank
            if int(c) not in self._pools:
                centred = self.bank_[self.bank_cols_ == int(c)].double()
                centred -= torch.from_numpy(self.regression_.mean_).double()
                components = torch.from_numpy(self.regression_.components_).double()
                self._pools[int(c)] = (centred @ components.T, centred.square().sum(1))
        k = self.neighbours
        codes = torch.from_numpy(codes).double()
        out = codes[:, None].repeat(1, k, 1)  # (C, K, k)
        index = torch.full((len(codes), k), -1, dtype=torch.long)
        for c in labels:
            cells = torch.from_numpy(np.flatnonzero(cols == c))
            pool, sq = self._pools[int(c)]
            have = min(k, len(sq))
            if have == 0:
                continue
            near = (sq - 2 * codes[cells] @ pool.T).topk(have, largest=False).indices
            near = near[:, torch.arange(k) % have]
            chosen = pool[near]  # (c, K, k)
            out[cells] = chosen - chosen.mean(1, keepdim=True) + codes[cells, None]
            index[cells] = torch.from_numpy(np.flatnonzero(self.bank_cols_.numpy() == c))[near]
        return out, index.numpy()

    def _recalibrate(self, generator, style, sample, rng) -> None:
        """Batch-norm statistics of the averaged generator, measured on its own draws of
        training cells (as many images as 64 training steps draw)."""
        m = self.samples_per_cell

        def draw():
            batch = sample()
            labels = batch["labels"].repeat_interleave(m)
            codes = style(batch["condition"], batch["labels"]).repeat_interleave(m, 0)
            z = torch.randn(len(labels), self.nz, generator=rng).to(labels.device)
            return generator(z, codes, labels, *([batch["source"]] if self.source else []))

        recalibrate_batch_norm(generator, draw)

    def _fit_draw_predictor(self, progress: bool) -> tuple[DrawPredictor, dict]:
        """Learn the classifier's embedding of a draw from its (noise, style, label), on
        `predictor_draws` draws of random cells' predicted styles, 8 noises per cell. The loss
        weighs how the draws of one cell differ from each other (what herding chooses among) 4x
        their mean. Seeded from `seed` alone: every rank of a torchrun fit learns the same one.
        For a `source` generator each draw edits one of its cell's `neighbours` bank images, at
        random, and the predictor reads that image's embedding too."""
        dev, group = self.device_, PREDICTOR_GROUP
        n_groups = max(1, self.predictor_draws // group)
        rng = np.random.default_rng(cell_seed(self.seed, "draw predictor", self.name))
        gen = torch.Generator().manual_seed(cell_seed(self.seed, "draw predictor", "noise"))
        shape = self.predicted_.shape
        rows = np.repeat(rng.integers(0, shape[0], n_groups), group)
        cols = np.repeat(rng.integers(0, shape[1], n_groups), group)
        style = self._styles(self.predicted_[rows, cols], cols).cpu()
        z = torch.randn(len(rows), self.nz, generator=gen)
        labels = torch.from_numpy(cols)
        images, source = None, None
        if self.source:
            near = self._neighbours(self.predicted_[rows[::group], cols[::group]], cols[::group])[1]
            pick = near[np.arange(len(rows)) // group, rng.integers(0, near.shape[1], len(rows))]
            images, source = self.bank_images_[pick], self.bank_[torch.from_numpy(pick)]
        with self._inference():
            drawn = self._draw(z, style, labels, source=images)
            target = embed_images(self.classifier_, drawn, dev).float()
        target = target.cpu().clone()  # a plain tensor, outside inference mode
        with torch.random.fork_rng(devices=[]):  # the same start whether or not the GAN resumed
            torch.manual_seed(cell_seed(self.seed, "draw predictor", "init"))
            net = DrawPredictor(
                self.nz, self.style_dim, shape[1], target.shape[1],
                source_dim=0 if source is None else source.shape[1],
            ).to(dev)  # fmt: skip
        net.mean.copy_(target.mean(0))  # target stays on the CPU: a batch at a time to the device
        net.scale.fill_(float((target - target.mean(0)).square().mean().sqrt()))
        per_step = max(1, PREDICTOR_BATCH // group)
        steps = PREDICTOR_EPOCHS * max(1, n_groups // per_step)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        losses = []
        with tqdm(total=steps, desc="draw predictor", disable=not progress) as bar:
            for _ in range(PREDICTOR_EPOCHS):
                order = torch.randperm(n_groups, generator=gen)
                for i in range(steps // PREDICTOR_EPOCHS):
                    cells = order[i * per_step : (i + 1) * per_step]
                    idx = (cells[:, None] * group + torch.arange(group)).reshape(-1)
                    src = None if source is None else source[idx].to(dev)
                    miss = net(z[idx].to(dev), style[idx].to(dev), labels[idx].to(dev), src)
                    miss = (miss - target[idx].to(dev)) / net.scale  # in units of the spread
                    miss = miss.reshape(-1, group, target.shape[1])
                    mean = miss.mean(1, keepdim=True)
                    loss = mean.square().sum(-1).mean() + 4 * (miss - mean).square().sum(-1).mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    losses.append(float(loss.detach()))
                    bar.update(1)
        net.eval()
        return net, {"draws": len(rows), "steps": len(losses), "final_loss": losses[-1]}

    def _scaled(self, codes: np.ndarray) -> np.ndarray:
        centred = codes - self.regression_.label_means_[None]
        return (centred / self.code_scale_).astype(np.float32)

    def save_figures(self, matrix, out_dir, level, metrics):
        save_generator_figures(self, matrix, out_dir)

    def evaluate(self, matrix, progress=False):
        check = self.draw_check(matrix)
        out = {"draw_check": check}
        if check["draw_label_acc"] < check["real_label_acc"] - COLLAPSE_GAP:
            out["warnings"] = [
                f"{self.name}'s own classifier reads only {check['draw_label_acc']:.0%} of its "
                f"draws as their label (the real images of the same cells: "
                f"{check['real_label_acc']:.0%}): the GAN has likely collapsed and its fills "
                "are not worth using; fit again with another --seed"
            ]
        return out

    def format_metrics(self, metrics):
        c = metrics["draw_check"]
        return (
            f"draw check: the run's classifier reads {c['draw_label_acc']:.1%} of the fills of "
            f"{c['cells']} observed cells ({c['per_cell']} each, from their predicted codes) as "
            f"their label; the same cells' real images {c['real_label_acc']:.1%}"
        )

    def draw_check(self, matrix: WriterMatrix) -> dict:
        """Fill CHECK_CELLS random observed cells of the training `matrix` as an empty cell is
        filled (from the prototype predicted from the writer's other cells) and read the draws
        with the run's own classifier: the share read as their label, beside the same share of
        the cells' real images. A collapsed GAN shows as a gap (0.61 against 0.99 in the one
        collapse seen on femnist_digits)."""
        self.check_fitted()
        rng = np.random.default_rng(cell_seed(self.seed, "draw check", self.name))
        rows, cols = np.nonzero(matrix.observed)
        pick = np.sort(rng.choice(len(rows), min(CHECK_CELLS, len(rows)), replace=False))
        rows, cols = rows[pick], cols[pick]
        cells = [(str(matrix.writer_ids[r]), int(matrix.label_ids[c])) for r, c in zip(rows, cols)]
        draws = np.concatenate(self._generate_cells(cells, CHECK_PER_CELL, self.seed))
        real = np.flatnonzero(
            np.isin(matrix.rows * matrix.n_labels + matrix.cols, rows * matrix.n_labels + cols)
        )

        def read_as(images: np.ndarray) -> np.ndarray:
            with self._inference():
                emb = embed_images(self.classifier_, images, self.device_)
                return self.classifier_.label_head(emb).argmax(1).cpu().numpy()

        return {
            "cells": len(cells),
            "per_cell": CHECK_PER_CELL,
            "draw_label_acc": float(np.mean(read_as(draws) == np.repeat(cols, CHECK_PER_CELL))),
            "real_label_acc": float(
                np.mean(read_as(matrix.data.images[real]) == matrix.cols[real])
            ),
        }

    @torch.no_grad()
    def _styles(self, codes: np.ndarray, cols: np.ndarray) -> torch.Tensor:
        """Style codes (N, style_dim) of N predicted codes (N, k) of labels `cols`."""
        centred = codes - self.regression_.label_means_[cols]
        x = torch.from_numpy((centred / self.code_scale_).astype(np.float32)).to(self.device_)
        return self.style_(x, torch.as_tensor(cols, device=self.device_)).float()

    def _generate(self, writer, label, n, rng):
        return self._generate_cells([(writer, label)], n, 0, [rng])[0]

    def _generate_cells(self, cells, n, seed, rngs=None):
        rngs = rngs or [cell_generator(seed, w, lab) for w, lab in cells]
        m = n * self.candidates
        z = torch.stack([torch.randn(m, self.nz, generator=g) for g in rngs])
        rows = np.asarray([self.matrix_.row(w) for w, _ in cells], np.int64)
        cols = np.asarray([self.matrix_.col(lab) for _, lab in cells], np.int64)
        codes = self.predicted_[rows, cols]
        return list(self._floored(self._herded(self.truncation * z, codes, cols, n)))

    def _floored(self, images: np.ndarray) -> np.ndarray:
        """Pixels fainter than `ink_floor` set to 0: a scan's background is exactly 0 (88% of
        femnist_digits' pixels, 80% of the generator's own on bench seed 7); and the `margin`
        outermost rows and columns, where the scans have no ink; in place."""
        images[images < self.ink_floor] = 0
        return blank_margin(images, self.margin)

    def generate_from_reference(self, images, labels, label, n, seed=0, name="new"):
        """n images of `label` in the style of a writer known only from `images` (any labels)."""
        self.check_fitted()
        col = self.matrix_.col(label)
        code = self.regression_.predict(self._reference_codes(images, labels), col, shots=True)
        z = torch.randn(
            n * self.candidates,
            self.nz,
            generator=torch.Generator().manual_seed(cell_seed(seed, name, label)),
        )
        return self._floored(self._herded(self.truncation * z[None], code, np.asarray([col]), n)[0])

    def _herded(self, z: torch.Tensor, codes: np.ndarray, cols: np.ndarray, n: int) -> np.ndarray:
        """(C, n, 28, 28) images of C cells from their candidate noises z (C, n * candidates,
        nz), predicted codes (C, k) and label columns (C,). With more candidates than images,
        every HERD_BLOCK consecutive images of a cell are those of its HERD_BLOCK * candidates
        whose mean, in the regression's code space (the embedding's principal components of
        writer style), is nearest the cell's predicted code (`herd`): each block averages right
        and the cost grows linearly with n. Candidates are scored by the draw predictor, or
        drawn and embedded (herd="rendered", or a run without a predictor). With
        herd_to="neighbours" a block matches the K neighbour targets' spread instead (kernel
        herding), and with style_spread > 0 candidate j is drawn in the style of target j % K
        (moved that far from the predicted code toward it): the generator renders a writer's
        variety from real images' codes rather than from its noise alone."""
        n_cells, m, nz = z.shape
        per = m // n if n else 1
        style = self._styles(codes, cols).cpu()
        labels = torch.from_numpy(cols)
        spread = None  # herd_to="neighbours": the real spread each kept set must match
        sources = None  # a source generator: candidate j edits neighbour j % K, (C, K) bank rows
        if self.herd_to == "neighbours" and getattr(self, "bank_", None) is not None:
            spread, sources = self._neighbours(codes, cols)
        if not self.source:
            sources = None
        elif spread is None or getattr(self, "bank_images_", None) is None:
            raise InkfillError(f"{self.name}: this run edits real images but has none saved")
        elif (sources < 0).any():
            raise InkfillError(f"{self.name}: no real image of a label to edit in the run's bank")

        def source_of(cells: slice, which: torch.Tensor) -> np.ndarray | None:
            if sources is None:
                return None
            return self.bank_images_[sources[cells][:, which.numpy()]].reshape(-1, 28, 28)

        if per == 1 or n == 0:
            flat = z.reshape(-1, nz)
            src = source_of(slice(None), torch.arange(m) % self.neighbours)
            images = self._draw(
                flat, style.repeat_interleave(m, 0), labels.repeat_interleave(m), source=src
            )
            return images.reshape(n_cells, m, 28, 28)
        net = getattr(self, "draw_predictor_", None)
        # a predictor that knows sources for a source generator (runs saved before had none)
        predicted = (
            self.herd == "predicted" and net is not None and (sources is None) == (net.src is None)
        )
        target = torch.from_numpy(codes).double()
        # style_spread > 0: candidate j drawn in style j % K of K (and a source edits j % K)
        styles, k_near = None, self.neighbours if sources is not None else 1
        if spread is not None and self.style_spread > 0:
            k_near = self.neighbours
            moved = codes[:, None] + self.style_spread * (spread.numpy() - codes[:, None])
            styles = (
                self._styles(
                    moved.reshape(-1, codes.shape[1]).astype(np.float32), np.repeat(cols, k_near)
                )
                .cpu()
                .reshape(n_cells, k_near, -1)
            )
        components = torch.from_numpy(self.regression_.components_).to(self.device_)
        mean = torch.from_numpy(self.regression_.mean_).to(self.device_)
        if predicted:  # the kept noises (and styles and sources), drawn at the end
            kept_z = torch.empty(n_cells, n, nz)
            kept_style = None if styles is None else torch.empty(n_cells, n, styles.shape[2])
            kept_source = None if sources is None else np.empty((n_cells, n), np.int64)
        else:  # the kept images, picked among the drawn candidates
            out = np.empty((n_cells, n, 28, 28), np.uint8)
        for start in range(0, n, HERD_BLOCK):
            b = min(HERD_BLOCK, n - start)
            block = z[:, start * per : (start + b) * per]  # (C, b * per, nz)
            which = torch.arange(start * per, (start + b) * per) % k_near  # each one's style
            step = max(1, HERD_CANDIDATES // (b * per))
            for s in range(0, n_cells, step):
                part = block[s : s + step]
                g = len(part)
                if predicted:
                    emb = self._predict_draws(
                        part,
                        style[s : s + step] if styles is None else styles[s : s + step],
                        labels[s : s + step],
                        None if styles is None and sources is None else which,
                        None
                        if sources is None
                        else self.bank_[torch.from_numpy(sources[s : s + step])],
                    )
                else:
                    flat_style = (
                        style[s : s + step].repeat_interleave(b * per, 0)
                        if styles is None
                        else styles[s : s + step][:, which].reshape(-1, styles.shape[2])
                    )
                    images = self._draw(
                        part.reshape(-1, nz),
                        flat_style,
                        labels[s : s + step].repeat_interleave(b * per),
                        source=source_of(slice(s, s + step), which),
                    )
                    with self._inference():
                        emb = embed_images(self.classifier_, images, self.device_)
                emb = emb.reshape(g, b * per, -1)
                code = (emb - mean) @ components.T  # the code space
                unlikely = None
                if self.label_floor > 0:
                    unlikely = self._unlikely(emb, labels[s : s + step], b)
                if spread is not None:
                    picks = kernel_herd(code, spread[s : s + step], b, unlikely).cpu()
                else:
                    picks = herd(code, target[s : s + step], b, unlikely).cpu()
                rows = torch.arange(g)[:, None]
                if predicted:
                    kept_z[s : s + step, start : start + b] = part[rows, picks]
                    if styles is not None:
                        kept = styles[s : s + step][rows, which[picks]]
                        kept_style[s : s + step, start : start + b] = kept
                    if sources is not None:
                        kept = sources[s : s + step][rows.numpy(), which[picks].numpy()]
                        kept_source[s : s + step, start : start + b] = kept
                else:
                    chosen = images.reshape(g, b * per, 28, 28)[rows.numpy(), picks]
                    out[s : s + step, start : start + b] = chosen
        if predicted:
            flat_style = (
                style.repeat_interleave(n, 0)
                if styles is None
                else kept_style.reshape(-1, kept_style.shape[-1])
            )
            images = self._draw(
                kept_z.reshape(-1, nz), flat_style, labels.repeat_interleave(n),
                source=None if sources is None else self.bank_images_[kept_source.reshape(-1)],
            )  # fmt: skip
            out = images.reshape(n_cells, n, 28, 28)
        return out

    def _unlikely(self, emb: torch.Tensor, labels: torch.Tensor, keep: int) -> torch.Tensor:
        """(C, M) bool, True for the candidates herding must pass over: of C cells' M candidate
        embeddings (C, M, dim) of label columns `labels` (C,), those to which the run's
        classifier gives their label a probability under `label_floor`, all but each cell's
        `keep` most probable ones at most."""
        with self._inference():
            logits = self.classifier_.label_head(emb.to(self.device_)).float()
        index = labels.to(logits.device)[:, None, None].expand(-1, emb.shape[1], 1)
        prob = logits.softmax(-1).gather(-1, index)[..., 0]  # (C, M)
        floor = prob.topk(keep, dim=1).values[:, -1:].clamp_max(self.label_floor)
        return prob < floor

    def _predict_draws(
        self, z, style, labels, which=None, source=None, chunk: int = 8192
    ) -> torch.Tensor:
        """The draw predictor's embeddings (C, M, dim) of C cells' M candidates each (z (C, M,
        nz), style (C, style_dim) or (C, S, style_dim) with `which` (M,) the style of each
        candidate, labels (C,); a source generator's S source embeddings a cell (C, S, dim),
        candidate m editing source which[m]), about `chunk` candidates at a time (bf16 like the
        generator's forward passes when the run trained in bf16; 2.8x the candidates/s on the 2
        cores)."""
        dev, net = self.device_, self.draw_predictor_
        step = max(1, chunk // max(z.shape[1], 1))
        which = None if which is None else which.to(dev)
        with self._inference():
            parts = [
                net.per_cell(z[s : s + step].to(dev), style[s : s + step].to(dev),
                             labels[s : s + step].to(dev), which,
                             None if source is None else source[s : s + step].to(dev)).float()
                for s in range(0, len(z), step)
            ]  # fmt: skip
        return torch.cat(parts)

    def _draw(self, z, style, cols, chunk: int = INFER_CHUNK, source=None) -> np.ndarray:
        """G(z, style, label) for (N, nz) noise, (N, style_dim) codes, (N,) label columns, in
        chunks under the inference context (embed-gan's), editing `source` (N, 28, 28) uint8
        images with a source generator."""
        if source is None:
            return _PersonalGAN._draw(self, z, style, cols, chunk)
        dev, out = self.device_, []
        with self._inference():
            for s in range(0, len(z), chunk):
                part = slice(s, s + chunk)
                src = ModelImages(source[part], dev)[:]
                out.append(to_images(self.generator_(
                    z[part].to(dev), style[part].to(dev), cols[part].to(dev), src
                )))  # fmt: skip
        return np.concatenate(out) if out else np.zeros((0, 28, 28), np.uint8)

    def _modules(self):
        return [self.generator_, self.classifier_, self.style_, *self._predictor()]

    def _predictor(self) -> list[torch.nn.Module]:
        net = getattr(self, "draw_predictor_", None)
        return [] if net is None else [net]

    def _state(self):
        tensors = self._space_state()
        parts = [("generator", self.generator_), ("style", self.style_)]
        parts += [("draw_predictor", net) for net in self._predictor()]
        for name, module in parts:
            tensors.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
        if getattr(self, "bank_", None) is not None:  # float16: half the file, ample for herding
            tensors.update(bank=self.bank_.half(), bank_cols=self.bank_cols_)
        if getattr(self, "bank_images_", None) is not None:
            tensors["bank_images"] = torch.from_numpy(self.bank_images_)
        return tensors, {"code_scale": self.code_scale_}

    def _set_state(self, tensors, config):
        self._set_space(tensors)
        n_labels = len(self.matrix_.label_ids)
        k = tensors["regression.components"].shape[0]
        # the run's own tensors say whether its generator has the 28x28 stage (runs saved before
        # it do not, whatever the config's default says now)
        head = (
            tensors["generator.net.out.weight"].shape[1]
            if "generator.net.out.weight" in tensors
            else 0
        )
        blur = "generator.net.blur" in tensors  # the filter is a buffer: there or not
        support = tensors.get("generator.support")  # so is the mask
        self.head, self.blur = head, blur  # and the run's config says so when saved again
        if support is None:
            self.support = 0.0
        src = tensors.get("generator.net.src28.weight")
        self.source = 0 if src is None else int(src.shape[0])
        self.generator_ = PersonalGenerator(
            n_labels, self.style_dim, self.nz, self.ngf, head=head, blur=blur,
            support=None if support is None else support[0, 0], source=self.source,
        )  # fmt: skip
        self.style_ = CodeStyle(k, n_labels, self.style_dim)
        for name, module in (("generator", self.generator_), ("style", self.style_)):
            prefix = f"{name}."
            module.load_state_dict(
                {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            )
            module.eval()
        self.code_scale_ = float(config["code_scale"])
        self.bank_ = self.bank_cols_ = None  # runs saved before it herd to the mean only
        self._pools = {}
        if "bank" in tensors:
            self.bank_, self.bank_cols_ = tensors["bank"].float(), tensors["bank_cols"]
        self.bank_images_ = tensors["bank_images"].numpy() if "bank_images" in tensors else None
        self.draw_predictor_ = None  # runs saved before it herd by rendering every candidate
        if "draw_predictor.inp.weight" in tensors:
            hidden, dim = tensors["draw_predictor.net.3.weight"].shape[::-1]
            src = tensors.get("draw_predictor.src.weight")
            self.draw_predictor_ = DrawPredictor(
                self.nz, self.style_dim, n_labels, dim, hidden,
                source_dim=0 if src is None else src.shape[1],
            )  # fmt: skip
            self.draw_predictor_.load_state_dict(
                {k[15:]: v for k, v in tensors.items() if k.startswith("draw_predictor.")}
            )
            self.draw_predictor_.eval()


HERD_BLOCK = 16  # herding keeps images in blocks of 16 (each of 16 x candidates draws)
HERD_CANDIDATES = 65_536  # candidates scored at once: memory flat at any --per-cell
PREDICTOR_GROUP = 8  # noises per cell in the draw predictor's data
PREDICTOR_BATCH = 256  # draws per step of the draw predictor
PREDICTOR_EPOCHS = 12
BANK_PER_LABEL = 4_000  # training embeddings of each label a run keeps for herd_to="neighbours"
ENERGY_REAL = 8  # real images of a cell the energy term compares its draws with
CHECK_CELLS, CHECK_PER_CELL = 200, 8  # the draw check after a fit: observed cells, draws each


def herd(
    emb: torch.Tensor, target: torch.Tensor, n: int, exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, M) -> (B, n) indices: for each of B sets of M candidate embeddings (B, M, d), n of
    them picked greedily, each the one that brings the picked set's mean nearest the set's
    target (B, d) (herding, Welling 2009); never those `exclude` (B, M) marks (at least n of
    each set must be left). Computed in float64 so that ties break alike in any batch."""
    emb = emb.double()
    target = target.to(emb)
    # |(total + e) / (k + 1) - target|^2 is least where |e|^2 - 2 e.(r) is, with
    # r = (k + 1) target - total: one (B, M) product a step, never a (B, M, d) one.
    sq = emb.square().sum(-1)
    total = torch.zeros_like(target)
    taken = _untaken(emb, exclude)
    every = torch.arange(len(emb), device=emb.device)
    picks = []
    for k in range(n):
        r = (k + 1) * target - total
        miss = sq - 2 * torch.bmm(emb, r[:, :, None])[..., 0]
        pick = miss.masked_fill(taken, float("inf")).argmin(1)
        taken[every, pick] = True
        total += emb[every, pick]
        picks.append(pick)
    if not picks:
        return torch.zeros(len(emb), 0, dtype=torch.long)
    return torch.stack(picks, 1)


def kernel_herd(
    emb: torch.Tensor, target: torch.Tensor, n: int, exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, M) -> (B, n) indices: for each of B sets of M candidate embeddings (B, M, d), n of
    them picked greedily so that the picked set's distribution is nearest that of the set's K
    target samples (B, K, d) in maximum mean discrepancy (kernel herding, Chen et al. 2010),
    with a Gaussian kernel whose width is the median candidate-to-target distance of the set;
    never those `exclude` (B, M) marks. Computed in float64, like herd()."""
    emb, target = emb.double(), target.to(emb.device).double()
    sq = emb.square().sum(-1)  # (B, M)
    # (B, M, K) squared distances, made and then turned into kernel values in place: at 256
    # cells of 256 candidates (16 an image) this tensor is 16 MB, and each extra pass over it
    # shows in a fill's time
    d2 = sq[..., None] + target.square().sum(-1)[:, None]
    d2 = torch.baddbmm(d2, emb, target.transpose(1, 2), alpha=-2).clamp_min_(0)
    width2 = _lower_median(d2.flatten(1)).clamp_min(1e-12)[:, None]  # (B, 1)
    pull = d2.div_(-2 * width2[..., None]).exp_().mean(2)  # (B, M): mean kernel to the target
    # MMD^2 of the picked set S plus x, |S| = k, up to terms free of x, times (k + 1)^2 / 2:
    # sum_{s in S} K(x, s) - (k + 1) pull(x) (K(x, x) = 1 for every x).
    push = torch.zeros_like(pull)
    taken = _untaken(emb, exclude)
    every = torch.arange(len(emb), device=emb.device)
    picks = []
    for k in range(n):
        pick = (push - (k + 1) * pull).masked_fill_(taken, float("inf")).argmin(1)
        taken[every, pick] = True
        chosen = emb[every, pick][:, :, None]  # (B, d, 1)
        step = torch.baddbmm((sq + sq[every, pick][:, None])[..., None], emb, chosen, alpha=-2)
        push += step[..., 0].clamp_min_(0).div_(-2 * width2).exp_()
        picks.append(pick)
    if not picks:
        return torch.zeros(len(emb), 0, dtype=torch.long)
    return torch.stack(picks, 1)


def _untaken(emb: torch.Tensor, exclude: torch.Tensor | None) -> torch.Tensor:
    """Herding's (B, M) "taken" mask at the start: the excluded candidates, or none."""
    if exclude is None:
        return torch.zeros(emb.shape[:2], dtype=torch.bool, device=emb.device)
    return exclude.to(emb.device, torch.bool).clone()


def _lower_median(x: torch.Tensor) -> torch.Tensor:
    """Each row's median of x (B, N), the lower middle value where N is even, as torch.median
    gives it; on a CPU by selection (numpy's partition), ~4x faster than torch.median there."""
    if x.device.type != "cpu":
        return x.median(1).values
    mid = (x.shape[1] - 1) // 2
    return torch.from_numpy(np.partition(x.numpy(), mid, axis=1)[:, mid]).to(x.dtype)


def auto_steps(n_cells: int, batch_cells: int, passes: int = 20) -> int:
    """Training steps that show each observed cell about `passes` times, rounded to 100 and kept
    within 1,000-10,000: ~3,000 on femnist_digits' ~4,800 cells, 10,000 on full FEMNIST."""
    return int(np.clip(round(passes * n_cells / batch_cells, -2), 1000, 10000))


def ink_support(images: np.ndarray, share: float, grow: int = 1, ink: int = 10) -> np.ndarray:
    """(28, 28) bool: the pixels that have ink (at least `ink` of 255: fainter is the scans'
    anti-aliasing) in at least `share` of `images` (N, 28, 28), grown by `grow` pixels. On
    femnist_digits, share 0.001: 335 of 784 pixels within rows and columns 4-23; 0.12% of the
    scans have ink outside it (0.008% of all ink)."""
    count = np.zeros(images.shape[1:], np.int64)
    for start in range(0, len(images), 65_536):  # flat memory at any dataset size
        count += (images[start : start + 65_536] >= ink).sum(0)
    inked = count >= max(share * len(images), 1)
    square = np.ones((3, 3), bool)  # a pixel grows to its 8 neighbours
    return ndimage.binary_dilation(inked, square, iterations=grow) if grow else inked


def _cell_spreads(matrix: WriterMatrix) -> np.ndarray:
    """(n_writers, n_labels) mean pairwise pixel distance of each cell's real images (the bench's
    diversity); cells with fewer than two images take the median of their label's cells."""
    out = np.full((matrix.n_writers, matrix.n_labels), np.nan, np.float32)
    rows, cols, members = matrix.cell_table()
    for r, c, idx in zip(rows, cols, members):
        idx = idx[idx >= 0]
        if len(idx) >= 2:
            out[r, c] = metrics.mean_pairwise_distance(matrix.data.images[idx], max_images=32)
    for c in range(matrix.n_labels):
        col = out[:, c]
        fallback = np.nanmedian(col) if np.isfinite(col).any() else np.nanmedian(out)
        col[np.isnan(col)] = fallback
    return out
