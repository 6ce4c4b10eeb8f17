"""Generators that learn each writer's style: the seed's approaches 1 and 2.

- embed-gan (A1): F(i*, j*): a learned embedding per writer i and per label j, and a GAN
  generator G(z, i*, j*); the writer embeddings are learned from the cells each writer has.
- encoder-gan (A2): the writer's embedding is read from their images by a style encoder shared
  by all writers, so it also fills cells of writers never seen in training, from a few images.

Both train in the personal generators' one loop (train.train_personal_gan) with the same
objective (train.PersonalLoss), a conditional VAE-GAN: a
posterior encoder infers the noise that redraws each real image from (style, label), with an L1
reconstruction and a KL term; a projection discriminator on (image, label, style) with an
auxiliary label classifier; and a feature loss: a cell's generated images must match its real ones
on average in the embedding of a frozen label+writer classifier trained first (whose features are
also encoder-gan's default style encoder, as the seed suggests).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from .. import distributed
from ..config import EmbedGANConfig, EncoderGANConfig, InkfillError
from ..data import ModelImages, WriterMatrix, to_images, to_model
from ..models import (
    FeatureNet,
    PersonalDiscriminator,
    PersonalGenerator,
    PosteriorEncoder,
    StyleEncoder,
    folded,
)
from ..progress import tqdm
from ..train import PersonalLoss, train_feature_net, train_personal_gan
from .base import INFER_CHUNK, Method, cell_generator, cell_seed, save_generator_figures

log = logging.getLogger(__name__)


class _CellSampler:
    """Random observed cells (w, j) of writers with at least two labels (this rank's share under
    torchrun), each with one real image of the cell, the cell's mean image (and mean embedding,
    given `embeddings`), and a style set: up to `style_images` images of writer w drawn from
    their images, of which those of label j are masked out, so that nothing of the target cell
    reaches a style read from the set. With `two_sets`, a second style set of the same writer
    ("style_b_*") that excludes label j too and shares no image with the first (two views of one
    writer, for contrastive terms). With `embeddings` and `real_per_cell` r > 0, also the
    embeddings of r of the cell's images ("cell_features" (B, r, dim)), distinct while the cell
    has that many."""

    def __init__(
        self,
        matrix: WriterMatrix,
        device,
        batch_cells: int,
        style_images: int,
        rng,
        embeddings=None,
        two_sets: bool = False,
        real_per_cell: int = 0,
    ):
        self.device, self.batch_cells, self.k, self.rng = device, batch_cells, style_images, rng
        self.two_sets, self.real_per_cell = two_sets, real_per_cell
        self.embeddings = embeddings
        rows, cols, members = matrix.cell_table()
        n_labels_of = (matrix.counts > 0).sum(1)
        keep = n_labels_of[rows] >= 2  # a style set needs another label of the same writer
        self.rows, self.cols, self.members = (
            torch.as_tensor(a[keep]) for a in (rows, cols, members)
        )
        self.counts = (self.members >= 0).sum(1)
        self.mine = distributed.shard(len(self.rows))  # under torchrun, this rank's cells
        self.images = ModelImages(matrix.data.images, device)  # [idx] -> (..., 1, 28, 28)
        self.image_cols = torch.as_tensor(matrix.cols)
        # Each cell's mean image: sum its images with index_add, divide by the count.
        cell_of = torch.full((len(matrix.data),), -1, dtype=torch.long)
        valid = self.members >= 0
        cell_of[self.members[valid]] = torch.arange(len(self.rows))[:, None].expand_as(
            self.members
        )[valid]
        sums = torch.zeros(len(self.rows), 784, device=device)
        has = (cell_of >= 0).to(device)
        cell_of_dev = cell_of.to(device)
        for part in torch.nonzero(has)[:, 0].split(65536):  # float images a chunk at a time
            sums.index_add_(0, cell_of_dev[part], self.images[part].view(-1, 784))
        self.means = (sums / self.counts.to(device)[:, None]).view(-1, 1, 28, 28)
        self.mean_features = None
        if embeddings is not None:  # (N, dim): each cell's mean embedding, the same way
            f = torch.zeros(len(self.rows), embeddings.shape[1], device=device)
            f.index_add_(0, cell_of.to(device)[has], embeddings[has])
            self.mean_features = f / self.counts.to(device)[:, None]
        # Each writer's images, padded with -1.
        order = np.argsort(matrix.rows, kind="stable")
        counts_w = np.bincount(matrix.rows, minlength=matrix.n_writers)
        table = np.full((matrix.n_writers, counts_w.max()), -1, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(counts_w)])
        for r in range(matrix.n_writers):
            table[r, : counts_w[r]] = order[starts[r] : starts[r + 1]]
        self.writer_images, self.writer_counts = torch.as_tensor(table), torch.as_tensor(counts_w)

    def __len__(self) -> int:
        return len(self.rows)

    def __call__(self) -> dict[str, torch.Tensor]:
        b, k, g = self.batch_cells, self.k, self.rng
        cell = self.mine[torch.randint(len(self.mine), (b,), generator=g)]
        rows, cols = self.rows[cell], self.cols[cell]
        pick = (torch.rand(b, generator=g) * self.counts[cell]).long()
        real = self.members[cell, pick]
        # Style sets: k draws among the writer's images, keeping other labels and a random size.
        pos = (torch.rand(b, k, generator=g) * self.writer_counts[rows, None]).long()
        style_idx = self.writer_images[rows[:, None], pos]  # (B, K)
        size = torch.randint(1, k + 1, (b, 1), generator=g)
        mask = (self.image_cols[style_idx] != cols[:, None]) & (torch.arange(k)[None] < size)
        dev = self.device
        batch = {
            "rows": rows.to(dev),
            "labels": cols.to(dev),
            "real": self.images[real.to(dev)],
            "mean": self.means[cell.to(dev)],
            "style_images": self.images[style_idx.to(dev)],  # (B, K, 1, 28, 28)
            "style_labels": self.image_cols[style_idx].to(dev),
            "style_mask": mask.to(dev),
            "mean_features": None
            if self.mean_features is None
            else self.mean_features[cell.to(dev)],
        }
        if self.real_per_cell and self.embeddings is not None:
            # r of the cell's members in a random order (wrapping round where it has fewer).
            keys = torch.rand(self.members[cell].shape, generator=g)
            order = keys.masked_fill(self.members[cell] < 0, 2.0).argsort(1)
            ahead = torch.arange(self.real_per_cell)[None] % self.counts[cell][:, None]
            idx = self.members[cell[:, None], order.gather(1, ahead)]  # (B, r)
            batch["cell_features"] = self.embeddings[idx.to(dev)]
        if self.two_sets:
            pos = (torch.rand(b, k, generator=g) * self.writer_counts[rows, None]).long()
            other = self.writer_images[rows[:, None], pos]  # (B, K)
            size = torch.randint(1, k + 1, (b, 1), generator=g)
            in_first = ((other[:, :, None] == style_idx[:, None, :]) & mask[:, None, :]).any(2)
            keep = (self.image_cols[other] != cols[:, None]) & (torch.arange(k)[None] < size)
            batch["style_b_images"] = self.images[other.to(dev)]
            batch["style_b_labels"] = self.image_cols[other].to(dev)
            batch["style_b_mask"] = (keep & ~in_first).to(dev)
            batch["style_index"], batch["style_b_index"] = style_idx.to(dev), other.to(dev)
        return batch


class _PersonalGAN(Method):
    """What embed-gan and encoder-gan share: the generator, training, sampling and state."""

    data_parallel = True  # the classifier and the GAN average their gradients under torchrun

    def _style_modules(self) -> dict[str, torch.nn.Module]:
        raise NotImplementedError

    def _fit(self, matrix: WriterMatrix, progress: bool) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            rng = distributed.generator(cell_seed(self.seed, "train", self.name))
            self.classifier_ = self._train_classifier(matrix, progress)
            with torch.no_grad():
                x = ModelImages(matrix.data.images, self.device_)
                embeddings = torch.cat(
                    [self.classifier_(x[s : s + 2048]) for s in range(0, len(x), 2048)]
                )
            k = getattr(self, "style_images", 1)
            sampler = _CellSampler(matrix, self.device_, self.batch_cells, k, rng, embeddings)
            if not len(sampler):
                raise InkfillError(f"{self.name}: no writer has two labels to learn a style from")
            self.generator_ = PersonalGenerator(
                matrix.n_labels, self.style_dim, self.nz, self.ngf
            ).to(self.device_)
            disc = PersonalDiscriminator(matrix.n_labels, self.style_dim, self.ndf).to(self.device_)
            self._build_style(matrix, sampler, progress)
            params = [
                p for m in self._style_modules().values() for p in m.parameters() if p.requires_grad
            ]
            head = torch.nn.Linear(self.style_dim, matrix.n_writers).to(self.device_)
            posterior = None
            if self.recon_weight > 0:
                posterior = PosteriorEncoder(matrix.n_labels, self.style_dim, self.nz, self.ndf).to(
                    self.device_
                )
            modules = {"generator": self.generator_, "discriminator": disc, "head": head,
                       **self._style_modules()}  # fmt: skip
            if posterior is not None:
                modules["posterior"] = posterior
            loss = PersonalLoss(
                mean_weight=self.mean_weight, feature_weight=self.feature_weight,
                features=self.classifier_, diversity_weight=self.diversity_weight,
                writer_weight=self.writer_weight, writer_head=head,
                style_weight=getattr(self, "style_weight", 0.0), restyle=self._restyle(),
                recon_weight=self.recon_weight, kl_weight=self.kl_weight,
            )  # fmt: skip
            done = self._finished(self.name, modules)
            if done is None:
                with tqdm(total=self.steps, desc=self.name, disable=not progress) as bar:
                    done = train_personal_gan(
                        self.generator_, disc, self._style_of, params, sampler, loss,
                        steps=self.steps, samples_per_cell=self.samples_per_cell, lr=self.lr,
                        style_lr=self.style_lr, beta1=self.beta1, label_weight=self.label_weight,
                        r1_weight=0.0, judge_style=self.judge_style, shift=self.shift, rng=rng,
                        posterior=posterior, bf16=self.bf16, progress=bar,
                        checkpoint=self._loop(self.name, modules),
                    )  # fmt: skip
            self.history_ = {self.name: done}
            self._finish(self.name, modules, self.history_[self.name])
            for module in self._style_modules().values():
                module.eval()
            self.styles_ = self._writer_styles(matrix, sampler)

    def save_figures(self, matrix, out_dir, level, metrics):
        save_generator_figures(self, matrix, out_dir)

    def _restyle(self):
        return None

    def _train_classifier(self, matrix: WriterMatrix, progress: bool) -> FeatureNet:
        return train_classifier(self, matrix, progress)

    def _generate(self, writer, label, n, rng):
        style = self.styles_[self.matrix_.row(writer)][None]
        return self._sample(style, self.matrix_.col(label), n, rng)

    def _generate_cells(self, cells, n, seed):
        # Each cell's noise from its own stream, then one forward pass for all the cells.
        z = torch.cat([torch.randn(n, self.nz, generator=cell_generator(seed, w, lab))
                       for w, lab in cells])  # fmt: skip
        rows = torch.as_tensor([self.matrix_.row(w) for w, _ in cells]).repeat_interleave(n)
        cols = torch.as_tensor([self.matrix_.col(lab) for _, lab in cells]).repeat_interleave(n)
        images = self._draw(self.truncation * z, self.styles_[rows], cols)
        return list(images.reshape(len(cells), n, 28, 28))

    def _sample(self, style: torch.Tensor, col: int, n: int, rng: torch.Generator) -> np.ndarray:
        z = self.truncation * torch.randn(n, self.nz, generator=rng)
        return self._draw(z, style.expand(n, -1), torch.full((n,), col))

    def _draw(self, z, style, cols, chunk: int = INFER_CHUNK) -> np.ndarray:
        """G(z, style, label) for (N, nz) noise, (N, style_dim) codes, (N,) label columns."""
        dev, out = self.device_, []
        with self._inference():
            for s in range(0, len(z), chunk):
                part = slice(s, s + chunk)
                out.append(to_images(self.generator_(
                    z[part].to(dev), style[part].to(dev), cols[part].to(dev)
                )))  # fmt: skip
        return np.concatenate(out) if out else np.zeros((0, 28, 28), np.uint8)

    def _modules(self):
        return [self.generator_, self.classifier_, *self._style_modules().values()]

    def _state(self):
        tensors = {f"generator.{k}": v for k, v in self.generator_.state_dict().items()}
        tensors.update({f"classifier.{k}": v for k, v in self.classifier_.state_dict().items()})
        for name, module in self._style_modules().items():
            tensors.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
        tensors["styles"] = self.styles_
        return tensors, {}

    def _set_state(self, tensors, config):
        n_labels = len(self.matrix_.label_ids)
        self.generator_ = PersonalGenerator(n_labels, self.style_dim, self.nz, self.ngf)
        self.classifier_ = FeatureNet(n_labels, len(self.matrix_.writer_ids), width=16, dim=128)
        self._build_style_shell(n_labels)
        modules = {
            "generator": self.generator_,
            "classifier": self.classifier_,
            **self._style_modules(),
        }
        for name, module in modules.items():
            prefix = f"{name}."
            module.load_state_dict(
                {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            )
            module.eval()
        self.styles_ = tensors["styles"]


def train_classifier(
    method: Method, matrix: WriterMatrix, progress: bool, width: int = 16, bf16: bool = False
) -> FeatureNet:
    """A label+writer classifier on the training images (the seed's A2 network, "trained for
    domain classification", with a writer head): its embedding is the space of the feature
    loss, and, with encoder="classifier", of the style code. Frozen after training; a finished
    stage of an interrupted fit is loaded instead of trained. `bf16`: trained under bf16
    autocast where native (train_feature_net)."""
    net = FeatureNet(matrix.n_labels, matrix.n_writers, width=width, dim=128).to(method.device_)
    x = ModelImages(matrix.data.images, method.device_)
    cols = torch.as_tensor(matrix.cols, device=method.device_)
    rows = torch.as_tensor(matrix.rows, device=method.device_)
    rng = distributed.generator(cell_seed(method.seed, "classifier", method.name))
    epochs = method.classifier_epochs or auto_classifier_epochs(len(x))
    steps = epochs * max(1, distributed.smallest_shard(len(x)) // 128)
    if method._finished("classifier", {"net": net}) is None:
        # Its dropout draws from the global stream: fork it, so that what follows starts
        # from the same state whether the classifier was trained now or loaded on resume.
        with (
            torch.random.fork_rng(devices=[]),
            tqdm(total=steps, desc=f"{method.name} classifier", disable=not progress) as bar,
        ):
            history = train_feature_net(
                net, x, cols, rows, epochs=epochs, rng=rng, progress=bar, bf16=bf16
            )
        method._finish("classifier", {"net": net}, history)
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


def auto_classifier_epochs(n_images: int, steps: int = 8000, batch: int = 128) -> int:
    """Epochs of the style classifier when not given: 6 on small sets (femnist_digits' ~35k
    images: 1,620 steps), then about `steps` steps in all, at least one epoch (805k images: 1
    epoch, 6,290 steps), so that the classifier stays a fraction of the fit at full scale."""
    return int(np.clip(round(steps * batch / max(n_images, 1)), 1, 6))


@torch.no_grad()
def embed_images(
    net: FeatureNet, images: np.ndarray, device, chunk: int = INFER_CHUNK
) -> torch.Tensor:
    """(N, 28, 28) uint8 -> (N, dim) float32 embeddings of a frozen FeatureNet."""
    if len(images) >= 4 * chunk:  # folding copies the net (~15 ms): worth it for many images
        net = folded(net)  # the same function, ~1.8x the images/s on an AVX2 CPU
    x = ModelImages(images, device)  # converted a chunk at a time
    parts = [net(x[s : s + chunk]).float() for s in range(0, len(x), chunk)]
    return torch.cat(parts) if parts else torch.zeros(0, net.label_head.in_features, device=device)


def _bounded(style: torch.Tensor) -> torch.Tensor:
    """Style codes with zero mean and unit scale, as the style encoders also return them."""
    return torch.nn.functional.layer_norm(style, style.shape[-1:])


class EmbedGAN(_PersonalGAN):
    """The seed's approach 1: a learned style embedding per writer (a lookup table)."""

    name = "embed-gan"
    Config = EmbedGANConfig

    def _build_style(self, matrix, sampler, progress):
        self.table_ = torch.nn.Embedding(matrix.n_writers, self.style_dim).to(self.device_)
        torch.nn.init.normal_(self.table_.weight, 0.0, 1.0)

    def _build_style_shell(self, n_labels):
        self.table_ = torch.nn.Embedding(len(self.matrix_.writer_ids), self.style_dim)

    def _style_modules(self):
        return {"table": self.table_}

    def _style_of(self, batch):
        return _bounded(self.table_(batch["rows"]))

    def _writer_styles(self, matrix, sampler):
        return _bounded(self.table_.weight.detach().clone())


class EncoderGAN(_PersonalGAN):
    """The seed's approach 2: a style encoder reads any set of a writer's images."""

    name = "encoder-gan"
    Config = EncoderGANConfig

    def _build_style(self, matrix, sampler, progress):
        self._build_style_shell(matrix.n_labels)
        self.encoder_.to(self.device_)

    def _build_style_shell(self, n_labels):
        if self.encoder == "classifier":
            self.encoder_ = ClassifierStyle(self.classifier_, self.style_dim)
        else:
            self.encoder_ = StyleEncoder(n_labels, self.style_dim)

    def _style_modules(self):
        # The classifier encoder's own part is its head: its features are the saved classifier.
        if isinstance(self.encoder_, ClassifierStyle):
            return {"encoder": self.encoder_.head}
        return {"encoder": self.encoder_}

    def _style_of(self, batch):
        return self.encoder_(batch["style_images"], batch["style_labels"], batch["style_mask"])

    def _restyle(self):
        def read_back(fake, labels):
            ones = torch.ones(len(fake), 1, dtype=torch.bool, device=fake.device)
            return self.encoder_(fake[:, None], labels[:, None], ones)

        return read_back

    @torch.no_grad()
    def style_from(self, images: np.ndarray, labels: np.ndarray) -> torch.Tensor:
        """The style code (style_dim,) of a set of one writer's images (uint8) and their labels."""
        self.check_fitted()
        cols = torch.as_tensor([self.matrix_.col(int(v)) for v in labels], device=self.device_)
        x = to_model(images, self.device_)[None]  # (1, K, 1, 28, 28)
        mask = torch.ones(1, len(images), dtype=torch.bool, device=self.device_)
        return self.encoder_(x, cols[None], mask)[0]

    @torch.no_grad()
    def _writer_styles(self, matrix, sampler):
        """Each training writer's style, read from up to fill_style_images of their images."""
        rng = np.random.default_rng(self.seed)
        styles = []
        for r in range(matrix.n_writers):
            idx = np.flatnonzero(matrix.rows == r)
            idx = rng.permutation(idx)[: self.fill_style_images]
            styles.append(self.style_from(matrix.data.images[idx], matrix.data.labels[idx]))
        return torch.stack(styles).cpu()

    def generate_from_reference(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        label: int,
        n: int,
        seed: int = 0,
        name: str = "new",
    ) -> np.ndarray:
        """n images of `label` in the style of a writer known only from `images` (any labels)."""
        self.check_fitted()
        col = self.matrix_.col(label)
        style = self.style_from(images, labels)
        return self._sample(
            style[None], col, n, torch.Generator().manual_seed(cell_seed(seed, name, label))
        )


class ClassifierStyle(torch.nn.Module):
    """A frozen label+writer classifier's features, averaged over the set, then a small head."""

    def __init__(self, classifier: FeatureNet, style_dim: int):
        super().__init__()
        self.features = classifier
        self.head = torch.nn.Sequential(
            torch.nn.Linear(128, 128), torch.nn.LeakyReLU(0.2), torch.nn.Linear(128, style_dim)
        )

    def forward(self, images, labels, mask):
        b, k = labels.shape
        self.features.eval()  # frozen, batch norm in inference mode
        h = self.features(images.reshape(b * k, 1, 28, 28)).view(b, k, -1)
        w = mask.float().unsqueeze(-1)
        style = self.head((h * w).sum(1) / w.sum(1).clamp_min(1.0))
        return torch.nn.functional.layer_norm(style, style.shape[-1:])
