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
import torch.nn.functional as F

from .. import distributed
from ..config import CollaGANConfig, InkfillError
from ..data import WriterMatrix, to_images, to_model
from ..models import CollaGenerator, PersonalDiscriminator, folded
from ..progress import tqdm
from ..train import train_collagan, use_bf16
from .base import (
    INFER_CHUNK,
    Method,
    blank_margin,
    cell_generator,
    cell_seed,
    save_generator_figures,
)


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

            self.generator_ = CollaGenerator(n_labels, self.width, self.unshuffle).to(dev)
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
        cols = torch.as_tensor(cols)
        counts = torch.bincount(cols, minlength=len(self.matrix_.label_ids))
        uniforms = self._uniforms(n, rng)[None]
        index = _picks(
            uniforms, counts[None], torch.argsort(cols, stable=True), _inked(images),
            torch.tensor([target_col]), self.fill_keep,
        )[0]  # fmt: skip
        return self._forward(images, index, torch.full((n,), target_col))

    def _generate_cells(self, cells, n, seed):
        if not cells:
            return []
        order, counts, start, inked = self._writer_runs()
        rows = torch.tensor([self.matrix_.row(w) for w, _ in cells])
        targets = torch.tensor([self.matrix_.col(lab) for _, lab in cells])
        uniforms = torch.stack([self._uniforms(n, cell_generator(seed, *cell)) for cell in cells])
        index = _picks(
            uniforms, counts[rows], order, inked, targets, self.fill_keep, start=start[rows]
        )
        out = self._forward(self.images_, index.flatten(0, 1), targets.repeat_interleave(n))
        return list(out.reshape(len(cells), n, 28, 28))

    def _uniforms(self, n, rng) -> torch.Tensor:
        """A cell's random numbers: (2, n, L), which image of each label and whether it is kept."""
        return torch.rand(2, n, len(self.matrix_.label_ids), generator=rng)

    def _writer_runs(self) -> tuple[torch.Tensor, ...]:
        """The run's images by writer and label, made once per fitted or loaded run (fill
        calls _generate_cells once per chunk of cells): `order` (N,), every image's index
        sorted by writer, then label, then data order, so that each writer's images of a label
        are one run of it, as _draw orders one writer's; `counts` and `start` (W, L), each
        run's length and offset in `order`; `inked` (N,), which images have ink."""
        if getattr(self, "_runs", (None,))[0] is not self.images_:
            n_labels = len(self.matrix_.label_ids)
            key = self.rows_ * n_labels + self.cols_
            order = torch.from_numpy(np.argsort(key, kind="stable"))
            counts = np.bincount(key, minlength=len(self.matrix_.writer_ids) * n_labels)
            start = torch.from_numpy(np.cumsum(counts) - counts).reshape(-1, n_labels)
            counts = torch.from_numpy(counts).reshape(-1, n_labels)
            self._runs = (self.images_, (order, counts, start, _inked(self.images_)))
        return self._runs[1]

    def _forward(self, images, index, targets, chunk: int = INFER_CHUNK) -> np.ndarray:
        """Draws for B inputs given as indices into `images` (N, 28, 28) uint8: index (B, L), one
        image per label (-1: none), and the target label columns (B,). The generator's inputs
        are made a chunk at a time (B of them at once would take B * 3 KB a label), gathered
        from the images as the generator reads them (`_bank`)."""
        net, out = self._inference_generator(), []
        bank = self._bank() if images is self.images_ else self._make_bank(images)
        blank = len(bank) - 1
        with self._inference():
            for s in range(0, len(index), chunk):
                part = index[s : s + chunk].to(self.device_)
                ink = bank[torch.where(part < 0, blank, part)]  # missing, dropped: blank
                if self.unshuffle:  # (b, L, 14, 14, 4) -> (b, 4L, 14, 14), channels-last
                    b, n = part.shape
                    ink = ink.permute(0, 2, 3, 1, 4).reshape(b, 14, 14, 4 * n)
                    ink = ink.permute(0, 3, 1, 2)
                out.append(to_images(net.draw(ink, targets[s : s + chunk].to(self.device_))))
        images = np.concatenate(out) if out else np.zeros((0, 28, 28), np.uint8)
        return blank_margin(images, self.margin)

    def _bank(self) -> torch.Tensor:
        """`_make_bank` of the run's images, made once per fitted or loaded run and device."""
        key = (self.images_, self.device_)
        cached = getattr(self, "_banked", None)
        if cached is None or cached[0][0] is not key[0] or cached[0][1] != key[1]:
            self._banked = (key, self._make_bank(self.images_))
        return self._banked[1]

    def _make_bank(self, images: np.ndarray, step: int = 65536) -> torch.Tensor:
        """(N, 28, 28) uint8 -> the generator's inputs, a blank image appended: ink in [0, 1]
        in its compute dtype (bf16 where native: 2 bytes a pixel), and for an `unshuffle` net
        (N + 1, 14, 14, 4), each 2x2 block's pixels as channels (gathered per label and
        reshaped, channels-last as its convolutions run: faster than unshuffling each chunk,
        benchmarks/results/collagan_width.md). Made `step` images at a time (no float32 copy
        of them all)."""
        dtype = torch.bfloat16 if use_bf16(self.device_, self.bf16) else torch.float32
        shape = (14, 14, 4) if self.unshuffle else (28, 28)
        bank = torch.zeros(len(images) + 1, *shape, dtype=dtype, device=self.device_)
        for s in range(0, len(images), step):
            part = torch.from_numpy(np.ascontiguousarray(images[s : s + step], np.uint8))
            ink = part.to(self.device_, torch.float32).div_(255.0).to(dtype)
            if self.unshuffle:
                ink = F.pixel_unshuffle(ink[:, None], 2).permute(0, 2, 3, 1)
            bank[s : s + len(ink)] = ink
        return bank

    def _inference_generator(self) -> CollaGenerator:
        """The generator with each batch norm folded into its convolution, channels-last (the
        same function; 1.6x the images/s on an AVX-512 BF16 CPU), made once per fitted or
        loaded generator (and device) and used for every fill, so a cell's images do not depend
        on how many are drawn at once."""
        cached = getattr(self, "_folded", None)
        if cached is None or cached[0] is not self.generator_ or cached[1] != self.device_:
            self._folded = (self.generator_, self.device_, folded(self.generator_))
        return self._folded[2]

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
        # Runs from before the `unshuffle` parameter have the 28x28 stage, and no word of it.
        self.unshuffle = "generator.enc1.0.weight" not in tensors
        self.generator_ = CollaGenerator(len(self.matrix_.label_ids), self.width, self.unshuffle)
        self.generator_.load_state_dict(
            {k[10:]: v for k, v in tensors.items() if k.startswith("generator.")}
        )
        self.generator_.eval()
        self.images_ = tensors["images"].numpy()
        self.rows_, self.cols_ = tensors["rows"].numpy(), tensors["cols"].numpy()


def _picks(uniforms, counts, order, inked, targets, fill_keep, start=None) -> torch.Tensor:
    """Which image of the writer each draw reads for each label: (C, n, L) indices (-1: none)
    for C cells of n draws. For every label but the target, one of the writer's images,
    uniformly, kept with probability `fill_keep`; a draw that keeps nothing with ink reads all
    its picks instead.

    uniforms (C, 2, n, L) in [0, 1): the pick and the keep; counts (C, L): the cell's writer's
    images of each label, which are `order[start + k]` for k < count (start (C, L); default:
    the labels' runs one after another from 0, one writer's images); inked (N,): which images
    have ink; targets (C,): the cells' label columns, never read."""
    if start is None:
        start = torch.cumsum(counts, 1) - counts
    have = counts > 0
    have[torch.arange(len(targets)), targets] = False
    u, keep = uniforms.unbind(1)  # (C, n, L) each
    k = (u * counts[:, None]).long().clamp_max(counts[:, None] - 1).clamp_min(0)
    at = (start[:, None] + k).clamp_max(len(order) - 1)
    pick = torch.where(have[:, None], order[at], -1)
    index = torch.where(keep < fill_keep, pick, -1)
    empty = ~(inked[index.clamp_min(0)] & (index >= 0)).any(-1, keepdim=True)
    return torch.where(empty, pick, index)


def _inked(images: np.ndarray) -> torch.Tensor:
    """(M,) bool: which of the (M, 28, 28) images have any ink."""
    return torch.from_numpy(np.asarray(images).reshape(len(images), -1).any(1))
