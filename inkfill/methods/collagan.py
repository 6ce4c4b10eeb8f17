"""CollaGAN (Lee et al., CVPR 2019), the seed paper's named baseline, for writers x labels.

A writer's labels are the "domains": one generator reads the writer's images of all their other
labels, stacked as channels (one image per label, zeros where missing), plus a one-hot mask of
the target label, and draws the target label's image. Trained on observed cells with adversarial,
L1, SSIM, multiple-cycle and label-classifier losses and random input dropout (train.
train_collagan). A filled cell's images differ by which of the writer's images are read and which
labels are dropped, so the fill varies as the writer's own images do.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import distributed
from ..config import CollaGANConfig, InkfillError
from ..data import WriterMatrix, to_images, to_model
from ..models import CollaGenerator, PersonalDiscriminator
from ..progress import tqdm
from ..train import train_collagan
from .base import INFER_CHUNK, Method, cell_generator, cell_seed, save_generator_figures


class _Stacks:
    """The writer x label table of image indices, for drawing one image per label."""

    def __init__(self, matrix: WriterMatrix, device):
        rows, cols, members = matrix.cell_table()
        self.cell = torch.full((matrix.n_writers, matrix.n_labels), -1, dtype=torch.long)
        self.cell[torch.as_tensor(rows), torch.as_tensor(cols)] = torch.arange(len(rows))
        self.members = torch.as_tensor(members)
        self.counts = (self.members >= 0).sum(1)
        self.rows, self.cols = torch.as_tensor(rows), torch.as_tensor(cols)
        self.ink = to_model(matrix.data.images, device)[:, 0].add(1).div(2)  # (N, 28, 28) in [0, 1]
        self.device = device

    def draw(
        self, writers: torch.Tensor, rng: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One random image index per (writer, label) (-1 where empty) and the presence mask."""
        cell = self.cell[writers]  # (B, L)
        present = cell >= 0
        safe = cell.clamp_min(0)
        pick = (torch.rand(cell.shape, generator=rng) * self.counts[safe]).long()
        index = torch.where(present, self.members[safe, pick], torch.full_like(cell, -1))
        return index, present

    def stack(self, index: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """(B, L) image indices and a keep mask -> (B, L, 28, 28) ink, zeros where not kept."""
        x = self.ink[index.clamp_min(0).to(self.device)]
        return x * keep.to(self.device)[..., None, None].to(x.dtype)


class CollaGAN(Method):
    name = "collagan"
    Config = CollaGANConfig
    data_parallel = True  # G and D average their gradients under torchrun

    def _fit(self, matrix: WriterMatrix, progress: bool) -> None:
        n_labels_of = (matrix.counts > 0).sum(1)
        if not (n_labels_of >= 2).any():
            raise InkfillError("collagan: no writer has two labels to learn from")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            rng = distributed.generator(cell_seed(self.seed, "train", self.name))
            stacks = _Stacks(matrix, self.device_)
            # Targets: observed cells of writers with at least one other label (under torchrun,
            # this rank's share of them).
            ok = torch.as_tensor(n_labels_of >= 2)[stacks.rows]
            t_rows, t_cols = stacks.rows[ok], stacks.cols[ok]
            mine = distributed.shard(len(t_rows))
            t_rows, t_cols = t_rows[mine], t_cols[mine]
            dev, b, n_labels = self.device_, self.batch_cells, matrix.n_labels

            def sample():
                k = torch.randint(len(t_rows), (b,), generator=rng)
                rows, cols = t_rows[k], t_cols[k]
                index, present = stacks.draw(rows, rng)
                target_idx = index[torch.arange(b), cols]
                others = present.clone()
                others[torch.arange(b), cols] = False
                # The cycle label: a random other label the writer has.
                score = torch.rand(others.shape, generator=rng) * others
                cycle_col = score.argmax(1)
                # Input dropout, but the cycle label and at least one more input survive.
                kept = others & (torch.rand(others.shape, generator=rng) < self.keep)
                kept[torch.arange(b), cycle_col] = True
                cycle_idx = index[torch.arange(b), cycle_col]
                cycle_kept = kept.clone()
                cycle_kept[torch.arange(b), cycle_col] = False
                return {
                    "inputs": stacks.stack(index, kept),
                    "target_col": cols.to(dev),
                    "target": stacks.ink[target_idx.to(dev)][:, None] * 2 - 1,
                    "cycle_col": cycle_col.to(dev),
                    "cycle_target": stacks.ink[cycle_idx.to(dev)][:, None] * 2 - 1,
                    "cycle_inputs": stacks.stack(index, cycle_kept),
                }

            self.generator_ = CollaGenerator(n_labels, self.width).to(dev)
            disc = PersonalDiscriminator(n_labels, 0, self.ndf).to(dev)
            modules = {"generator": self.generator_, "discriminator": disc}
            done = self._finished(self.name, modules)
            with tqdm(total=self.steps, desc=self.name, disable=not progress) as bar:
                self.history_ = {
                    self.name: done
                    if done is not None
                    else train_collagan(
                        self.generator_,
                        disc,
                        sample,
                        steps=self.steps,
                        n_labels=n_labels,
                        lr=self.lr,
                        beta1=self.beta1,
                        recon_weight=self.recon_weight,
                        ssim_weight=self.ssim_weight,
                        cycle_weight=self.cycle_weight,
                        label_weight=self.label_weight,
                        shift=self.shift,
                        rng=rng,
                        bf16=self.bf16,
                        progress=bar,
                        checkpoint=self._loop(self.name, modules),
                    )  # fmt: skip
                }
            self._finish(self.name, modules, self.history_[self.name])
        # Filling reads the writer's training images: keep them (uint8) with the run.
        self.images_ = matrix.data.images
        self.rows_, self.cols_ = matrix.rows.astype(np.int64), matrix.cols.astype(np.int64)

    def _draw(self, images, cols, target_col, n, rng):
        """n images of target_col from one writer's images (uint8) with label columns `cols`."""
        return self._forward(self._inputs(images, cols, target_col, n, rng))

    def _generate_cells(self, cells, n, seed):
        inputs = []
        for writer, label in cells:
            mine = self.rows_ == self.matrix_.row(writer)
            rng = cell_generator(seed, writer, label)
            col = self.matrix_.col(label)
            inputs.append(self._inputs(self.images_[mine], self.cols_[mine], col, n, rng))
        if not inputs:
            return []
        return list(self._forward(torch.cat(inputs)).reshape(len(cells), n, 28, 28))

    def _forward(self, x, chunk: int = INFER_CHUNK) -> np.ndarray:
        with self._inference():
            out = [to_images(self.generator_(x[s : s + chunk].to(self.device_)))
                   for s in range(0, len(x), chunk)]  # fmt: skip
        return np.concatenate(out) if out else np.zeros((0, 28, 28), np.uint8)

    def _inputs(self, images, cols, target_col, n, rng) -> torch.Tensor:
        """(n, 2L, 28, 28): the writer's label images, randomly dropped, and the target mask."""
        n_labels = len(self.matrix_.label_ids)
        ink = torch.as_tensor(images, dtype=torch.float32) / 255.0  # (M, 28, 28)
        cols = torch.as_tensor(cols)
        x = torch.zeros(n, n_labels, 28, 28)
        for c in torch.unique(cols).tolist():
            if c == target_col:
                continue
            pool = torch.nonzero(cols == c)[:, 0]
            pick = pool[torch.randint(len(pool), (n,), generator=rng)]
            keep = torch.rand(n, generator=rng) < self.fill_keep
            x[:, c] = ink[pick] * keep[:, None, None]
        empty = x.flatten(1).sum(1) == 0
        if empty.any():  # every input dropped: keep them all for these draws
            for c in torch.unique(cols).tolist():
                if c != target_col:
                    pool = torch.nonzero(cols == c)[:, 0]
                    x[empty, c] = ink[pool[torch.randint(len(pool), (1,), generator=rng)]]
        mask = torch.zeros(n, n_labels, 28, 28)
        mask[:, target_col] = 1.0
        return torch.cat([x, mask], 1)

    def _generate(self, writer, label, n, rng):
        row, col = self.matrix_.row(writer), self.matrix_.col(label)
        mine = self.rows_ == row
        return self._draw(self.images_[mine], self.cols_[mine], col, n, rng)

    def generate_from_reference(self, images, labels, label, n, seed=0, name="new"):
        """n images of `label` for a writer known only from `images` (any labels)."""
        self.check_fitted()
        col = self.matrix_.col(label)
        cols = np.array([self.matrix_.col(int(v)) for v in labels])
        if not (cols != col).any():
            raise InkfillError("collagan needs reference images of labels other than the target")
        rng = torch.Generator().manual_seed(cell_seed(seed, name, label))
        return self._draw(images, cols, col, n, rng)

    def save_figures(self, matrix, out_dir, level, metrics):
        save_generator_figures(self, matrix, out_dir)

    def _modules(self):
        return [self.generator_]

    def _state(self):
        tensors = {f"generator.{k}": v for k, v in self.generator_.state_dict().items()}
        tensors.update(
            images=torch.from_numpy(np.ascontiguousarray(self.images_)),
            rows=torch.from_numpy(self.rows_),
            cols=torch.from_numpy(self.cols_),
        )
        return tensors, {}

    def _set_state(self, tensors, config):
        self.generator_ = CollaGenerator(len(self.matrix_.label_ids), self.width)
        self.generator_.load_state_dict(
            {k[10:]: v for k, v in tensors.items() if k.startswith("generator.")}
        )
        self.generator_.eval()
        self.images_ = tensors["images"].numpy()
        self.rows_, self.cols_ = tensors["rows"].numpy(), tensors["cols"].numpy()
