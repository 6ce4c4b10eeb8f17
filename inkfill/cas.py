"""Train on fills, test on real: are a method's fills worth training on?

The Classification Accuracy Score (Ravuri & Vinyals 2019) trains a classifier on generated images
and tests it on real ones; here it is asked three ways, all on the bench's hidden cells:

- writer CAS: a writer classifier (a linear probe on a frozen CNN trained on the reduced data,
  its own seed, not the judge) trained on the reduced data plus the fills of the hidden cells,
  tested on the real images of the hidden cells (half B, the part no row ever trains on). Without
  fills it has never seen those writers write those labels.
- label CAS: a small CNN trained from scratch on nothing but the fills (every label occurs among
  the hidden cells), tested on real images of other cells; beside the same CNN trained on as many
  real images with the same labels.
- personalization: per writer with a hidden cell, the shared label head fine-tuned on that
  writer's own images (and the fills of the label they lack), tested on the writer's real hidden
  images (does the personal model forget the label it never saw from them?) and on their other
  held-out images.

Everything is seeded; the whole evaluation takes well under a minute per method on 2 cores once
the backbone is trained (it is cached like the judge).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .data import WriterMatrix, to_model
from .models import FeatureNet
from .train import Batches, random_shift

# Writer probe: softmax regression on standardised frozen embeddings.
PROBE_EPOCHS, PROBE_BATCH, PROBE_LR = 12, 1024, 3e-3
# Label CAS: a small CNN from scratch, LABEL_EPOCHS over its training images, at most LABEL_STEPS
# (the bench's default 200 cells x 16 images take exactly LABEL_STEPS).
LABEL_WIDTH, LABEL_EPOCHS, LABEL_STEPS, LABEL_BATCH, LABEL_LR = 8, 24, 600, 128, 3e-3
LABEL_TEST = 5000  # real test images of other cells
# Personalization: the shared label head fine-tuned on one writer's images.
PERSONAL_STEPS, PERSONAL_LR = 50, 1e-2


def label_steps(n_images: int) -> int:
    """Steps of the label CAS network on n_images: LABEL_EPOCHS epochs, at most LABEL_STEPS."""
    return max(1, min(LABEL_STEPS, -(-LABEL_EPOCHS * n_images // LABEL_BATCH)))


class TrainOnFills:
    """What does not depend on the method, computed once per bench.

    backbone: a FeatureNet trained on the reduced data (a second judge with its own seed);
    train_index / reference: the bench's split of the reduced data (the backbone trained on the
    first); test_real: per hidden cell, the real images the scores test on (half B).
    """

    def __init__(
        self,
        reduced: WriterMatrix,
        hidden_rows: np.ndarray,
        hidden_cols: np.ndarray,
        test_real: list[np.ndarray],
        backbone: FeatureNet,
        train_index: np.ndarray,
        reference: np.ndarray,
        seed: int,
        device: torch.device,
    ):
        self.reduced, self.seed, self.device = reduced, seed, device
        self.backbone = backbone.to(device).eval()
        self.rows, self.cols = np.asarray(hidden_rows), np.asarray(hidden_cols)
        data = reduced.data
        emb = self.embed(data.images)
        self.mean, self.scale = emb.mean(0), emb.std(0) + 1e-6
        self.base_x = (emb - self.mean) / self.scale
        self.base_writer = torch.as_tensor(reduced.rows, dtype=torch.long)
        self.test_emb = [self.embed(t) for t in test_real]
        self.test_x = [(e - self.mean) / self.scale for e in self.test_emb]
        # Label CAS: real test images of other cells; the real baseline draws from the rest.
        rng = np.random.default_rng(seed)
        pick = rng.permutation(reference)[:LABEL_TEST]
        self.label_test = (data.images[pick], reduced.cols[pick])
        self.pool = np.setdiff1d(np.arange(len(data)), pick)
        # Personalization: each hidden writer's own images, fine-tune half and held-out half.
        in_train = np.zeros(len(data), bool)
        in_train[train_index] = True
        self.personal = []
        for r in self.rows:
            mine = reduced.rows == r
            tune, held = np.flatnonzero(mine & in_train), np.flatnonzero(mine & ~in_train)
            self.personal.append((emb[tune], reduced.cols[tune], emb[held], reduced.cols[held]))

    @torch.no_grad()
    def embed(self, images: np.ndarray) -> torch.Tensor:
        x = to_model(images, self.device)
        parts = [self.backbone(x[s : s + 2048]).float().cpu() for s in range(0, len(x), 2048)]
        return torch.cat(parts) if parts else torch.zeros(0, self.backbone.label_head.in_features)

    # -- the three scores ----------------------------------------------------------------------

    def score(self, fills: list[np.ndarray] | None) -> dict:
        """Every score of one method's fills (fills[k] for hidden cell k); None: no fills."""
        if fills is None:
            return {**self.writer_cas(None), **self.personalization(None)}
        emb = [self.embed(f) for f in fills]  # once, for both the probe and the fine-tuning
        return {**self.writer_cas(emb), **self.label_cas(fills), **self.personalization(emb)}

    def writer_cas(self, fill_emb: list[torch.Tensor] | None) -> dict:
        """fill_emb[k]: the backbone's embeddings of hidden cell k's fills (None: no fills)."""
        x, y = self.base_x, self.base_writer
        if fill_emb is not None:
            fx = (torch.cat(fill_emb) - self.mean) / self.scale
            fy = torch.as_tensor(np.repeat(self.rows, [len(e) for e in fill_emb]), dtype=torch.long)
            x, y = torch.cat([x, fx]), torch.cat([y, fy])
        probe = torch.nn.Linear(x.shape[1], self.reduced.n_writers)
        gen = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            probe.reset_parameters()
        opt = torch.optim.Adam(probe.parameters(), lr=PROBE_LR)
        batches = Batches(len(x), PROBE_BATCH, gen)
        for _ in range(PROBE_EPOCHS * max(1, len(x) // PROBE_BATCH)):
            idx = next(batches)
            loss = F.cross_entropy(probe(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        top1, top5 = [], []
        with torch.no_grad():
            for r, tx in zip(self.rows, self.test_x):
                order = probe(tx).argsort(1, descending=True)[:, :5]
                top1.append((order[:, 0] == int(r)).float())
                top5.append((order == int(r)).any(1).float())
        return {
            "writer_cas_top1": float(torch.cat(top1).mean()),
            "writer_cas_top5": float(torch.cat(top5).mean()),
        }

    def label_cas(self, fills: list[np.ndarray]) -> dict:
        images = np.concatenate(fills)
        labels = np.repeat(self.cols, [len(f) for f in fills])
        return {"label_cas": self._label_net(images, labels)}

    def label_cas_real(self, fills: list[np.ndarray]) -> float:
        """The same CNN on as many real images of the same labels (from other cells)."""
        rng = np.random.default_rng(self.seed + 1)
        want = np.repeat(self.cols, [len(f) for f in fills])
        pick = []
        for c, n in zip(*np.unique(want, return_counts=True)):
            pool = self.pool[self.reduced.cols[self.pool] == c]
            pick.append(rng.choice(pool, size=n, replace=len(pool) < n))
        pick = np.concatenate(pick)
        return self._label_net(self.reduced.data.images[pick], self.reduced.cols[pick])

    def _label_net(self, images: np.ndarray, labels: np.ndarray) -> float:
        return float((self.label_predictions(images, labels) == self.label_test[1]).mean())

    def label_predictions(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """The label CAS network trained on (images, labels): its label columns for the real
        test images (`label_test`), whose share equal to the truth is the label CAS."""
        # Initialisation and dropout draw from the global generator: seeded here, then restored.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return self._train_label_net(images, labels)

    def _train_label_net(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        net = FeatureNet(self.reduced.n_labels, 1, width=LABEL_WIDTH, dim=64).to(self.device)
        gen = torch.Generator().manual_seed(self.seed)
        x = to_model(images, self.device)
        y = torch.as_tensor(labels, dtype=torch.long, device=self.device)
        opt = torch.optim.AdamW(net.parameters(), lr=LABEL_LR, weight_decay=1e-4)
        steps = label_steps(len(x))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, LABEL_LR, total_steps=steps)
        batches = Batches(len(x), LABEL_BATCH, gen)
        net.train()
        for _ in range(steps):
            idx = next(batches).to(self.device)
            loss = F.cross_entropy(net.label_head(net(random_shift(x[idx], 2, gen))), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        net.eval()
        tx = to_model(self.label_test[0], self.device)
        with torch.no_grad():
            pred = torch.cat(
                [net.label_head(net(tx[s : s + 2048])).argmax(1) for s in range(0, len(tx), 2048)]
            )
        return pred.cpu().numpy()

    def personalization(self, fill_emb: list[torch.Tensor] | None) -> dict:
        head = self.backbone.label_head
        missing, other = [], []
        for k, (tune_x, tune_y, held_x, held_y) in enumerate(self.personal):
            x, y = tune_x, torch.as_tensor(tune_y, dtype=torch.long)
            if fill_emb is not None:
                fx = fill_emb[k]
                x = torch.cat([x, fx])
                y = torch.cat([y, torch.full((len(fx),), int(self.cols[k]))])
            mine = torch.nn.Linear(head.in_features, head.out_features)
            mine.load_state_dict({k: v.detach().cpu() for k, v in head.state_dict().items()})
            opt = torch.optim.Adam(mine.parameters(), lr=PERSONAL_LR)
            for _ in range(PERSONAL_STEPS):
                loss = F.cross_entropy(mine(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            with torch.no_grad():
                missing.append((mine(self.test_emb[k]).argmax(1) == int(self.cols[k])).float())
                if len(held_x):
                    other.append((mine(held_x).argmax(1).numpy() == held_y).astype(np.float32))
        return {
            "personal_missing_acc": float(torch.cat(missing).mean()),
            "personal_other_acc": float(np.concatenate(other).mean()) if other else float("nan"),
        }

    def shared(self) -> dict:
        """The shared label head before any fine-tuning, on the same test images."""
        head = self.backbone.label_head
        with torch.no_grad():
            hits = [
                (head(e.to(self.device)).argmax(1).cpu() == int(c)).float()
                for e, c in zip(self.test_emb, self.cols)
            ]
            other = [
                (head(h.to(self.device)).argmax(1).cpu().numpy() == hy).astype(np.float32)
                for _, _, h, hy in self.personal
                if len(h)
            ]
        return {
            "personal_missing_acc": float(torch.cat(hits).mean()),
            "personal_other_acc": float(np.concatenate(other).mean()) if other else float("nan"),
        }
