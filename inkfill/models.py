"""nn.Modules only: DCGAN generator and discriminator for 28x28 images (Radford et al. 2016,
adapted from 64x64), optionally conditioned on a class id (the seed's (label, cluster) pairs);
the personal generators' style encoder, FiLM generator and projection discriminator; the bench's
judge network.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval


def dcgan_init(module: nn.Module) -> None:
    """DCGAN's initialisation: conv weights N(0, 0.02), batch-norm scales N(1, 0.02)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def conv_transpose_4s2(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """ConvTranspose2d(kernel 4, stride 2, padding 1) as a 3x3 convolution to 4 sub-pixel
    channels and a pixel shuffle: the same sums, but oneDNN runs it ~1.5x faster when the output
    has a single channel (the generators' last layer). weight: (C_in, C_out, 4, 4).

    Output row 2m + a takes input rows m - 1, m, m + 1 through kernel rows (3, 1, -) for a = 0
    and (-, 2, 0) for a = 1; the same for columns.
    """
    n_in, n_out = weight.shape[:2]
    taps = ((3, 1, None), (None, 2, 0))
    w = weight.new_zeros(n_out, 2, 2, n_in, 3, 3)
    for a in range(2):
        for b in range(2):
            for ty, ky in enumerate(taps[a]):
                for tx, kx in enumerate(taps[b]):
                    if ky is not None and kx is not None:
                        w[:, a, b, :, ty, tx] = weight[:, :, ky, kx].T
    b = None if bias is None else bias.repeat_interleave(4)
    return F.pixel_shuffle(F.conv2d(x, w.reshape(n_out * 4, n_in, 3, 3), b, padding=1), 2)


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
        if self.training:
            return self.net(z[:, :, None, None])
        last = self.net[-2]  # the single-channel transposed convolution, done faster
        x = self.net[:-2](z[:, :, None, None])
        return torch.tanh(conv_transpose_4s2(x, last.weight, last.bias).float())


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


def folded(net: nn.Module) -> nn.Module:
    """A frozen inference copy of `net` in which every batch norm that directly follows a
    convolution or a linear layer of a Sequential is folded into that layer's weights (the same
    function in eval mode, one pass over the activations fewer), stored channels_last.

    For a frozen network that runs inside a training loss (completion-gan's classifier terms) as
    well as at inference: its forward and backward (to the input) take ~35% less time on CPU.
    """
    net = copy.deepcopy(net).eval()  # fusing needs eval mode; grads are dropped below
    for seq in [m for m in net.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            layer, norm = seq[i], seq[i + 1]
            if isinstance(layer, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                seq[i], seq[i + 1] = fuse_conv_bn_eval(layer, norm), nn.Identity()
            elif isinstance(layer, nn.Linear) and isinstance(norm, nn.BatchNorm1d):
                seq[i], seq[i + 1] = fuse_linear_bn_eval(layer, norm), nn.Identity()
    return net.requires_grad_(False).to(memory_format=torch.channels_last)


def style_head(hidden: int, style_dim: int) -> nn.Sequential:
    """The two-layer MLP on a summed (features + label) vector that ends both style readers."""
    return nn.Sequential(
        nn.LeakyReLU(0.2),
        nn.Linear(hidden, hidden),
        nn.LeakyReLU(0.2),
        nn.Linear(hidden, style_dim),
    )


class StyleEncoder(nn.Module):
    """A set of one writer's images, of any labels and any count -> one style code.

    Each image is read with its label (so the label's own shape can be discounted), mapped to a
    vector, and the set is averaged under a mask: images (B, K, 1, 28, 28), labels (B, K),
    mask (B, K) -> (B, style_dim). Order and count do not matter.
    """

    def __init__(self, n_labels: int, style_dim: int = 64, width: int = 32, hidden: int = 128):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, width, 4, 2, 1),  # (B*K, w, 14, 14)
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width, 2 * width, 4, 2, 1),  # (B*K, 2w, 7, 7)
            nn.LeakyReLU(0.2, inplace=True),
            nn.Flatten(),
            nn.Linear(2 * width * 49, hidden),
        )
        self.label = nn.Embedding(n_labels, hidden)
        self.head = style_head(hidden, style_dim)

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        b, k = labels.shape
        h = self.conv(images.reshape(b * k, 1, 28, 28)) + self.label(labels.reshape(-1))
        h = self.head(h).view(b, k, -1)
        w = mask.float().unsqueeze(-1)
        style = (h * w).sum(1) / w.sum(1).clamp_min(1.0)
        return F.layer_norm(style, style.shape[-1:])  # a bounded code: zero mean, unit scale


class FiLMGenerator(nn.Module):
    """z (B, nz) and a condition (B, cond_dim) -> image (B, 1, 28, 28) in [-1, 1].

    The DCGAN generator, with the condition (a writer's style and a label) both concatenated to
    z and modulating each batch norm's scale and shift (FiLM, Perez et al. 2018). With `head` >
    0 the last transposed convolution makes `head` channels at 28x28 (normed and modulated like
    the others) and a 3x3 convolution draws the pixels from them; with 0 it draws the pixels
    itself, which leaves a faint periodic speckle on the background (the checkerboard of a
    stride-2 transposed convolution, Odena et al. 2016) and coarse strokes. With `blur`, each
    transposed convolution's output is low-passed by a fixed 3x3 binomial filter ([1, 2, 1] x
    [1, 2, 1] / 16, edges replicated), which has no gain at the period-2 frequency of that
    checkerboard (the blur after upsampling of StyleGAN, Karras et al. 2019); the filter is a
    buffer, so a run's tensors say whether its generator has it.

    With `source` > 0 it also reads a source image (B, 1, 28, 28) through a small encoder of
    that width, whose features at 7x7, 14x14 (and 28x28 with `head`) are added to the drawing's
    before each norm (skip connections, as in a U-Net): the generator edits a real image rather
    than drawing from noise alone. The projections start at zero: at first it ignores the source.
    """

    def __init__(
        self,
        nz: int,
        cond_dim: int,
        ngf: int = 32,
        head: int = 0,
        blur: bool = False,
        source: int = 0,
    ):
        super().__init__()
        self.nz, self.head = nz, head
        if blur:
            taps = torch.tensor([1.0, 2.0, 1.0])
            self.register_buffer("blur", (taps[:, None] * taps[None] / 16)[None, None])
        else:
            self.blur = None
        self.fc = nn.Linear(nz + cond_dim, ngf * 4 * 49)
        self.up1 = nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False)  # 7 -> 14
        self.up2 = nn.ConvTranspose2d(ngf * 2, head or 1, 4, 2, 1, bias=not head)  # 14 -> 28
        self.norm0 = nn.BatchNorm2d(ngf * 4, affine=False)
        self.norm1 = nn.BatchNorm2d(ngf * 2, affine=False)
        self.film0 = nn.Linear(cond_dim, 2 * ngf * 4)
        self.film1 = nn.Linear(cond_dim, 2 * ngf * 2)
        films = [self.film0, self.film1]
        if head:
            self.norm2 = nn.BatchNorm2d(head, affine=False)
            self.film2 = nn.Linear(cond_dim, 2 * head)
            self.out = nn.Conv2d(head, 1, 3, 1, 1)
            films.append(self.film2)
        self.ngf = ngf
        self.source = source
        if source:
            w = source
            self.src28 = nn.Conv2d(1, w, 3, 1, 1)
            self.src14 = nn.Conv2d(w, 2 * w, 4, 2, 1)
            self.src7 = nn.Conv2d(2 * w, 4 * w, 4, 2, 1)
            self.skip7 = nn.Conv2d(4 * w, ngf * 4, 1)
            self.skip14 = nn.Conv2d(2 * w, ngf * 2, 1)
            skips = [self.skip7, self.skip14]
            if head:
                self.skip28 = nn.Conv2d(w, head, 1)
                skips.append(self.skip28)
        dcgan_init(self)
        for film in films:  # start as plain batch norm: scale 1, shift 0
            nn.init.zeros_(film.weight)
            nn.init.zeros_(film.bias)
        if source:
            for skip in skips:  # start as the generator without a source
                nn.init.zeros_(skip.weight)
                nn.init.zeros_(skip.bias)

    @staticmethod
    def _modulate(x, norm, film, cond):
        gamma, beta = film(cond).float().chunk(2, dim=1)  # (B, C) each
        if norm.training:
            return F.relu(norm(x) * (1 + gamma[:, :, None, None]) + beta[:, :, None, None])
        # Inference: batch norm's running statistics and FiLM fold into one scale and shift per
        # (image, channel), one fused pass instead of four over the activations.
        inv = torch.rsqrt(norm.running_var + norm.eps)  # (C,)
        scale = inv * (1 + gamma)
        shift = (beta - norm.running_mean * scale).to(x.dtype)
        scale = scale.to(x.dtype)
        b, c, h, w = x.shape
        if x.is_contiguous(memory_format=torch.channels_last) and c < 64:
            # Few channels: broadcasting (B, C, 1, 1) over channels-last memory runs an inner
            # loop of only C elements (5x slower at 16). Over image rows of (x, channel) pairs,
            # with the scale and shift repeated along the row, it runs W * C: the same products.
            rows = x.permute(0, 2, 3, 1).reshape(b, h, w * c)  # a view
            out = torch.addcmul(shift.repeat(1, w)[:, None], rows, scale.repeat(1, w)[:, None])
            return out.relu_().view(b, h, w, c).permute(0, 3, 1, 2)
        return torch.addcmul(shift[:, :, None, None], x, scale[:, :, None, None]).relu_()

    def _encode(self, source: torch.Tensor | None) -> list[torch.Tensor | None]:
        """The source's skip features at 7x7, 14x14 and 28x28 (Nones without a source)."""
        if not self.source:
            return [None, None, None]
        if source is None:
            raise ValueError("this generator edits a source image: pass one")
        e28 = F.leaky_relu(self.src28(source.to(self.src28.weight.dtype)), 0.2)
        e14 = F.leaky_relu(self.src14(e28), 0.2)
        e7 = F.leaky_relu(self.src7(e14), 0.2)
        return [self.skip7(e7), self.skip14(e14), self.skip28(e28) if self.head else None]

    @staticmethod
    def _plus(x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        return x if skip is None else x + skip.to(x.dtype)

    def forward(
        self, z: torch.Tensor, cond: torch.Tensor, source: torch.Tensor | None = None
    ) -> torch.Tensor:
        s7, s14, s28 = self._encode(source)
        inp, c = torch.cat([z, cond], dim=1), self.ngf * 4
        if self.training:
            x = self.fc(inp).view(len(z), c, 7, 7)
        else:  # the same sums with the rows in (y, x, channel) order: channels_last, no copy
            weight = self.fc.weight.view(c, 49, -1).transpose(0, 1).reshape(49 * c, -1)
            bias = self.fc.bias.view(c, 49).T.reshape(-1)
            x = F.linear(inp, weight, bias).view(len(z), 7, 7, c).permute(0, 3, 1, 2)
        x = self._modulate(self._plus(x, s7), self.norm0, self.film0, cond)
        x = self._modulate(self._plus(self._smooth(self.up1(x)), s14), self.norm1, self.film1, cond)
        if self.head:
            x = self._plus(self._smooth(self.up2(x)), s28)
            x = self._modulate(x, self.norm2, self.film2, cond)
            return torch.tanh(self.out(x).float())
        if self.training:
            return torch.tanh(self._smooth(self.up2(x)).float())
        x = conv_transpose_4s2(x, self.up2.weight, self.up2.bias)
        return torch.tanh(self._smooth(x).float())

    def _smooth(self, x: torch.Tensor) -> torch.Tensor:
        """x through the binomial filter, channel by channel (unchanged without `blur`)."""
        if self.blur is None:
            return x
        kernel = self.blur.to(x.dtype).expand(x.shape[1], 1, 3, 3)
        if self.training:
            padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
        else:
            # bf16 autocast pads in float32 (replication padding is on its float32 list) and
            # the convolution copies the result back to bf16: 3-6x the time of padding as is,
            # for the same values.
            with torch.autocast(x.device.type, enabled=False):
                padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
        return F.conv2d(padded, kernel, groups=x.shape[1])


class PersonalDiscriminator(nn.Module):
    """image (B, 1, 28, 28), label (B,), style (B, style_dim) or None -> (logit (B,), label logits).

    Projection discriminator on the label and (optionally) on the writer's style code, so it
    judges (image, writer, label); an auxiliary head classifies the label (AC-GAN). A minibatch
    standard-deviation feature (Karras et al. 2018) lets it see a batch of identical fakes. With
    `stem` > 0, a stride-1 3x3 convolution of `stem` channels reads the image at 28x28 before the
    stride-2 DCGAN trunk (whose first 4x4 filter otherwise sees each pixel in only 4 places).
    """

    def __init__(
        self, n_labels: int, style_dim: int = 0, ndf: int = 32, group: int = 4, stem: int = 0
    ):
        super().__init__()
        self.group = group
        self.features = Discriminator(ndf).features  # the DCGAN trunk: (B, 2ndf*49)
        if stem:  # a stride-1 stage at 28x28 before the trunk, which then reads its channels
            self.features[0] = nn.Conv2d(stem, ndf, 4, 2, 1)
            stage = [nn.Conv2d(1, stem, 3, 1, 1), nn.LeakyReLU(0.2, inplace=True)]
            self.features = nn.Sequential(*stage, *self.features)
        n_features = ndf * 2 * 49
        self.out = nn.Linear(n_features + 1, 1)
        self.label_embed = nn.Embedding(n_labels, n_features)
        self.style_proj = nn.Linear(style_dim, n_features, bias=False) if style_dim else None
        self.label_head = nn.Linear(n_features, n_labels)
        dcgan_init(self)
        nn.init.zeros_(self.label_embed.weight)
        if self.style_proj is not None:
            nn.init.zeros_(self.style_proj.weight)

    def _batch_spread(self, h: torch.Tensor) -> torch.Tensor:
        """(B, F) -> (B, 1): the mean feature std within each group of `group` images."""
        g = self.group if len(h) % self.group == 0 else 1
        if g == 1:
            return h.new_zeros(len(h), 1)
        # sqrt(var + eps) as in StyleGAN: finite second derivatives (R1) where features agree.
        # The variance written out: Tensor.var over the outer dimension is ~10x slower on CPU.
        x = h.float().view(g, -1, h.shape[1])
        var = (x - x.mean(0)).square().mean(0)
        spread = (var + 1e-8).sqrt().mean(1)  # (B/g,)
        return spread.repeat(g)[:, None].to(h.dtype)

    def forward(self, images, labels, style=None):
        h = self.features(images)
        logit = self.out(torch.cat([h, self._batch_spread(h)], 1)).squeeze(1)
        logit = logit + (self.label_embed(labels) * h).sum(1)
        if self.style_proj is not None and style is not None:
            logit = logit + (self.style_proj(style) * h).sum(1)
        return logit, self.label_head(h)


class PosteriorEncoder(nn.Module):
    """(image, label, style) -> (mu, logvar) of the noise z that, with the style and the label,
    redraws this very image: the encoder of a conditional VAE (the cVAE-GAN of BicycleGAN, Zhu
    et al. 2017). It gives the generator a reconstruction target per real image, so the noise
    cannot be ignored and the style must carry what the writer's other labels tell."""

    def __init__(self, n_labels: int, style_dim: int, nz: int, width: int = 32):
        super().__init__()
        self.features = Discriminator(width).features  # (B, 2w*49)
        self.label_embed = nn.Embedding(n_labels, 64)
        self.head = nn.Sequential(
            nn.Linear(width * 2 * 49 + 64 + style_dim, 256),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(256, 2 * nz),
        )

    def forward(self, images, labels, style):
        h = torch.cat([self.features(images), self.label_embed(labels), style], 1)
        mu, logvar = self.head(h).chunk(2, dim=1)
        return mu, logvar.clamp(-8.0, 4.0)


class PersonalGenerator(nn.Module):
    """(z (B, nz), style (B, style_dim), labels (B,)) -> image: a FiLMGenerator whose condition is
    the writer's style code beside a learned label embedding. With a `support` mask (28, 28),
    pixels outside it are background (-1) in every draw: the generator can only put ink where
    the scans have it (a buffer, so a run's tensors say whether its generator has one)."""

    def __init__(
        self,
        n_labels: int,
        style_dim: int = 64,
        nz: int = 32,
        ngf: int = 32,
        label_dim: int = 32,
        head: int = 0,
        blur: bool = False,
        support: torch.Tensor | None = None,
        source: int = 0,
    ):
        super().__init__()
        self.nz = nz
        self.label_embed = nn.Embedding(n_labels, label_dim)
        nn.init.normal_(self.label_embed.weight, 0.0, 1.0)
        self.net = FiLMGenerator(nz, style_dim + label_dim, ngf, head, blur, source)
        if support is not None:
            self.register_buffer(
                "support", torch.as_tensor(support, dtype=torch.float32)[None, None]
            )
        else:
            self.support = None

    def forward(
        self,
        z: torch.Tensor,
        style: torch.Tensor,
        labels: torch.Tensor,
        source: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """With a source encoder (`source` > 0), `source` (B, 1, 28, 28) in [-1, 1] is the real
        image each draw edits."""
        x = self.net(z, torch.cat([style, self.label_embed(labels)], dim=1), source)
        if self.support is None:
            return x
        return torch.addcmul(self.support - 1, x, self.support)  # x inside, -1 outside


class CollaGenerator(nn.Module):
    """CollaGAN's generator (Lee et al. 2019) for a writer's label images: a small U-Net.

    Input: the writer's images of every label stacked as channels (ink in [0, 1], zeros where a
    label is missing or dropped) and a one-hot mask of the target label as constant planes,
    (B, 2 * n_labels, 28, 28). Output: the target label's image (B, 1, 28, 28) in [-1, 1].

    The seed's U-Net convolves at 28x28 first (width w; then 2w at 14x14 and 4w at 7x7). With
    `unshuffle`, the same U-Net has no 28x28 stage: each 2x2 block of input pixels becomes 4
    channels at 14x14 (space to depth), and the last convolution draws 4 channels at 14x14
    that become the 2x2 blocks of the output (depth to space); the 14x14 and 7x7 stages are the
    same, and a CPU draws ~1.5x the images/s.
    """

    def __init__(self, n_labels: int, width: int = 32, unshuffle: bool = False):
        super().__init__()
        w, self.unshuffle = width, unshuffle

        def block(cin, cout):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
                nn.BatchNorm2d(cout),
                nn.LeakyReLU(0.2, inplace=True),
                nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                nn.BatchNorm2d(cout),
                nn.LeakyReLU(0.2, inplace=True),
            )

        if not unshuffle:
            self.enc1 = block(2 * n_labels, w)  # 28x28
            self.enc2 = block(w, 2 * w)  # 14x14
        else:
            self.enc2 = block(4 * 2 * n_labels, 2 * w)  # 14x14, from the unshuffled input
        self.mid = block(2 * w, 4 * w)  # 7x7
        self.up2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, 2)
        self.dec2 = block(4 * w, 2 * w)
        if not unshuffle:
            self.up1 = nn.ConvTranspose2d(2 * w, w, 2, 2)
            self.dec1 = block(2 * w, w)
            self.out = nn.Conv2d(w, 1, 1)
        else:
            self.out = nn.Conv2d(2 * w, 4, 3, 1, 1)  # 2x2 output pixels per 14x14 position

    @property
    def _input_block(self) -> nn.Sequential:
        return self.enc2 if self.unshuffle else self.enc1

    def _space_to_depth(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(x, 2) if self.unshuffle else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._decode(self._input_block(self._space_to_depth(x)))

    def draw(self, ink: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """forward() of the stacked input (ink, one-hot planes of `target`) without the planes:
        ink (B, L, 28, 28), or for an `unshuffle` net already space to depth (B, 4L, 14, 14);
        target label columns (B,). The planes' part of the first convolution is one fixed map
        per label, computed here and added (less input to make, and half the first
        convolution's work, at inference)."""
        if ink.shape[-1] == 28:
            ink = self._space_to_depth(ink)
        block, n = self._input_block, ink.shape[1]
        n_labels, first = (n // 4 if self.unshuffle else n), block[0]
        planes = torch.eye(n_labels, dtype=ink.dtype, device=ink.device)[:, :, None, None]
        planes = self._space_to_depth(planes.expand(n_labels, n_labels, 28, 28))
        maps = F.conv2d(planes, first.weight[:, n:], padding=1)
        h = F.conv2d(ink, first.weight[:, :n], first.bias, padding=1)
        return self._decode(block[1:](h + maps[target]))

    def _decode(self, e: torch.Tensor) -> torch.Tensor:
        """The U-Net after its input block's output `e` (at 28x28, or 14x14 unshuffled)."""
        e2 = e if self.unshuffle else self.enc2(F.avg_pool2d(e, 2))
        m = self.mid(F.avg_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], 1))
        if self.unshuffle:
            return torch.tanh(F.pixel_shuffle(self.out(d2), 2))
        return torch.tanh(self.out(self.dec1(torch.cat([self.up1(d2), e], 1))))


class CodeStyle(nn.Module):
    """A cell's prototype code (B, code_dim) and its label (B,) -> a style code (B, style_dim):
    the method-specific part of completion-gan's generator, a small MLP with a bounded output."""

    def __init__(self, code_dim: int, n_labels: int, style_dim: int = 64, hidden: int = 128):
        super().__init__()
        self.label = nn.Embedding(n_labels, hidden)
        self.inp = nn.Linear(code_dim, hidden)
        self.net = style_head(hidden, style_dim)

    def forward(self, codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        style = self.net(self.inp(codes) + self.label(labels))
        return F.layer_norm(style, style.shape[-1:])


class DrawPredictor(nn.Module):
    """(noise (B, nz), style (B, style_dim), label (B,)) -> the embedding (B, dim) that the
    method's classifier gives the generator's draw G(noise, style, label), without drawing it:
    completion-gan's herding scores many candidate noises with it and renders only those kept.
    With `source_dim` > 0, for a generator that edits a source image, also the source's
    embedding (B, source_dim) by the same classifier."""

    def __init__(
        self,
        nz: int,
        style_dim: int,
        n_labels: int,
        dim: int = 128,
        hidden: int = 256,
        source_dim: int = 0,
    ):
        super().__init__()
        self.inp = nn.Linear(nz + style_dim, hidden)
        self.label = nn.Embedding(n_labels, hidden)
        self.src = nn.Linear(source_dim, hidden, bias=False) if source_dim else None
        self.net = nn.Sequential(
            nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, dim)
        )
        # The embeddings' mean and scale (set before training): the net learns them unit-sized.
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(()))

    def forward(
        self,
        z: torch.Tensor,
        style: torch.Tensor,
        labels: torch.Tensor,
        source: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = self.inp(torch.cat([z, style], 1)) + self.label(labels)
        if self.src is not None:
            h = h + self.src(source)
        return self.net(h) * self.scale + self.mean

    def per_cell(
        self,
        z: torch.Tensor,
        style: torch.Tensor,
        labels: torch.Tensor,
        which: torch.Tensor | None = None,
        source: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """forward() for C cells of M candidates each: z (C, M, nz), style (C, style_dim) and
        labels (C,) -> (C, M, dim). The style's and label's share of the first layer is computed
        once per cell rather than once per candidate; with S styles a cell (C, S, style_dim),
        candidate m in style which[m] (which: (M,)), once per style; likewise S sources a cell
        (C, S, source_dim), candidate m editing source which[m]."""
        nz = z.shape[-1]
        weight = self.inp.weight
        cell = style @ weight[:, nz:].T + self.inp.bias  # (C, hidden) or (C, S, hidden)
        if style.dim() == 2:
            cell = (cell + self.label(labels))[:, None]
        else:
            cell = cell + self.label(labels)[:, None]
        if self.src is not None:
            cell = cell + self.src(source)  # (C, S, hidden)
        if cell.shape[1] > 1 or self.src is not None:
            cell = cell[:, which]  # (C, M, hidden)
        out = self.net(z @ weight[:, :nz].T + cell)
        return out * self.scale + self.mean
