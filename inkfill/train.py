"""Training: one adversarial loop for every GAN (`adversarial`), the feature network's loop, and
the losses beside them.

A GAN is a `Game`: what its generator and discriminator train, how a step's batch is drawn, and
the two losses of a step as named terms. The loop owns the rest: optimisers, autocast, gradient
averaging under torchrun, logging, checkpoints and progress (as EDM's one training loop beside its
loss objects). Everything here takes tensors that already sit on the training device, never paths.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .checkpoint import Loop

NegativeSampler = Callable[
    [torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor | None]
]


def bce_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """The discriminator's side of the seed's min-max game: -log D(x) - log(1 - D(G(z)))."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def bce_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The non-saturating generator loss, -log D(G(z)) (Goodfellow et al. 2014, section 3)."""
    return F.softplus(-fake_logits).mean()


class Batches:
    """Endless minibatch indices: shuffled epochs, the last short batch of each dropped. A set
    smaller than one batch is drawn whole each step. Its place can be saved and restored."""

    def __init__(self, n: int, batch_size: int, rng: torch.Generator):
        self.n, self.batch_size, self.rng = n, min(batch_size, n), rng
        self.order, self.pos = torch.zeros(0, dtype=torch.long), 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        if self.pos + self.batch_size > len(self.order):
            self.order, self.pos = torch.randperm(self.n, generator=self.rng), 0
        self.pos += self.batch_size
        return self.order[self.pos - self.batch_size : self.pos]

    def state(self) -> tuple[torch.Tensor, int]:
        return self.order, self.pos

    def load_state(self, order: torch.Tensor, pos: int) -> None:
        self.order, self.pos = order.long(), int(pos)


@functools.cache
def bf16_native(device_type: str) -> bool:
    """Whether `device_type` computes bfloat16 convolutions and matmuls natively: a CUDA GPU
    with bf16, or a CPU whose oneDNN has bf16 kernels (AVX-512 or AMX on x86, BF16 on Arm).
    Elsewhere (an AVX2-only CPU, say) bf16 autocast is emulated: 14x slower per GAN step than
    float32 on a 2-core AVX2 EPYC, measured on completion-gan."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # a build without oneDNN
            return False
    return False


def use_bf16(device: torch.device, asked: bool) -> bool:
    """bf16 where asked for and native on `device` (`bf16_native`); float32 otherwise."""
    return bool(asked) and bf16_native(torch.device(device).type)


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast where asked for and native (`use_bf16`), a no-op otherwise."""
    if not use_bf16(device, enabled):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


class EMA:
    """An exponential moving average of the generator side's weights, the generator that is kept
    (G_ema, Karras et al. 2018 and every StyleGAN since): the live weights keep moving with each
    step's noisy gradients around the equilibrium, and their average draws cleaner images at no
    training cost.

    `averaged` holds a frozen copy of each of `modules`; after every generator step, `update`
    moves it toward the live weights with a half-life of `halflife` steps, shortened to
    `rampup` times the steps taken so far early on (as StyleGAN2 and EDM do), so that the average
    forgets the random start. Buffers (batch-norm statistics) are copied as they are; a
    generator with batch norm should have them measured again for the averaged weights at the end
    (`recalibrate_batch_norm`). Put `averaged` in the loop's checkpoint to resume it."""

    def __init__(self, modules: list[nn.Module], halflife: float, rampup: float = 0.1):
        self.averaged = [copy.deepcopy(m).requires_grad_(False).eval() for m in modules]
        self.halflife, self.rampup = halflife, rampup
        self._live = [p for m in modules for p in m.parameters()]
        self._avg = [p for m in self.averaged for p in m.parameters()]
        self._live_buffers = [b for m in modules for b in m.buffers()]
        self._avg_buffers = [b for m in self.averaged for b in m.buffers()]

    def decay(self, step: int) -> float:
        """The share of the average kept at `step` (1-based)."""
        halflife = min(self.halflife, self.rampup * step)
        return 0.5 ** (1.0 / halflife) if halflife > 0 else 0.0

    @torch.no_grad()
    def update(self, step: int) -> None:
        torch._foreach_lerp_(self._avg, self._live, 1.0 - self.decay(step))
        for avg, live in zip(self._avg_buffers, self._live_buffers):
            avg.copy_(live)


@torch.no_grad()
def recalibrate_batch_norm(
    module: nn.Module, draw: Callable[[], torch.Tensor], batches: int = 64
) -> None:
    """Measure again the running statistics of `module`'s batch norms as the plain mean over
    `batches` calls of `draw()` (which runs `module` forward on fresh inputs): a weight average's
    batch-norm layers otherwise keep statistics measured on other weights (as SWA's update_bn).
    Under torchrun every rank ends with rank 0's statistics."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average
    module.train()
    for _ in range(batches):
        draw()
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    module.eval()
    distributed.broadcast([b for m in norms for b in m.buffers()])


class Game:
    """One GAN for `adversarial`: what it trains and how a step scores it.

    - `modules`: every module of the game (switched to train mode for the loop, eval after; their
      buffers are rank 0's at the end under torchrun);
    - `g_groups`: the generator side's Adam parameter groups (dicts with "params", optionally
      "lr_scale", a multiple of the loop's lr), `d_params` the discriminator's parameters;
    - `keys`: the names `d_loss` and `g_loss` log besides "loss_d" and "loss_g", in log order;
    - `sample()`: the step's batch; `d_loss(batch)` -> (D's loss, logged terms, state for
      `g_loss`), `g_loss(batch, state)` -> (G's loss, logged terms), both called under the
      loop's autocast (a term that needs float32 disables it itself).
    """

    modules: list[nn.Module]
    g_groups: list[dict]
    d_params: list[nn.Parameter]
    keys: tuple[str, ...]
    step: int = 0  # the loop's step (1-based), set before each d_loss

    def sample(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def d_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
        raise NotImplementedError

    def g_loss(self, batch: dict, state: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError


@contextlib.contextmanager
def _frozen(params: list[nn.Parameter]) -> Iterator[None]:
    """No gradients for `params` inside: G's backward passes through D to the images without
    computing D's weight gradients, which G's step never reads (the next D step clears them).
    Only those that took gradients are frozen, and only they are thawed after."""
    trained = [p for p in params if p.requires_grad]
    for p in trained:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trained:
            p.requires_grad_(True)


def adversarial(
    game: Game,
    *,
    steps: int,
    lr: float,
    beta1: float,
    rng: torch.Generator,
    device: torch.device,
    bf16: bool = False,
    log_every: int = 10,
    progress=None,
    checkpoint: Loop | None = None,
    sampler: Batches | None = None,
    ema: EMA | None = None,
) -> dict[str, list[float]]:
    """The one adversarial loop: alternating D and G steps of `game`, Adam(lr, (beta1, 0.999))
    on each side, bf16 autocast where asked. Under torchrun every rank starts from rank 0's
    weights and each step's gradients are averaged over the ranks (one all-reduce per side); the
    game draws this rank's data and `rng` is this rank's noise. Returns the loss history, means
    over every `log_every` steps; a non-finite D or G loss stops training with a clear error. With
    a `checkpoint` (checkpoint.Loop) the loop saves its state (and `sampler`'s place) at log
    boundaries and, if a saved state of this loop exists, continues from it. With an `ema`, its
    average follows the generator side after every step. `progress` is a tqdm bar or None."""
    groups = [
        {"params": list(g["params"]), "lr": lr * g.get("lr_scale", 1.0)} for g in game.g_groups
    ]
    g_params = [p for g in groups for p in g["params"]]
    opt_g = torch.optim.Adam(groups, lr=lr, betas=(beta1, 0.999))
    opt_d = torch.optim.Adam(game.d_params, lr=lr, betas=(beta1, 0.999))
    distributed.broadcast([*game.modules, *g_params, *game.d_params])
    for module in game.modules:
        module.train()
    losses = _LossLog(("loss_d", "loss_g", *game.keys), steps, log_every)
    start = losses.resume(checkpoint, {"g": opt_g, "d": opt_d}, rng, progress, sampler)
    for step in range(start + 1, steps + 1):
        batch = game.sample()
        game.step = step
        with autocast(device, bf16):
            loss_d, logged, state = game.d_loss(batch)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        distributed.average_gradients(game.d_params)
        opt_d.step()

        with _frozen(game.d_params):
            with autocast(device, bf16):
                loss_g, more = game.g_loss(batch, state)
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
        distributed.average_gradients(g_params)
        opt_g.step()
        if ema is not None:
            ema.update(step)

        with torch.no_grad():
            logged.update(more)
            losses.add(step, (loss_d, loss_g, *(logged[k] for k in game.keys)))
        losses.save(checkpoint, step)
        if progress is not None:
            progress.update(1)
    # Batch-norm statistics are each rank's own: end with rank 0's everywhere.
    distributed.broadcast([b for m in game.modules for b in m.buffers()])
    for module in game.modules:
        module.eval()
    return losses.history


class _DCGAN(Game):
    """cluster-gan's game: DCGAN (BCE) on real images, conditional on `classes` when given, with
    negative data augmentation (`negatives`) on D's side."""

    keys = ("d_real", "d_fake")

    def __init__(self, generator, discriminator, real, classes, index, mine, rng, negatives,
                 negative_weight):  # fmt: skip
        self.generator, self.discriminator = generator, discriminator
        self.modules = [generator, discriminator]
        self.g_groups = [{"params": [*generator.parameters()]}]
        self.d_params = [*discriminator.parameters()]
        self.real, self.classes, self.index, self.mine, self.rng = real, classes, index, mine, rng
        self.negatives, self.negative_weight = negatives, negative_weight

    def sample(self):
        idx = self.mine[next(self.index)].to(self.real.device)
        z = torch.randn(len(idx), self.generator.nz, generator=self.rng).to(self.real.device)
        return {"idx": idx, "real": self.real[idx], "z": z,
                "classes": None if self.classes is None else self.classes[idx]}  # fmt: skip

    def d_loss(self, batch):
        y, disc = batch["classes"], self.discriminator
        fake = self.generator(batch["z"], y)
        real_logits = disc(batch["real"], y)
        fake_logits = disc(fake.detach(), y)
        loss = bce_d_loss(real_logits.float(), fake_logits.float())
        if self.negatives is not None and self.negative_weight > 0:
            neg_x, neg_y = self.negatives(batch["idx"], self.rng)
            if len(neg_x):
                loss = loss + self.negative_weight * F.softplus(disc(neg_x, neg_y).float()).mean()
        logged = {
            "d_real": torch.sigmoid(real_logits.detach().float()).mean(),
            "d_fake": torch.sigmoid(fake_logits.detach().float()).mean(),
        }
        return loss, logged, {"fake": fake}

    def g_loss(self, batch, state):
        return bce_g_loss(self.discriminator(state["fake"], batch["classes"]).float()), {}


def train_gan(
    generator: nn.Module,
    discriminator: nn.Module,
    real: torch.Tensor,
    classes: torch.Tensor | None = None,
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 2e-4,
    beta1: float = 0.5,
    rng: torch.Generator,
    log_every: int = 10,
    bf16: bool = False,
    negatives: NegativeSampler | None = None,
    negative_weight: float = 0.0,
    progress=None,
    checkpoint: Loop | None = None,
    memory_format: torch.memory_format = torch.channels_last,
) -> dict[str, list[float]]:
    """DCGAN training (Radford et al.): BCE loss, Adam(lr, (beta1, 0.999)), alternating D and G,
    in `adversarial`.

    real: (N, 1, 28, 28) in [-1, 1]; classes: (N,) ids for a conditional pair, else None.
    Fake images are drawn for the classes of each real batch. With `negatives`, a function of the
    batch's indices and the loop's random generator returning real (images, classes) that must
    count as fake, the discriminator also learns to reject them with weight `negative_weight`
    (negative data augmentation, Sinha et al. 2021; for a conditional pair, mismatched classes as
    in Reed et al. 2016). Returns the loss history (loss_d, loss_g, and D's mean output on real
    and fake images), one entry per `log_every` steps.
    """
    # NHWC (channels_last) lets oneDNN (CPU) and cuDNN pick faster convolution kernels.
    generator.to(memory_format=memory_format)
    discriminator.to(memory_format=memory_format)
    real = real.contiguous(memory_format=memory_format)
    # Under torchrun: batches from this rank's shard, noise of its own.
    mine = distributed.shard(len(real))
    if distributed.active():
        seed = int(torch.randint(2**62, (1,), generator=rng)) + distributed.rank()
        rng = torch.Generator().manual_seed(seed)
    index = Batches(len(mine), batch_size, rng)
    game = _DCGAN(generator, discriminator, real, classes, index, mine, rng, negatives,
                  negative_weight)  # fmt: skip
    return adversarial(
        game, steps=steps, lr=lr, beta1=beta1, rng=rng, device=real.device, bf16=bf16,
        log_every=log_every, progress=progress, checkpoint=checkpoint, sampler=index,
    )  # fmt: skip


def _finite(v: float) -> bool:
    return v == v and abs(v) != float("inf")


def train_feature_net(
    net: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    writers: torch.Tensor,
    *,
    epochs: int,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    rng: torch.Generator,
    bf16: bool = False,
    progress=None,
) -> dict[str, list[float]]:
    """Cross-entropy on both heads of a FeatureNet (label and writer), AdamW, cosine decay.

    images (N, 1, 28, 28) in [-1, 1]; labels and writers (N,) column/row ids. Images are
    shifted by up to two pixels at random, so the net keys on stroke style, not position.
    Under torchrun each rank takes its own shard of the images (an epoch is one pass over the
    shards) and the gradients are averaged over the ranks; pass each rank its own `rng`. With
    `bf16`, the forward pass runs under bf16 autocast where the device computes it natively
    (`use_bf16`; the losses in float32): ~1.7x the steps/s on a CPU with AVX-512 BF16.
    """
    mine = distributed.shard(len(images)).to(images.device)
    steps_per_epoch = max(1, distributed.smallest_shard(len(images)) // batch_size)
    distributed.broadcast([net])
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps_per_epoch
    )
    history: dict[str, list[float]] = {"epoch": [], "loss": [], "label_acc": [], "writer_acc": []}
    net.train()
    index = Batches(len(mine), batch_size, rng)
    for epoch in range(1, epochs + 1):
        sums = torch.zeros(3)
        for _ in range(steps_per_epoch):
            idx = mine[next(index).to(images.device)]
            x = random_shift(images[idx], 2, rng)
            with autocast(x.device, bf16):
                emb = net(x)
                label_logits = net.label_head(emb).float()
                writer_logits = net.writer_head(emb).float()
            loss = F.cross_entropy(label_logits, labels[idx]) + F.cross_entropy(
                writer_logits, writers[idx]
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            distributed.average_gradients(net.parameters())
            opt.step()
            sched.step()
            with torch.no_grad():
                sums += torch.stack(
                    [
                        loss.detach().cpu(),
                        (label_logits.argmax(1) == labels[idx]).float().mean().cpu(),
                        (writer_logits.argmax(1) == writers[idx]).float().mean().cpu(),
                    ]
                )
            if progress is not None:
                progress.update(1)
        means = (sums / steps_per_epoch).tolist()
        history["epoch"].append(epoch)
        for key, value in zip(("loss", "label_acc", "writer_acc"), means):
            history[key].append(value)
    distributed.broadcast(list(net.buffers()))  # batch-norm statistics: rank 0's everywhere
    net.eval()
    return history


class _LossLog:
    """Losses averaged over every `log_every` steps into a history {"step": [...], key: [...]};
    a non-finite D or G loss (the first two keys) stops training with a clear message."""

    def __init__(self, keys: tuple[str, ...], steps: int, log_every: int):
        self.keys, self.steps, self.log_every = keys, steps, log_every
        self.history: dict[str, list[float]] = {"step": [], **{k: [] for k in keys}}
        self.sums = torch.zeros(len(keys))

    def add(self, step: int, values) -> None:
        self.sums += torch.stack([t.detach().float().cpu() for t in values])
        if step % self.log_every and step != self.steps:
            return
        means = (self.sums / ((step - 1) % self.log_every + 1)).tolist()
        self.history["step"].append(step)
        for key, value in zip(self.keys, means):
            self.history[key].append(value)
        self.sums.zero_()
        if not all(map(_finite, means[:2])):
            raise FloatingPointError(f"non-finite loss at step {step}: D {means[0]}, G {means[1]}")

    def resume(self, checkpoint: Loop | None, optimizers, rng, progress, sampler=None) -> int:
        """Continue from the loop's last checkpoint, if any: returns the step to start after."""
        if checkpoint is None:
            return 0
        start, saved = checkpoint.resume(optimizers, rng, sampler)
        if saved is not None:
            self.history = saved
        if progress is not None:
            progress.update(start)
        return start

    def save(self, checkpoint: Loop | None, step: int) -> None:
        """Checkpoint at log boundaries only (the running sums are then zero and the losses
        have just been checked finite)."""
        if checkpoint is not None and step % self.log_every == 0:
            checkpoint.step(step, self.history)


def random_shift(images: torch.Tensor, max_shift: int, rng: torch.Generator) -> torch.Tensor:
    """Translate each image by up to max_shift pixels (zero padding = background at -1)."""
    b, size, device = len(images), images.shape[-1], images.device
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=rng).to(device)
    rows = offsets[:, 0, None] + torch.arange(size, device=device)  # (B, 28)
    cols = offsets[:, 1, None] + torch.arange(size, device=device)
    batch = torch.arange(b, device=device)[:, None, None]
    return padded[batch, 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """Mean structural similarity (Wang et al. 2004) of two image batches (B, 1, H, W) in [0, 1],
    with a Gaussian window; differentiable, so 1 - ssim serves as a loss. Computed in float32
    whatever the autocast: the variances E[x^2] - E[x]^2 cancel catastrophically in bf16 (and
    turned collagan's loss to -inf)."""
    with torch.autocast(x.device.type, enabled=False):
        return _ssim(x.float(), y.float(), window, sigma)


def _ssim(x: torch.Tensor, y: torch.Tensor, window: int, sigma: float) -> torch.Tensor:
    g = torch.arange(window, device=x.device, dtype=torch.float32) - (window - 1) / 2
    g = torch.exp(-(g**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :])[None, None]  # (1, 1, w, w)

    def blur(t):
        return F.conv2d(t, kernel, padding=window // 2)

    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx**2
    vy = blur(y * y) - my**2
    cxy = blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.mean()


class _CollaGAN(Game):
    """CollaGAN's game (see train_collagan)."""

    keys = ("adv", "recon", "ssim", "cycle", "d_label_acc")

    def __init__(self, generator, discriminator, sample, n_labels, weights, shift, rng):
        self.generator, self.discriminator, self.sample = generator, discriminator, sample
        self.modules = [generator, discriminator]
        self.g_groups = [{"params": [*generator.parameters()]}]
        self.d_params = [*discriminator.parameters()]
        self.weights, self.shift, self.rng = weights, shift, rng
        device = next(generator.parameters()).device
        self.eye = torch.eye(n_labels, device=device)[:, :, None, None].expand(-1, -1, 28, 28)

    def judge(self, images, labels):
        images = random_shift(images, self.shift, self.rng) if self.shift else images
        return self.discriminator(images, labels)

    def d_loss(self, batch):
        cols, target = batch["target_col"], batch["target"]
        fake = self.generator(torch.cat([batch["inputs"], self.eye[cols]], 1))
        real_logit, real_cls = self.judge(target, cols)
        fake_logit, _ = self.judge(fake.detach(), cols)
        loss = bce_d_loss(real_logit.float(), fake_logit.float())
        loss = loss + self.weights["label"] * F.cross_entropy(real_cls.float(), cols)
        acc = (real_cls.detach().argmax(1) == cols).float().mean()
        return loss, {"d_label_acc": acc}, {"fake": fake}

    def g_loss(self, batch, state):
        w, fake = self.weights, state["fake"]
        cols, target = batch["target_col"], batch["target"]
        fake_logit, fake_cls = self.judge(fake, cols)
        adv = bce_g_loss(fake_logit.float())
        adv = adv + w["label"] * F.cross_entropy(fake_cls.float(), cols)
        fake01 = (fake.float() + 1) / 2
        recon = (fake.float() - target).abs().mean()
        sim = 1 - ssim(fake01, (target + 1) / 2)
        # Multiple cycle: the fill, put back among the inputs, must let G redraw another label.
        inputs = batch["cycle_inputs"].clone()
        inputs[torch.arange(len(cols), device=inputs.device), cols] = fake01[:, 0].to(inputs.dtype)
        again = self.generator(torch.cat([inputs, self.eye[batch["cycle_col"]]], 1)).float()
        cycle = (again - batch["cycle_target"]).abs().mean() + (
            1 - ssim((again + 1) / 2, (batch["cycle_target"] + 1) / 2)
        )
        loss = adv + w["recon"] * recon + w["ssim"] * sim + w["cycle"] * cycle
        return loss, {"adv": adv, "recon": recon, "ssim": sim, "cycle": cycle}


def train_collagan(
    generator: nn.Module,
    discriminator: nn.Module,
    sample: Callable[[], dict[str, torch.Tensor]],
    *,
    steps: int,
    n_labels: int,
    lr: float,
    beta1: float,
    recon_weight: float,
    ssim_weight: float,
    cycle_weight: float,
    label_weight: float,
    shift: int,
    rng: torch.Generator,
    bf16: bool = False,
    log_every: int = 10,
    progress=None,
    checkpoint: Loop | None = None,
) -> dict[str, list[float]]:
    """Train CollaGAN: G(the writer's other label images, target mask) -> the target image, in
    `adversarial`. Every weight comes from the method's config (no defaults here).

    Each step `sample()` gives, per observed target cell: "inputs" (B, L, 28, 28) the writer's
    images of the other labels (ink in [0, 1], zeros where missing or randomly dropped),
    "target_col" (B,) and "target" (B, 1, 28, 28) a real image of the target cell in [-1, 1],
    and for the cycle a second label the writer has: "cycle_col", "cycle_target" and
    "cycle_inputs" (the inputs without it). G's loss: adversarial (non-saturating) with an
    auxiliary label classifier in D; `recon_weight` * L1 and `ssim_weight` * (1 - SSIM) to the
    target; and the multiple-cycle loss: with the generated image put in the target's channel,
    G must redraw the cycle label's real image, weighted by `cycle_weight` (L1 + SSIM).
    """
    weights = {"recon": recon_weight, "ssim": ssim_weight, "cycle": cycle_weight,
               "label": label_weight}  # fmt: skip
    game = _CollaGAN(generator, discriminator, sample, n_labels, weights, shift, rng)
    device = next(generator.parameters()).device
    return adversarial(
        game, steps=steps, lr=lr, beta1=beta1, rng=rng, device=device, bf16=bf16,
        log_every=log_every, progress=progress, checkpoint=checkpoint,
    )  # fmt: skip


class _GeneratorLoss:
    """A generator objective beyond the adversarial term, as named terms (EDM's loss objects):
    every weight comes from the method's config (no defaults here), terms of weight 0 are not
    computed, and `terms` lists the names that are, in the order the loop logs them. Called as
    loss(fake, batch, m, style, recon, mu, logvar) for B cells with m draws each (fake
    (B*m, 1, 28, 28)), the cell sampler's batch, the cells' style codes (B, style_dim) and, with a
    cVAE posterior, the reconstructions of the real images and the posterior's mean and log-var.
    Modules with parameters of their own (`params`) learn with the generator."""

    weights: dict[str, float]
    params: tuple[nn.Parameter, ...] | list[nn.Parameter] = ()

    @property
    def terms(self) -> tuple[str, ...]:
        return tuple(k for k, w in self.weights.items() if w != 0)

    def _cvae(self, out, batch, recon, mu, logvar) -> None:
        """The cVAE's L1 reconstruction of each real image from its inferred noise, and the KL of
        that noise to N(0, I)."""
        if recon is not None and "recon" in self.terms:
            out["recon"] = (recon.float() - batch["real"]).abs().mean()
        if mu is not None and "kl" in self.terms:
            kl = 0.5 * (mu.float() ** 2 + logvar.float().exp() - 1 - logvar.float()).sum(1)
            out["kl"] = kl.mean()

    def total(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.weights[k] * v for k, v in terms.items())


class PersonalLoss(_GeneratorLoss):
    """embed-gan's and encoder-gan's objective (a conditional VAE-GAN, as in BicycleGAN):

    - mean: L1 between the mean of a cell's draws and its real mean image;
    - features: squared distance of the draws' mean `features` embedding to the real cell's;
    - seeking: mode seeking (Mao et al. 2019), minus the mean L1 between two draws of one cell
      (clamped at 0.5), so that draws for one cell differ;
    - writer: CE of `writer_head(style)` against the writer (a style code must tell writers
      apart, else it can collapse to a constant);
    - style: L1 between restyle(draw) (the style read back from a generated image, the encoder
      method) and the style it was drawn from;
    - recon / kl: the cVAE terms.
    """

    def __init__(
        self,
        *,
        mean_weight: float,
        feature_weight: float,
        features: nn.Module | None,
        diversity_weight: float,
        writer_weight: float,
        writer_head: nn.Module | None,
        style_weight: float,
        restyle: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
        recon_weight: float,
        kl_weight: float,
    ):
        # The cVAE terms need a posterior, which the methods build only when recon_weight > 0.
        kl_weight = kl_weight if recon_weight > 0 else 0.0
        self.features, self.writer_head, self.restyle = features, writer_head, restyle
        self.weights = {
            "mean": mean_weight,
            "features": feature_weight if features is not None else 0.0,
            "seeking": diversity_weight,
            "writer": writer_weight if writer_head is not None else 0.0,
            "style": style_weight if restyle is not None else 0.0,
            "recon": recon_weight,
            "kl": kl_weight,
        }
        self.params = [*writer_head.parameters()] if writer_head is not None else []

    def __call__(self, fake, batch, m, style, recon=None, mu=None, logvar=None):
        labels, terms = batch["labels"], self.terms
        out: dict[str, torch.Tensor] = {}
        by_cell = fake.float().view(len(labels), m, -1)  # (B, m, 784)
        if "mean" in terms:
            out["mean"] = (by_cell.mean(1) - batch["mean"].flatten(1)).abs().mean()
        if "features" in terms:
            emb = self.features(fake).float().view(len(labels), m, -1).mean(1)
            out["features"] = ((emb - batch["mean_features"]) ** 2).sum(1).mean()
        if "seeking" in terms:  # one draw per cell: nothing to tell apart
            apart = (by_cell[:, 0] - by_cell[:, -1]).abs().mean(1).clamp(max=0.5).mean()
            out["seeking"] = -apart
        if "writer" in terms:
            out["writer"] = F.cross_entropy(self.writer_head(style).float(), batch["rows"])
        if "style" in terms:
            again = self.restyle(fake, labels.repeat_interleave(m)).float()
            out["style"] = (again - style.detach().float().repeat_interleave(m, 0)).abs().mean()
        self._cvae(out, batch, recon, mu, logvar)
        return out


class CellLoss(_GeneratorLoss):
    """completion-gan's objective: its draws of a cell are compared with the *real* cell.

    - classify: cross-entropy of the feature network's label head on each draw (the draws must
      read as their label whatever the discriminator's state);
    - features: squared distance of the draws' mean embedding to the real cell's prototype;
    - nce: InfoNCE over writers: the draws' mean embedding, centred on the label's mean, must be
      nearer (cosine / temperature) the real cell's prototype than any other writer's prototype of
      the label (the bench's retrieval task, in the method's own feature space);
    - spread: |log| of the ratio of the draws' mean pairwise pixel distance to the real cell's
      (a collapsed cell, far below, pulls hard);
    - energy: the energy distance (Szekely & Rizzo 2013) between the draws' embeddings and those
      of real images of the cell (the sampler's "cell_features"): 2 E|x - y| - E|x - x'| -
      E|y - y'|, zero only when the two sets have one distribution, so the draws must take the
      writer's own variety in the classifier's space, not only its mean;
    - recon / kl: the cVAE terms.
    """

    def __init__(
        self,
        features: nn.Module,
        prototypes: torch.Tensor,
        valid: torch.Tensor,
        *,
        classify_weight: float,
        feature_weight: float,
        nce_weight: float,
        nce_temperature: float,
        spread_weight: float,
        recon_weight: float,
        kl_weight: float,
        energy_weight: float,
    ):
        self.features = features
        self.prototypes, self.valid = prototypes, valid  # (L, W, d), (L, W) bool
        self.label_means = (prototypes * valid[..., None]).sum(1) / valid.sum(1).clamp_min(1)[
            :, None
        ]
        self.weights = {
            "classify": classify_weight,
            "features": feature_weight,
            "nce": nce_weight,
            "spread": spread_weight,
            "energy": energy_weight,
            "recon": recon_weight,
            "kl": kl_weight,
        }
        self.temperature = nce_temperature

    def __call__(self, fake, batch, m, style=None, recon=None, mu=None, logvar=None):
        rows, labels, terms = batch["rows"], batch["labels"], self.terms
        out: dict[str, torch.Tensor] = {}
        if {"classify", "features", "nce", "energy"} & set(terms):
            each = self.features(fake).float()  # (B*m, d)
            emb = each.view(len(labels), m, -1).mean(1)  # (B, d)
        if "classify" in terms:
            logits = self.features.label_head(each)
            out["classify"] = F.cross_entropy(logits, labels.repeat_interleave(m))
        if "features" in terms:
            out["features"] = ((emb - batch["mean_features"]) ** 2).sum(1).mean()
        if "nce" in terms:
            centre = self.label_means[labels]  # (B, d)
            query = F.normalize(emb - centre, dim=1)
            keys = F.normalize(self.prototypes[labels] - centre[:, None], dim=2)  # (B, W, d)
            logits = torch.einsum("bd,bwd->bw", query, keys) / self.temperature
            logits = logits.masked_fill(~self.valid[labels], float("-inf"))
            out["nce"] = F.cross_entropy(logits, rows)
        if "spread" in terms:
            ink = ((fake.float() + 1) / 2).view(len(labels), m, -1)  # (B, m, 784) in [0, 1]
            d2 = (ink[:, :, None] - ink[:, None]).pow(2).sum(-1)  # (B, m, m)
            pairs = torch.triu_indices(m, m, 1, device=fake.device)
            spread = (d2[:, pairs[0], pairs[1]] + 1e-4).sqrt().mean(1)  # (B,)
            out["spread"] = (spread.log() - batch["spread"].log()).abs().mean()
        if "energy" in terms:
            x, y = each.view(len(labels), m, -1), batch["cell_features"]  # (B, m, d), (B, r, d)
            out["energy"] = (
                2 * _mean_distance(x, y) - _mean_distance(x, x) - _mean_distance(y, y)
            ).mean()
        self._cvae(out, batch, recon, mu, logvar)
        return out


def _mean_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, n, d), (B, k, d) -> (B,): the mean Euclidean distance between a's and b's rows, the
    pairs of a row with itself left out when a is b."""
    # sqrt(d2 + eps): a finite gradient where two rows coincide.
    dist = ((a[:, :, None] - b[:, None]).pow(2).sum(-1) + 1e-8).sqrt()  # (B, n, k)
    if a is b:
        n = a.shape[1]
        return (dist.sum((1, 2)) - n * 1e-4) / (n * (n - 1))
    return dist.mean((1, 2))


class _PersonalGame(Game):
    """The personal generators' game (see train_personal_gan)."""

    def __init__(self, generator, discriminator, style_of, style_params, sample, loss, posterior,
                 *, style_lr, samples_per_cell, label_weight, r1_weight, r1_every, judge_style,
                 shift, rng):  # fmt: skip
        self.generator, self.discriminator, self.posterior = generator, discriminator, posterior
        self.modules = [m for m in (generator, discriminator, posterior) if m is not None]
        g_params = [*generator.parameters(), *loss.params,
                    *(posterior.parameters() if posterior else [])]  # fmt: skip
        self.g_groups = [{"params": g_params},
                         {"params": list(style_params), "lr_scale": style_lr}]  # fmt: skip
        self.d_params = [*discriminator.parameters()]
        self.style_of, self.sample, self.loss = style_of, sample, loss
        self.m, self.label_weight, self.r1_weight = samples_per_cell, label_weight, r1_weight
        self.r1_every = r1_every
        self.judge_style, self.shift, self.rng = judge_style, shift, rng
        self.keys = ("adv", *loss.terms, *(["r1"] if r1_weight > 0 else []), "d_label_acc")

    def judge(self, images, labels, style):
        images = random_shift(images, self.shift, self.rng) if self.shift else images
        return self.discriminator(images, labels, style if self.judge_style else None)

    def d_loss(self, batch):
        labels, m, rng = batch["labels"], self.m, self.rng
        device = labels.device
        labels_m = labels.repeat_interleave(m)
        style = self.style_of(batch)  # (B, style_dim)
        style_m = style.repeat_interleave(m, dim=0)
        z = torch.randn(len(labels_m), self.generator.nz, generator=rng).to(device)
        # a source-editing generator: batch["source"] (B*m, ...) for the draws,
        # batch["source_real"] (B, ...) for the reconstructions
        src = [batch["source"]] if "source" in batch else []
        fake = self.generator(z, style_m, labels_m, *src)  # (B*m, 1, 28, 28)
        recon = mu = logvar = None
        fakes, fake_labels, fake_style = fake, labels_m, style_m
        if self.posterior is not None:
            # cVAE: redraw each real image from its inferred noise and the writer's style; D
            # judges these reconstructions as fakes too.
            mu, logvar = self.posterior(batch["real"], labels, style)
            eps = torch.randn(mu.shape, generator=rng).to(device)
            src_real = [batch["source_real"]] if "source" in batch else []
            recon = self.generator(mu + eps * (0.5 * logvar).exp(), style, labels, *src_real)
            fakes = torch.cat([fake, recon])
            fake_labels = torch.cat([labels_m, labels])
            fake_style = torch.cat([style_m, style])
        real_logit, real_cls = self.judge(batch["real"], labels, style.detach())
        fake_logit, _ = self.judge(fakes.detach(), fake_labels, fake_style.detach())
        loss = bce_d_loss(real_logit.float(), fake_logit.float())
        loss = loss + self.label_weight * F.cross_entropy(real_cls.float(), labels)
        logged = {"d_label_acc": (real_cls.detach().argmax(1) == labels).float().mean()}
        if self.r1_weight > 0:
            # Lazy R1 (Karras et al. 2020): every `r1_every` steps, r1_every times as strong;
            # logged as that, 0 between, so a log interval's mean is the penalty per step.
            logged["r1"] = torch.zeros((), device=device)
            if self.step % self.r1_every == 0:
                with torch.autocast(device.type, enabled=False):  # fp32: a second derivative
                    real = batch["real"].detach().requires_grad_(True)
                    logit, _ = self.judge(real, labels, style.detach().float())
                    (grad,) = torch.autograd.grad(logit.sum(), real, create_graph=True)
                    logged["r1"] = grad.pow(2).sum((1, 2, 3)).mean() * self.r1_every
                loss = loss + 0.5 * self.r1_weight * logged["r1"]
        state = dict(fake=fake, fakes=fakes, fake_labels=fake_labels, fake_style=fake_style,
                     style=style, recon=recon, mu=mu, logvar=logvar)  # fmt: skip
        return loss, logged, state

    def g_loss(self, batch, state):
        fake_logit, fake_cls = self.judge(
            state["fakes"], state["fake_labels"], state["fake_style"].detach()
        )
        adv = bce_g_loss(fake_logit.float())
        adv = adv + self.label_weight * F.cross_entropy(fake_cls.float(), state["fake_labels"])
        terms = self.loss(state["fake"], batch, self.m, state["style"], state["recon"],
                          state["mu"], state["logvar"])  # fmt: skip
        return adv + self.loss.total(terms), {"adv": adv, **terms}


def train_personal_gan(
    generator: nn.Module,
    discriminator: nn.Module,
    style_of: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    style_params: list[nn.Parameter],
    sample: Callable[[], dict[str, torch.Tensor]],
    loss: _GeneratorLoss,
    *,
    steps: int,
    samples_per_cell: int,
    lr: float,
    style_lr: float,
    beta1: float,
    label_weight: float,
    r1_weight: float,
    judge_style: bool,
    shift: int,
    rng: torch.Generator,
    r1_every: int = 1,
    posterior: nn.Module | None = None,
    bf16: bool = False,
    log_every: int = 10,
    progress=None,
    checkpoint: Loop | None = None,
    ema: EMA | None = None,
) -> dict[str, list[float]]:
    """The personal generators G(z, style, label) (embed-gan, encoder-gan, completion-gan) in
    `adversarial`; what differs between them is `style_of` and `loss`.

    Each step `sample()` gives B observed cells: "rows", "labels", "real" (one real image each)
    and whatever `style_of` (batch -> style codes (B, style_dim): a table lookup, a set encoder,
    a network on the cell's predicted prototype) and `loss` read. G draws `samples_per_cell`
    images per cell; D (projection on label and style, auxiliary label classifier, every image
    shifted by up to `shift` pixels: differentiable augmentation, Zhao et al. 2020) judges them,
    and with a cVAE `posterior` also G's reconstructions of the real images from their inferred
    noise. G's loss: the non-saturating adversarial term with the label term (`label_weight`),
    plus `loss`'s named terms. The style parameters learn at `style_lr` times `lr`. With
    `r1_weight` > 0, D's gradient on real images is penalised by r1_weight / 2 * |grad|^2 (R1,
    Mescheder et al. 2018), which keeps D from overpowering G; with `r1_every` k > 1 only every
    k-th step, k times as strong (lazy regularization, Karras et al. 2020). An `ema` averages
    the generator side's weights as it trains (see EMA). Every weight comes from the method's
    config (no defaults here, so there is one source).
    """
    game = _PersonalGame(
        generator, discriminator, style_of, style_params, sample, loss, posterior,
        style_lr=style_lr, samples_per_cell=samples_per_cell, label_weight=label_weight,
        r1_weight=r1_weight, r1_every=r1_every, judge_style=judge_style, shift=shift, rng=rng,
    )  # fmt: skip
    device = next(generator.parameters()).device
    return adversarial(
        game, steps=steps, lr=lr, beta1=beta1, rng=rng, device=device, bf16=bf16,
        log_every=log_every, progress=progress, checkpoint=checkpoint, ema=ema,
    )  # fmt: skip
