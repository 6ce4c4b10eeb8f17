"""The writers x labels matrix completed in an embedding space, the seed's section 5.1
(A(i, x) = <U(i), V(x)>): each observed cell is summed up by its prototype (the mean embedding of
its images), and a ridge regression per label, fitted across writers, predicts a cell's prototype
from the same writer's prototypes of the other labels. numpy and scikit-learn only.
"""

from __future__ import annotations

import numpy as np
from sklearn.decomposition import PCA
from sklearn.linear_model import RidgeCV

ALPHAS = np.logspace(-2, 4, 13)
RANK_BATCH = 128  # training writers per step of the ranking refinement
RANK_LR = 1e-3


def cell_prototypes(
    embeddings: np.ndarray, rows: np.ndarray, cols: np.ndarray, n_writers: int, n_labels: int
) -> tuple[np.ndarray, np.ndarray]:
    """Mean embedding of each (writer, label) cell: (n_writers, n_labels, d) with NaN where a cell
    has no image, and the image counts (n_writers, n_labels)."""
    d = embeddings.shape[1]
    cell = np.asarray(rows, np.int64) * n_labels + np.asarray(cols, np.int64)
    sums = np.zeros((n_writers * n_labels, d), np.float64)
    np.add.at(sums, cell, embeddings.astype(np.float64))
    counts = np.bincount(cell, minlength=n_writers * n_labels)
    with np.errstate(invalid="ignore", divide="ignore"):
        protos = sums / counts[:, None]
    return protos.reshape(n_writers, n_labels, d).astype(np.float32), counts.reshape(
        n_writers, n_labels
    )


def _ridge(alphas, x: np.ndarray, y: np.ndarray, weight: np.ndarray | None = None) -> RidgeCV:
    """RidgeCV (efficient leave-one-out over `alphas`). On large designs (full FEMNIST: ~8k rows x
    2k columns) its SVD path is 2.5-4x faster than the default covariance path (measured 11 s vs
    30 s at 15.7k x 2,046); small ones keep the default, so femnist_digits fits are unchanged."""
    mode = "svd" if x.shape[0] * x.shape[1] > 4_000_000 else None
    return RidgeCV(alphas=alphas, gcv_mode=mode).fit(x, y, sample_weight=weight)


class PrototypeRegression:
    """Predicts a cell's prototype from its writer's other cells, one ridge regression per label.

    Prototypes are first projected on `n_components` principal components (fitted on the observed
    prototypes) so that the regressions stay small with many labels. A writer's row is the
    concatenation of their centred codes of every label but the target (zeros where a cell is
    empty) and which labels they have; the ridge strength is chosen by efficient leave-one-out
    (RidgeCV) per label. fit() takes the (n_writers, n_labels, d) prototypes with NaN for empty
    cells and, optionally, each cell's image count: a writer's example then weighs as many images
    as their target cell has, since a prototype of one image is a noisy target (on femnist_digits
    a tenth of the cells have one image, the median ten). predict() returns codes (in the PCA
    space) and embed() maps them back.

    With `rank_steps` > 0, each label's ridge solution is then refined for what the prediction is
    used for, picking the writer out: `rank_steps` Adam steps on an InfoNCE loss (the predicted
    prototype's cosine similarity to every training writer's real prototype of the label, at
    `rank_temperature`, the writer's own the positive), plus `rank_anchor` times the squared
    distance of the coefficients to the ridge solution, which keeps the refined map near the
    least-squares one. Ridge predicts the cell's conditional mean, pulled toward the label's
    average writer; ranking by cosine similarity rewards the directions that tell writers apart.
    """

    def __init__(
        self,
        n_components: int = 32,
        alphas=ALPHAS,
        seed: int = 0,
        rank_steps: int = 0,
        rank_temperature: float = 0.02,
        rank_anchor: float = 1.0,
    ):
        self.n_components, self.alphas, self.seed = n_components, alphas, seed
        self.rank_steps, self.rank_temperature = rank_steps, rank_temperature
        self.rank_anchor = rank_anchor

    # -- the code space ----------------------------------------------------------------------

    def _fit_space(self, protos: np.ndarray) -> None:
        observed = ~np.isnan(protos[..., 0])
        flat = protos[observed]
        k = int(min(self.n_components, len(flat), flat.shape[1]))
        pca = PCA(k, random_state=self.seed).fit(flat)
        self.mean_ = pca.mean_.astype(np.float32)
        self.components_ = pca.components_.astype(np.float32)  # (k, d)
        codes = self.codes(protos)
        self.label_means_ = np.stack(
            [
                codes[observed[:, j], j].mean(0) if observed[:, j].any() else np.zeros(k)
                for j in range(protos.shape[1])
            ]
        ).astype(np.float32)

    def codes(self, protos: np.ndarray) -> np.ndarray:
        """(..., d) prototypes -> (..., k) codes; NaN stays NaN."""
        shape = protos.shape[:-1]
        flat = protos.reshape(-1, protos.shape[-1])
        ok = ~np.isnan(flat[:, 0])
        out = np.full((len(flat), len(self.components_)), np.nan, np.float32)
        out[ok] = (flat[ok] - self.mean_) @ self.components_.T
        return out.reshape(*shape, -1)

    def embed(self, codes: np.ndarray) -> np.ndarray:
        """(..., k) codes -> (..., d) prototypes."""
        shape = codes.shape[:-1]
        flat = codes.reshape(-1, codes.shape[-1]) @ self.components_ + self.mean_
        return flat.reshape(*shape, -1).astype(np.float32)

    # -- the regressions ---------------------------------------------------------------------

    def _design(self, codes: np.ndarray, label: int) -> np.ndarray:
        """(n, n_labels, k) codes with NaN where empty -> (n, n_labels * (k + 1)) rows."""
        centred = codes - self.label_means_[None]
        has = ~np.isnan(centred[..., 0])
        has[:, label] = False  # never the target itself
        centred = np.where(has[..., None], centred, 0.0)
        return np.concatenate([centred.reshape(len(codes), -1), has.astype(np.float32)], 1)

    def fit(self, protos: np.ndarray, counts: np.ndarray | None = None) -> PrototypeRegression:
        self._fit_space(protos)
        self._fit_regressions(self.codes(protos), counts)
        return self

    def _fit_regressions(self, codes: np.ndarray, counts: np.ndarray | None = None) -> None:
        n_labels = codes.shape[1]
        observed = ~np.isnan(codes[..., 0])
        self.coef_ = np.zeros((n_labels, n_labels * (codes.shape[2] + 1), codes.shape[2]))
        self.intercept_ = np.zeros((n_labels, codes.shape[2]))
        self.alpha_ = np.full(n_labels, np.nan)
        for j in range(n_labels):
            # Writers who have the label and at least one other to predict it from.
            mine = observed[:, j] & (observed.sum(1) >= 2)
            if mine.sum() < 3:
                self.intercept_[j] = self.label_means_[j]
                continue
            x = self._design(codes[mine], j)
            y = codes[mine, j]
            weight = None if counts is None else counts[mine, j].astype(np.float64)
            ridge = _ridge(self.alphas, x, y, weight)
            self.coef_[j], self.intercept_[j], self.alpha_[j] = (
                ridge.coef_.T,
                ridge.intercept_,
                ridge.alpha_,
            )
            if self.rank_steps > 0:
                self.coef_[j], self.intercept_[j] = self._refine(
                    x, y, np.arange(len(y)), self.coef_[j], self.intercept_[j], j
                )
        self.coef_ = self.coef_.astype(np.float32)
        self.intercept_ = self.intercept_.astype(np.float32)

    def _refine(
        self,
        x: np.ndarray,
        y: np.ndarray,
        positive: np.ndarray,
        coef: np.ndarray,
        intercept: np.ndarray,
        label: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ranking refinement of one label's regression (see the class): x (n, p) design
        rows, y (m, k) the real codes of the label's m training writers (the candidates), and
        positive (n,) the writer of each row among them; returns the refined (p, k) coefficients
        and (k,) intercept. Seeded by `seed` and the label alone."""
        import torch  # the rest of this module is numpy; torch only where it trains
        import torch.nn.functional as F

        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + label)
        x = torch.from_numpy(x).float()
        positive = torch.as_tensor(positive, dtype=torch.long)
        components = torch.from_numpy(self.components_).float()
        mean = torch.from_numpy(self.mean_).float()
        # The candidates: every training writer's real prototype, as a unit vector.
        candidates = F.normalize(torch.from_numpy(y).float() @ components + mean, dim=1)
        w0 = torch.from_numpy(coef).float()
        b0 = torch.from_numpy(intercept).float()
        w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
        opt = torch.optim.Adam([w, b], lr=RANK_LR)
        with torch.enable_grad():
            for _ in range(self.rank_steps):
                idx = torch.randint(0, len(x), (min(RANK_BATCH, len(x)),), generator=gen)
                pred = F.normalize((x[idx] @ w + b) @ components + mean, dim=1)
                logits = pred @ candidates.T / self.rank_temperature
                loss = F.cross_entropy(logits, positive[idx])
                loss = loss + self.rank_anchor * (w - w0).square().sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return w.detach().numpy(), b.detach().numpy()

    def predict(self, codes: np.ndarray, label: int, shots: bool = False) -> np.ndarray:
        """Codes (n, k) of label `label` for n writers given their codes (n, n_labels, k); with
        `shots`, by the regressions fitted on a few images per writer (fit_shots) if fitted."""
        if shots and hasattr(self, "shot_coef_"):
            coef, intercept = self.shot_coef_, self.shot_intercept_
        else:
            coef, intercept = self.coef_, self.intercept_
        return self._design(codes, label) @ coef[label] + intercept[label]

    def predict_all(self, codes: np.ndarray) -> np.ndarray:
        """Every cell's code predicted from the writer's other cells: (n, n_labels, k)."""
        return np.stack([self.predict(codes, j) for j in range(codes.shape[1])], 1)

    def out_of_fold(
        self, protos: np.ndarray, counts: np.ndarray | None = None, n_folds: int = 5
    ) -> np.ndarray:
        """predict_all for every writer from regressions fitted without that writer (writers in
        `n_folds` folds, in the space of the whole fit): what training conditions on, so that it
        sees predictions as poor as those it will be asked to render."""
        codes = self.codes(protos)
        out = np.empty_like(codes)
        folds = np.random.default_rng(self.seed).permutation(len(codes)) % n_folds
        saved = self.coef_, self.intercept_, self.alpha_
        try:
            for f in range(n_folds):
                train = np.where((folds != f)[:, None, None], codes, np.nan)
                self._fit_regressions(train, counts)
                out[folds == f] = self.predict_all(codes[folds == f])
        finally:
            self.coef_, self.intercept_, self.alpha_ = saved
        return out

    def fit_shots(
        self,
        embeddings: np.ndarray,
        rows: np.ndarray,
        cols: np.ndarray,
        protos: np.ndarray,
        max_shots: int = 12,
        repeats: int | None = None,
    ) -> PrototypeRegression:
        """Regressions for a writer known from a few images (`fill --reference`): for each label
        j, every training writer who has j is seen through K random images of their other labels
        (K uniform in 1..max_shots, `repeats` draws), and the regression predicts the code of
        their *whole* real cell j from the codes of those few images. A row of one-image cells is
        noisier and sparser than a full row, so these shrink more toward the label's mean where
        the full-row regressions would trust noise. Call after fit(), in its code space.
        `repeats` defaults to about 8,000 rows per regression (4 draws on femnist_digits' 516
        writers, 2 on full FEMNIST's ~3,900), at most 4. With `rank_steps` > 0 they are refined
        as fit()'s are, each row's writer the positive among the label's writers."""
        n_writers, n_labels = protos.shape[:2]
        if repeats is None:
            repeats = int(np.clip(round(8000 / max(n_writers, 1)), 1, 4))
        target = self.codes(protos)  # (W, L, k)
        rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
        rng = np.random.default_rng(self.seed + 1)
        k = target.shape[2]
        self.shot_coef_ = np.zeros((n_labels, n_labels * (k + 1), k), np.float32)
        self.shot_intercept_ = self.label_means_.copy()
        image_codes = self.codes(embeddings)
        for j in range(n_labels):
            others = np.flatnonzero(cols != j)
            has_j = ~np.isnan(target[:, j, 0])
            xs, ys, writers = [], [], []
            for _ in range(repeats):
                # K random images of each writer, among their images of labels other than j.
                key = rng.random(len(others))
                order = others[np.lexsort((key, rows[others]))]
                writer = rows[order]
                rank = np.arange(len(order)) - np.searchsorted(writer, writer)
                budget = rng.integers(1, max_shots + 1, n_writers)
                pick = order[rank < budget[writer]]
                cell = rows[pick] * n_labels + cols[pick]
                sums = np.zeros((n_writers * n_labels, k))
                np.add.at(sums, cell, image_codes[pick])
                counts = np.bincount(cell, minlength=n_writers * n_labels)[:, None]
                with np.errstate(invalid="ignore", divide="ignore"):
                    codes = (sums / counts).reshape(n_writers, n_labels, k)
                mine = has_j & (np.bincount(rows[pick], minlength=n_writers) > 0)
                xs.append(self._design(codes[mine], j))
                ys.append(target[mine, j])
                writers.append(np.flatnonzero(mine))
            x, y = np.concatenate(xs), np.concatenate(ys)
            if len(x) < 3:
                continue
            ridge = _ridge(self.alphas, x, y)
            self.shot_coef_[j], self.shot_intercept_[j] = ridge.coef_.T, ridge.intercept_
            if self.rank_steps > 0:  # candidates: each writer of the label once
                pool = np.flatnonzero(has_j)
                positive = np.searchsorted(pool, np.concatenate(writers))
                self.shot_coef_[j], self.shot_intercept_[j] = self._refine(
                    x, target[pool, j], positive, ridge.coef_.T, ridge.intercept_, j
                )
        return self

    # -- state -------------------------------------------------------------------------------

    _STATE = (
        "mean",
        "components",
        "label_means",
        "coef",
        "intercept",
        "shot_coef",
        "shot_intercept",
    )

    def state(self) -> dict[str, np.ndarray]:
        return {
            name: getattr(self, name + "_") for name in self._STATE if hasattr(self, name + "_")
        }

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> PrototypeRegression:
        self = cls(n_components=len(state["components"]))
        for name in cls._STATE:
            if name in state:
                setattr(self, name + "_", np.asarray(state[name], np.float32))
        return self
