"""Frozen dataclasses holding every default once; the CLI names its flags after these fields."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

LabelSet = Literal["digits", "all"]

# LEAF's FEMNIST class ids: 0-9 digits, 10-35 A-Z, 36-61 a-z.
N_LEAF_CLASSES = 62
LABEL_CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
IMAGE_SIZE = 28
DATA_ENV = "INKFILL_DATA"


class InkfillError(Exception):
    """A problem with the user's input; the CLI prints it on one line and exits with status 2."""


@dataclass(frozen=True)
class DataConfig:
    path: str | None = None  # npz, LEAF json file or directory of LEAF shards; else $INKFILL_DATA
    labels: LabelSet = "digits"


@dataclass(frozen=True)
class HoldoutConfig:
    n_cells: int = 200
    min_images: int = 4  # a hidden cell must hold at least this many real images
    min_other_cells: int = 5  # its writer keeps at least this many observed cells
    max_per_writer: int = 1  # hide at most this many cells of one writer
    seed: int = 0


def param(default, help: str = ""):
    """A dataclass field with a help text; the CLI turns each field into a --flag."""
    return field(default=default, metadata={"help": help})


# Shared by every GAN method (train.use_bf16 decides where it applies).
BF16_HELP = (
    "bfloat16 autocast in training and sampling where the device computes it natively (a CUDA GPU "
    "with bf16, a CPU with AVX-512 or AMX); float32 elsewhere, where bf16 is emulated and slow"
)
# Shared by the two methods of the completion style space (predicted-retrieval, completion-gan).
CLASSIFIER_BF16_HELP = (
    "train the style classifier under bfloat16 autocast where the device computes it natively "
    "(1.6x faster on a CPU with AVX-512 BF16: 185 s against 293 s on femnist_digits; the same "
    "style space by predicted-retrieval's bench row on seed 7, completion-gan's fits with it "
    "within fit-to-fit noise of float32 ones on seeds 0, 5 and 7; --no-classifier-bf16: float32)"
)
RANK_STEPS_HELP = (
    "steps refining each label's regression for picking the writer out (InfoNCE over the "
    "label's writers, anchored to the ridge solution; 0: plain ridge)"
)
RANK_TEMPERATURE_HELP = "temperature of that refinement's cosine similarities"

GENERATOR_MODES = ("per-cluster", "conditional")
VOTE_RULES = ("writers", "pairs")


@dataclass(frozen=True)
class ClusterGANConfig:
    """The seed's approach 3 (methods/clustergan.py)."""

    n_clusters: int = param(7, "KMeans k for every label; 1 gives the seed's no-cluster DCGAN")
    n_components: int = param(32, "PCA dimensions in which writers' mean images are clustered")
    vote_rule: str = param(
        "writers",
        "writers: each related writer votes once (the seed); pairs: once per shared label",
    )
    generator: str = param(
        "conditional",
        "conditional: one DCGAN conditioned on (label, cluster) (label acc 0.994, FID 16.0 in the "
        "bench); per-cluster: one DCGAN per (label, cluster), the seed's literal design (0.885, "
        "110.8 at its 400/150 steps)",
    )
    nz: int = param(64, "latent size")
    ngf: int = param(32, "generator width")
    ndf: int = param(32, "discriminator width")
    batch_size: int = param(64, "images per training step")
    lr: float = param(2e-4, "Adam learning rate (DCGAN's)")
    beta1: float = param(0.5, "Adam beta1 (DCGAN's)")
    steps: int = param(12000, "conditional: training steps of the conditional DCGAN")
    label_steps: int = param(400, "per-cluster: steps of each label's no-cluster DCGAN")
    cluster_steps: int = param(150, "per-cluster: steps of each (label, cluster) DCGAN")
    cluster_batch_size: int = param(
        32, "per-cluster: images per step of the (label, cluster) DCGANs"
    )
    warm_start: bool = param(True, "per-cluster: start each cluster's DCGAN from its label's DCGAN")
    negative_weight: float = param(
        0.5, "per-cluster: D also rejects real images of the label's other clusters (0: off)"
    )
    conditional_negative_weight: float = param(
        0.2, "conditional: D also rejects real images paired with another cluster (0: off)"
    )
    truncation: float = param(
        1.0, "sampling: z ~ truncation * N(0, I); < 1 trades variety for typicality"
    )
    bf16: bool = param(True, BF16_HELP)
    seed: int = param(0, "seed of clustering, initialisation and training")

    def __post_init__(self):
        if self.generator not in GENERATOR_MODES:
            raise InkfillError(f"--generator must be one of {', '.join(GENERATOR_MODES)}")
        if self.vote_rule not in VOTE_RULES:
            raise InkfillError(f"--vote-rule must be one of {', '.join(VOTE_RULES)}")
        for name in (
            "n_clusters",
            "n_components",
            "nz",
            "ngf",
            "ndf",
            "batch_size",
            "cluster_batch_size",
        ):
            if getattr(self, name) < 1:
                raise InkfillError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("steps", "label_steps", "cluster_steps"):
            if getattr(self, name) < 0:
                raise InkfillError(f"--{name.replace('_', '-')} must be >= 0")
        if not self.truncation > 0:
            raise InkfillError("--truncation must be > 0")
        if self.negative_weight < 0 or self.conditional_negative_weight < 0:
            raise InkfillError("--negative-weight and --conditional-negative-weight must be >= 0")


@dataclass(frozen=True)
class GenericConfig:
    """Real images of the label from random other writers: the floor."""

    seed: int = param(0, "unused: the images drawn depend on fill's seed")


@dataclass(frozen=True)
class RetrievalConfig:
    """Real images of the label from the k writers nearest on the labels both have."""

    k: int = param(5, "retrieval: how many similar writers lend their images")
    n_components: int = param(32, "PCA dimensions of each label's space")
    seed: int = param(0, "seed of the PCA")

    def __post_init__(self):
        if self.k < 1 or self.n_components < 1:
            raise InkfillError("--k and --n-components must be at least 1")


@dataclass(frozen=True)
class LinearConfig:
    """Low-rank completion (SoftImpute) of per-cell mean images in per-label PCA spaces."""

    rank: int = param(8, "linear: largest rank of the completed writers x (labels x PCA) matrix")
    shrink: float = param(0.1, "linear: SoftImpute threshold, a share of the top singular value")
    render: str = param(
        "nearest", "linear: nearest (real images nearest the completed mean) or pca (synthesised)"
    )
    n_components: int = param(32, "PCA dimensions of each label's space")
    seed: int = param(0, "seed of the PCA")

    def __post_init__(self):
        if self.rank < 1 or self.n_components < 1:
            raise InkfillError("--rank and --n-components must be at least 1")
        if not 0 <= self.shrink < 1:
            raise InkfillError("--shrink must be in [0, 1)")
        if self.render not in ("pca", "nearest"):
            raise InkfillError("--render must be pca or nearest")


@dataclass(frozen=True)
class FeatureConfig:
    """The bench's judge network (models.FeatureNet), trained on half of each observed cell."""

    epochs: int = param(10, "training epochs of the feature network")
    width: int = param(24, "channels of its first convolutions")
    dim: int = param(128, "embedding size (the FID and retrieval space)")
    batch_size: int = param(128, "images per step")
    lr: float = param(2e-3, "peak learning rate (one-cycle)")


@dataclass(frozen=True)
class BenchConfig:
    """inkfill bench: hide whole cells, fit each method on the rest, fill and score the hidden."""

    methods: str = param(
        "generic,retrieval,predicted-retrieval,linear,cluster-gan",
        "comma-separated methods to compare",
    )
    hidden_cells: int = param(200, "whole observed cells to hide")
    per_cell: int = param(16, "images each method generates for each hidden cell")
    seed: int = param(0, "seed of the holdout, the methods and the fills")
    figure_cells: int = param(12, "hidden cells shown in the figure")
    new_writers: int = param(
        0, "instead of hiding cells, leave this many whole writers out of training"
    )
    shots: int = param(5, "with --new-writers: images of other labels given of each new writer")
    cas: bool = param(
        True,
        "train on fills, test on real: writer CAS, label CAS and personalization of every row "
        "(hidden cells only; ~3 min once for the backbone, then ~30 s a method)",
    )

    def __post_init__(self):
        if self.hidden_cells < 1 or self.per_cell < 2:
            raise InkfillError("--hidden-cells must be >= 1 and --per-cell >= 2")
        if self.new_writers < 0 or self.shots < 1:
            raise InkfillError("--new-writers must be >= 0 and --shots >= 1")
        if not [m for m in self.methods.split(",") if m.strip()]:
            raise InkfillError("--methods: name at least one method")


@dataclass(frozen=True)
class EmbedGANConfig:
    """The seed's approach 1: a learned embedding per writer and per label, and a GAN F(i*, j*)."""

    style_dim: int = param(64, "size of a writer's style code")
    nz: int = param(32, "noise size: the variation within one cell")
    ngf: int = param(32, "generator width")
    ndf: int = param(32, "discriminator width")
    steps: int = param(4000, "training steps")
    batch_cells: int = param(32, "cells per step")
    samples_per_cell: int = param(2, "generated images per cell and step")
    lr: float = param(2e-4, "Adam learning rate")
    style_lr: float = param(10.0, "learning rate of the style table or encoder, times --lr")
    beta1: float = param(0.5, "Adam beta1")
    mean_weight: float = param(0.0, "L1 between a cell's generated and real mean image")
    feature_weight: float = param(
        0.2, "squared distance of the cell's generated and real mean embedding (own classifier)"
    )
    classifier_epochs: int = param(
        3, "epochs of the label+writer classifier behind the feature loss"
    )
    label_weight: float = param(1.0, "auxiliary label classifier loss (AC-GAN)")
    recon_weight: float = param(
        10.0, "cVAE: L1 redrawing each real image from its inferred noise (0: plain GAN)"
    )
    kl_weight: float = param(0.05, "cVAE: KL of the inferred noise to N(0, I)")
    diversity_weight: float = param(
        0.0, "mode seeking: reward two draws for one cell for differing"
    )
    writer_weight: float = param(0.0, "a linear head must tell the writer from the style code")
    judge_style: bool = param(True, "the discriminator also judges the writer (style projection)")
    shift: int = param(2, "random translation (pixels) of all images the discriminator sees")
    truncation: float = param(1.0, "sampling: z ~ truncation * N(0, I)")
    bf16: bool = param(True, BF16_HELP)
    seed: int = param(0, "seed of initialisation and training")

    def __post_init__(self):
        for name in ("style_dim", "nz", "ngf", "ndf", "batch_cells", "samples_per_cell"):
            if getattr(self, name) < 1:
                raise InkfillError(f"--{name.replace('_', '-')} must be at least 1")
        if self.steps < 0 or self.shift < 0 or not self.truncation > 0:
            raise InkfillError("--steps and --shift must be >= 0 and --truncation > 0")


@dataclass(frozen=True)
class EncoderGANConfig(EmbedGANConfig):
    """The seed's approach 2: a style encoder reads any set of a writer's images."""

    style_images: int = param(
        8, "encoder: at most this many of the writer's images per style set in training"
    )
    fill_style_images: int = param(32, "encoder: images of the writer read to fill a cell")
    style_weight: float = param(
        0.0, "encoder: the style read back from generated images must match"
    )
    style_lr: float = param(1.0, "learning rate of the style table or encoder, times --lr")
    encoder: str = param(
        "classifier",
        "joint: trained with the GAN; classifier: frozen label+writer classifier features",
    )

    def __post_init__(self):
        super().__post_init__()
        if self.style_images < 1 or self.fill_style_images < 1:
            raise InkfillError("--style-images and --fill-style-images must be at least 1")
        if self.encoder not in ("joint", "classifier"):
            raise InkfillError("--encoder must be joint or classifier")


@dataclass(frozen=True)
class CollaGANConfig:
    """The seed's baseline, CollaGAN (Lee et al. 2019): the writer's other labels in, one out."""

    width: int = param(
        12,
        "U-Net generator width, at 28x28 (the 14x14 and 7x7 stages: 2x and 4x); 12 against 32 "
        "on bench seeds 11 and 5: the same scores, each moving either way; the fit 1.8x and the "
        "fill ~3x as fast; 8 falls short; 16 with --unshuffle no better than 12)",
    )
    unshuffle: bool = param(
        True,
        "U-Net without the 28x28 stage: each 2x2 block of pixels is 4 channels at 14x14, in "
        "and out (space to depth); on bench seeds 11 and 5 against the seed's U-Net "
        "(--no-unshuffle): FID -19.5, writer and label CAS within 0.004, MRR -0.024, the fit "
        "1.5x and the fill 2x as fast",
    )
    ndf: int = param(32, "discriminator width")
    steps: int = param(3000, "training steps")
    batch_cells: int = param(32, "target cells per step")
    lr: float = param(2e-4, "Adam learning rate")
    beta1: float = param(0.5, "Adam beta1")
    recon_weight: float = param(10.0, "L1 to a real image of the target cell")
    ssim_weight: float = param(1.0, "1 - SSIM to a real image of the target cell")
    cycle_weight: float = param(10.0, "multiple cycle: redraw another label from the fill")
    label_weight: float = param(1.0, "auxiliary label classifier loss in D")
    keep: float = param(0.7, "input dropout in training: each other label kept with this chance")
    fill_keep: float = param(0.8, "input dropout when filling: varies the images of one cell")
    margin: int = param(
        2,
        "sampling: rows and columns at each edge of a draw set to background, as in the scans "
        "(some fits draw a solid block of ink in a corner for one label: 2 of 5 bench fits "
        "and a fit on all of femnist_digits; 0: off)",
    )
    shift: int = param(2, "random translation (pixels) of all images the discriminator sees")
    bf16: bool = param(True, BF16_HELP)
    seed: int = param(0, "seed of initialisation and training")

    def __post_init__(self):
        for name in ("width", "ndf", "batch_cells"):
            if getattr(self, name) < 1:
                raise InkfillError(f"--{name.replace('_', '-')} must be at least 1")
        if self.steps < 0 or self.shift < 0:
            raise InkfillError("--steps and --shift must be >= 0")
        if not (0 < self.keep <= 1 and 0 < self.fill_keep <= 1):
            raise InkfillError("--keep and --fill-keep must be in (0, 1]")
        if not 0 <= self.margin <= 13:
            raise InkfillError("--margin must be within 0-13 (0: off)")


@dataclass(frozen=True)
class PredictedRetrievalConfig:
    """Real images of other writers nearest the cell's predicted prototype (a reference row)."""

    n_components: int = param(32, "principal components of the prototypes the regressions use")
    classifier_epochs: int = param(
        0,
        "epochs of the label+writer classifier (the style space); 0: adapt to the data (6 up to "
        "~170k images, then fewer: about 8,000 steps of 128, at least one epoch)",
    )
    classifier_width: int = param(24, "channels of the classifier's first convolutions")
    classifier_bf16: bool = param(True, CLASSIFIER_BF16_HELP)
    rank_steps: int = param(300, RANK_STEPS_HELP)
    rank_temperature: float = param(0.02, RANK_TEMPERATURE_HELP)
    neighbours: int = param(
        64,
        "sampling: a cell's n images are picked among this many real images nearest its "
        "predicted prototype, by kernel herding toward their spread moved onto the prediction "
        "(a real cell's spread in the judge's embedding; bench seeds 5 and 6); n or fewer: the n "
        "nearest",
    )
    seed: int = param(0, "seed of the classifier and the regressions")

    def __post_init__(self):
        if self.classifier_epochs < 0:
            raise InkfillError("--classifier-epochs must be >= 0 (0: adapt to the data)")
        if min(self.n_components, self.classifier_width) < 1:
            raise InkfillError("--n-components and --classifier-width must be at least 1")
        if self.neighbours < 0:
            raise InkfillError("--neighbours must be >= 0")
        _check_rank(self)


def _check_rank(config) -> None:
    if config.rank_steps < 0 or not config.rank_temperature > 0:
        raise InkfillError("--rank-steps must be >= 0 and --rank-temperature > 0")


@dataclass(frozen=True)
class CompletionGANConfig:
    """Complete the matrix in a style space, then render: the generator draws a cell from its
    prototype as predicted from the writer's other cells, and is trained on exactly that task."""

    n_components: int = param(32, "principal components of the prototypes the regressions use")
    classifier_epochs: int = param(
        0,
        "epochs of the label+writer classifier (the style space); 0: adapt to the data (6 up to "
        "~170k images, then fewer: about 8,000 steps of 128, at least one epoch)",
    )
    classifier_width: int = param(24, "channels of the classifier's first convolutions")
    classifier_bf16: bool = param(True, CLASSIFIER_BF16_HELP)
    rank_steps: int = param(300, RANK_STEPS_HELP)
    rank_temperature: float = param(0.02, RANK_TEMPERATURE_HELP)
    style_dim: int = param(64, "size of the style code the generator reads")
    nz: int = param(32, "noise size: the variation within one cell")
    ngf: int = param(
        16,
        "generator width (7x7 stage 4x, 14x14 stage 2x; 16 against 32 on bench seeds 11, 5 and 0: "
        "the same scores, fill 1.3-1.5x as fast, GAN steps ~10% faster)",
    )
    head: int = param(
        16,
        "channels of a last generator stage at 28x28, from which a 3x3 convolution draws the "
        "pixels (0: none, a transposed convolution draws them, through the blur; 16 against 0 on "
        "bench seed 7: label CAS +1.5 points, FID -1.2, MRR +0.006; a GAN step +31%)",
    )
    blur: bool = param(
        True,
        "low-pass each transposed convolution's output with a fixed 3x3 binomial filter, which "
        "removes the checkerboard speckle a stride-2 transposed convolution leaves (bench seed 7: "
        "MRR +0.025, FID -0.8, label CAS +0.4; on seed 5 the fit without it collapsed)",
    )
    support: float = param(
        0.001,
        "the generator draws only on pixels where at least this share of the training images "
        "have ink (grown by one pixel), background elsewhere, in training and sampling (0: "
        "everywhere; 0.001 on bench seed 7: FID -0.9, label CAS +0.7 points, MRR +0.021)",
    )
    ndf: int = param(32, "discriminator width")
    stem: int = param(
        16,
        "channels of a stride-1 3x3 convolution the discriminator applies at 28x28, before its "
        "stride-2 trunk, so that it judges stroke edges (0: none; 16 against 0 on bench seeds 7 "
        "and 5: label CAS +1.2 points on both; MRR, FID and writer CAS moved either way; fit +20%)",
    )
    steps: int = param(
        0, "training steps; 0: adapt to the data (20 passes over the observed cells, 1k-10k)"
    )
    batch_cells: int = param(32, "cells per step")
    samples_per_cell: int = param(4, "generated images per cell and step (>= 2 for the spread)")
    lr: float = param(2e-4, "Adam learning rate")
    style_lr: float = param(1.0, "learning rate of the code-to-style network, times --lr")
    beta1: float = param(0.5, "Adam beta1")
    predicted_share: float = param(
        0.0,
        "training cells conditioned on their prototype predicted without them, the rest on "
        "their real prototype (0: the generator learns to render codes exactly; better than 0.5 "
        "on bench seeds 0-2 and than 1 on seed 1)",
    )
    classify_weight: float = param(
        0.3, "the draws must read as their label to the method's own classifier (cross-entropy)"
    )
    feature_weight: float = param(
        0.2, "squared distance of the cell's generated and real mean embedding"
    )
    nce_weight: float = param(
        1.0, "InfoNCE: the generated cell must be nearest its writer among the label's writers"
    )
    nce_temperature: float = param(0.1, "temperature of the InfoNCE cosine similarities")
    spread_weight: float = param(
        3.0, "the cell's draws must differ as much as the real cell's images do (log ratio)"
    )
    energy_weight: float = param(
        0.0,
        "energy distance, in the classifier's embedding, between the cell's draws and real "
        "images of the cell: the draws must spread as the writer's own images of it do",
    )
    label_weight: float = param(1.0, "auxiliary label classifier loss (AC-GAN)")
    r1_weight: float = param(
        1.0, "R1: penalise D's gradient on real images (gamma / 2 * |grad|^2; 0: off)"
    )
    r1_every: int = param(
        1, "lazy R1: the penalty only every this many steps, as many times as strong"
    )
    recon_weight: float = param(
        10.0, "cVAE: L1 redrawing each real image from its inferred noise (0: off)"
    )
    kl_weight: float = param(0.05, "cVAE: KL of the inferred noise to N(0, I)")
    judge_style: bool = param(True, "the discriminator also judges the style (projection)")
    shift: int = param(2, "random translation (pixels) of all images the discriminator sees")
    ema_halflife: float = param(
        0.0,
        "half-life, in GAN steps, of the moving average of the generator's weights that the run "
        "keeps (G_ema; shorter early on; 0: keep the last weights)",
    )
    truncation: float = param(1.0, "sampling: z ~ truncation * N(0, I)")
    candidates: int = param(
        4,
        "sampling: candidate noises per image kept; keep the set whose mean code in the style "
        "space is nearest the cell's predicted code (herding; 1: plain draws; 4 fills 1.25x as "
        "fast as 16 at the same bench scores)",
    )
    herd: str = param(
        "predicted",
        "sampling: how herding scores a candidate: 'predicted' (its embedding as the draw "
        "predictor guesses it from the noise; only the kept images are drawn) or 'rendered' "
        "(each candidate drawn and embedded: exact, and candidates times slower)",
    )
    herd_to: str = param(
        "neighbours",
        "sampling: what the kept set must match: 'mean' (its mean code is the cell's predicted "
        "code) or 'neighbours' (its spread is that of the real images of the label nearest the "
        "cell's predicted prototype, moved onto it: kernel herding, MMD in the code space)",
    )
    neighbours: int = param(
        64,
        "sampling: real images whose spread herd_to=neighbours matches (at least 2; 64 against "
        "32 on five saved runs, seeds 3, 5, 7: FID -0.15 to -1.03, feature div ratio +0.04 to "
        "+0.06 toward the real cells', writer CAS, label CAS and MRR within noise)",
    )
    style_spread: float = param(
        1.0,
        "sampling: with herd_to=neighbours, each candidate is drawn in the style of one of the "
        "neighbours, this far (0-1) from the cell's predicted code toward it (0: every image in "
        "the cell's predicted style)",
    )
    label_floor: float = param(
        0.0,
        "sampling: candidates whose label the run's classifier gives less than this probability "
        "(read from the draw predictor's embedding, or the drawn image with herd=rendered) are "
        "not kept; if fewer pass than a block needs, its most probable ones are (0: off)",
    )
    ink_floor: int = param(
        10,
        "sampling: pixels fainter than this (of 255) are drawn as background, 0 as in the scans "
        "(the generator's tanh never reaches it and leaves a faint haze; 0: keep the haze)",
    )
    margin: int = param(
        2,
        "sampling: rows and columns at each edge of a draw set to background, as in the scans "
        "(0.01% of femnist_digits' images have ink within 2 px of the edge, 29% of the "
        "generator's draws on bench seed 7; 0: off)",
    )
    source: int = param(
        0,
        "experimental: width of an encoder through which each draw edits a real image of the "
        "label, of another writer, near the cell's predicted prototype (image-to-image; needs "
        "herd_to=neighbours; 0: draw from noise alone)",
    )
    predictor_draws: int = param(
        100_000,
        "draws (noise, style, label) -> embedding the draw predictor learns from after the GAN "
        "(0: no predictor; herding then renders every candidate)",
    )
    bf16: bool = param(True, BF16_HELP)
    seed: int = param(0, "seed of initialisation and training")

    def __post_init__(self):
        for name in (
            "n_components",
            "candidates",
            "classifier_width",
            "style_dim",
            "nz",
            "ngf",
            "ndf",
            "r1_every",
        ):
            if getattr(self, name) < 1:
                raise InkfillError(f"--{name.replace('_', '-')} must be at least 1")
        if self.classifier_epochs < 0:
            raise InkfillError("--classifier-epochs must be >= 0 (0: adapt to the data)")
        if self.batch_cells < 1 or self.samples_per_cell < 2:
            raise InkfillError("--batch-cells must be >= 1 and --samples-per-cell >= 2")
        if self.steps < 0 or self.shift < 0 or not self.truncation > 0:
            raise InkfillError("--steps and --shift must be >= 0 and --truncation > 0")
        if self.head < 0 or self.stem < 0:
            raise InkfillError("--head and --stem must be >= 0 (0: no stage at 28x28)")
        if self.herd not in ("predicted", "rendered"):
            raise InkfillError(f"--herd must be 'predicted' or 'rendered', not {self.herd!r}")
        if self.herd_to not in ("mean", "neighbours"):
            raise InkfillError(f"--herd-to must be 'mean' or 'neighbours', not {self.herd_to!r}")
        if self.neighbours < 2:
            raise InkfillError("--neighbours must be at least 2")
        if not self.style_spread >= 0:
            raise InkfillError("--style-spread must be >= 0 (0: one style per cell)")
        if not 0 <= self.label_floor < 1:
            raise InkfillError("--label-floor must be within [0, 1) (0: off)")
        if not 0 <= self.ink_floor <= 255:
            raise InkfillError("--ink-floor must be within 0-255 (0: off)")
        if not 0 <= self.margin <= 13:
            raise InkfillError("--margin must be within 0-13 (0: off)")
        if not 0 <= self.support < 1:
            raise InkfillError("--support must be within [0, 1) (0: off)")
        if self.predictor_draws < 0:
            raise InkfillError("--predictor-draws must be >= 0 (0: no predictor)")
        if self.source < 0 or (self.source and self.herd_to != "neighbours"):
            raise InkfillError("--source must be >= 0, and needs --herd-to neighbours")
        if not self.ema_halflife >= 0:
            raise InkfillError("--ema-halflife must be >= 0 (0: no average)")
        _check_rank(self)
        if not 0 <= self.predicted_share <= 1 or not self.nce_temperature > 0:
            raise InkfillError("--predicted-share must be in [0, 1] and --nce-temperature > 0")
        weights = ("classify_weight", "feature_weight", "nce_weight", "spread_weight",
                   "label_weight", "r1_weight", "recon_weight", "kl_weight")  # fmt: skip
        for name in weights:
            if getattr(self, name) < 0:
                raise InkfillError(f"--{name.replace('_', '-')} must be >= 0")
