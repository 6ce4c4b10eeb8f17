"""nn.Modules only: DCGAN generator and discriminator for 28x28 images (Radford et al. 2016,
adapted from 64x64), optionally conditioned on a class id (the seed's (label, cluster) pairs).
"""

from __future__ import annotations

import torch
from torch import nn


def dcgan_init(module: nn.Module) -> None:
    """DCGAN's initialisation: conv weights N(0, 0.02), batch-norm scales N(1, 0.02)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class Generator(nn.Module):
    """z (B, nz) [+ class (B,)] -> image (B, 1, 28, 28) in [-1, 1].

    7x7 -> 14x14 -> 28x28 with transposed convolutions, batch norm and ReLU, tanh output. With
    `n_classes`, a learned class embedding is concatenated to z (conditional DCGAN).
    """

    def __init__(self, nz: int = 64, ngf: int = 32, n_classes: int = 0, embed_dim: int = 32):
        super().__init__()
        self.nz, self.n_classes = nz, n_classes
        self.embed = nn.Embedding(n_classes, embed_dim) if n_classes else None
        n_in = nz + (embed_dim if n_classes else 0)
        self.net = nn.Sequential(
            nn.ConvTranspose2d(n_in, ngf * 4, 7, 1, 0, bias=False),  # (B, 4ngf, 7, 7)
            nn.BatchNorm2d(ngf * 4),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False),  # (B, 2ngf, 14, 14)
            nn.BatchNorm2d(ngf * 2),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(ngf * 2, 1, 4, 2, 1),  # (B, 1, 28, 28)
            nn.Tanh(),
        )
        dcgan_init(self)

    def forward(self, z: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(classes)], dim=1)
        return self.net(z[:, :, None, None])


class Discriminator(nn.Module):
    """image (B, 1, 28, 28) [+ class (B,)] -> real/fake logit (B,).

    With `n_classes` it is a projection discriminator (Miyato & Koyama 2018): the logit gains
    <embed(class), features>, i.e. each class owns a correction to the last 7x7 filter.
    """

    def __init__(self, ndf: int = 32, n_classes: int = 0):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, ndf, 4, 2, 1),  # (B, ndf, 14, 14)
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False),  # (B, 2ndf, 7, 7)
            nn.BatchNorm2d(ndf * 2),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Flatten(),  # (B, 2ndf*49)
        )
        n_features = ndf * 2 * 49
        self.out = nn.Linear(n_features, 1)
        self.embed = nn.Embedding(n_classes, n_features) if n_classes else None
        dcgan_init(self)
        if self.embed is not None:
            nn.init.zeros_(self.embed.weight)  # start as the unconditional discriminator

    def forward(self, images: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        h = self.features(images)
        logit = self.out(h).squeeze(1)
        if self.embed is not None:
            logit = logit + (self.embed(classes) * h).sum(dim=1)
        return logit


class FeatureNet(nn.Module):
    """The judge of `inkfill bench`: image (B, 1, 28, 28) -> embedding (B, dim), with a label head
    and a writer head on top. Trained in-project (no Inception weights offline), it gives the
    feature space of FID and writer retrieval, and the label classifier of accuracy and IS.
    """

    def __init__(self, n_labels: int, n_writers: int, width: int = 24, dim: int = 128):
        super().__init__()

        def block(c_in, c_out):
            return [
                nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]

        w = width
        self.body = nn.Sequential(
            *block(1, w),
            *block(w, w),
            nn.MaxPool2d(2),  # (B, w, 14, 14)
            *block(w, 2 * w),
            *block(2 * w, 2 * w),
            nn.MaxPool2d(2),  # (B, 2w, 7, 7)
            *block(2 * w, 4 * w),
            nn.Flatten(),
            nn.Dropout(0.3),
            nn.Linear(4 * w * 49, dim),
            nn.BatchNorm1d(dim),
            nn.ReLU(inplace=True),
        )
        self.label_head = nn.Linear(dim, n_labels)
        self.writer_head = nn.Linear(dim, n_writers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)
