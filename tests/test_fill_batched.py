"""fill() draws many cells per forward pass (generate_cells); each cell must still get exactly the
images generate() gives it alone, so batching is a speed-up and nothing else."""

import numpy as np
import pytest
from conftest import make_dataset

from inkfill.data import WriterMatrix
from inkfill.methods import METHODS
from inkfill.methods.base import fill

TINY = {
    "cluster-gan": dict(
        generator="per-cluster", n_clusters=2, ngf=4, ndf=4, label_steps=2, cluster_steps=2, seed=1
    ),
    "cluster-gan conditional": dict(
        generator="conditional", n_clusters=2, ngf=4, ndf=4, steps=3, seed=1
    ),
    "embed-gan": dict(style_dim=8, nz=4, ngf=8, ndf=8, steps=3, batch_cells=4, classifier_epochs=1),
    "encoder-gan": dict(
        style_dim=8, nz=4, ngf=8, ndf=8, steps=3, batch_cells=4, classifier_epochs=1
    ),
    "collagan": dict(width=4, ndf=8, steps=3, batch_cells=4),
    "collagan 28x28": dict(width=4, ndf=8, steps=3, batch_cells=4, unshuffle=False),
    "predicted-retrieval": dict(n_components=4, classifier_epochs=1, classifier_width=8),
    "completion-gan": dict(
        n_components=4,
        style_dim=8,
        nz=4,
        ngf=8,
        ndf=8,
        steps=3,
        batch_cells=4,
        classifier_epochs=1,
        classifier_width=8,
        predictor_draws=2000,
    ),
}


@pytest.fixture(scope="module")
def matrix():
    return WriterMatrix(make_dataset(n_writers=10, seed=5))


@pytest.mark.parametrize("name", [*METHODS, "cluster-gan conditional", "collagan 28x28"])
def test_batched_fill_equals_cell_by_cell(name, matrix):
    cls = METHODS[name.split()[0]]
    method = cls(**TINY.get(name, {})).fit(matrix)
    cells = matrix.empty_cells()
    assert len(cells) >= 5
    batched = method.generate_cells(cells, 7, seed=3)
    for (writer, label), images in zip(cells, batched):
        alone = method.generate(writer, label, 7, seed=3)
        assert images.shape == (7, 28, 28) and images.dtype == np.uint8
        # Batch size may change a float's last bit inside a convolution: at most 1 grey level.
        diff = np.abs(images.astype(int) - alone.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    out = fill(method, cells, 7, seed=3)
    assert len(out) == 7 * len(cells)
    np.testing.assert_array_equal(out.images[:7], batched[0])
    assert method.generate_cells([], 7) == []


def test_inference_rewrites_compute_what_the_layers_compute():
    import torch
    import torch.nn.functional as F

    from inkfill.models import FiLMGenerator, conv_transpose_4s2

    torch.manual_seed(0)
    for n_out in (1, 4):
        layer = torch.nn.ConvTranspose2d(6, n_out, 4, 2, 1)
        x = torch.randn(3, 6, 7, 7)
        torch.testing.assert_close(conv_transpose_4s2(x, layer.weight, layer.bias), layer(x))

    G = FiLMGenerator(nz=4, cond_dim=5, ngf=4)
    for module in (G.film0, G.film1):  # FiLM away from its identity start
        torch.nn.init.normal_(module.weight, 0, 0.3)
    G.train()
    for _ in range(3):  # running statistics away from their start
        G(torch.randn(16, 4), torch.randn(16, 5))
    G.eval()
    z, cond = torch.randn(8, 4), torch.randn(8, 5)
    with torch.no_grad():
        fast = G(z, cond)
        # The plain computation: batch norm in eval mode, then FiLM, ReLU, transposed convs.
        x = G.fc(torch.cat([z, cond], 1)).view(8, G.ngf * 4, 7, 7)
        for norm, film, up in ((G.norm0, G.film0, None), (G.norm1, G.film1, G.up1)):
            x = x if up is None else up(x)
            gamma, beta = film(cond).chunk(2, 1)
            x = F.relu(norm(x) * (1 + gamma[:, :, None, None]) + beta[:, :, None, None])
        slow = torch.tanh(G.up2(x))
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)

    # With the 28x28 head and the blur (completion-gan's defaults): few channels, so the folded
    # FiLM runs over image rows of the channels-last activations.
    G = FiLMGenerator(nz=4, cond_dim=5, ngf=4, head=4, blur=True)
    films = (G.film0, G.film1, G.film2)
    for module in films:
        torch.nn.init.normal_(module.weight, 0, 0.3)
    G.train()
    for _ in range(3):
        G(torch.randn(16, 4), torch.randn(16, 5))
    G.eval()

    def smooth(x):
        kernel = G.blur.expand(x.shape[1], 1, 3, 3)
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=x.shape[1])

    with torch.no_grad():
        fast = G(z, cond)
        x = G.fc(torch.cat([z, cond], 1)).view(8, G.ngf * 4, 7, 7)
        for norm, film, up in zip((G.norm0, G.norm1, G.norm2), films, (None, G.up1, G.up2)):
            x = x if up is None else smooth(up(x))
            gamma, beta = film(cond).chunk(2, 1)
            x = F.relu(norm(x) * (1 + gamma[:, :, None, None]) + beta[:, :, None, None])
        slow = torch.tanh(G.out(x))
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_folded_feature_net_computes_what_the_eval_net_computes():
    import torch

    from inkfill.models import FeatureNet, folded

    torch.manual_seed(0)
    net = FeatureNet(n_labels=3, n_writers=5, width=4, dim=16).train()
    for _ in range(3):  # batch-norm statistics and scales away from their start
        net(torch.randn(32, 1, 28, 28))
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 2.0)
            torch.nn.init.uniform_(m.bias, -0.5, 0.5)
    net.eval()
    fast = folded(net)
    assert not any(
        isinstance(m, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d) for m in fast.modules()
    )
    assert not any(p.requires_grad for p in fast.parameters())
    assert net.training is False and any(p.requires_grad for p in net.parameters())  # untouched
    x = torch.randn(8, 1, 28, 28, requires_grad=True)
    torch.testing.assert_close(fast(x), net(x), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        fast.label_head(fast(x)), net.label_head(net(x)), atol=1e-5, rtol=1e-4
    )
    # The gradient to the input (what a loss through the frozen net trains with) is the same too.
    (g_fast,) = torch.autograd.grad(fast(x).square().sum(), x)
    (g_net,) = torch.autograd.grad(net(x).square().sum(), x)
    torch.testing.assert_close(g_fast, g_net, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("unshuffle", [False, True])
def test_collagan_draw_computes_what_forward_computes_on_the_stacked_input(unshuffle):
    """CollaGAN fills through draw(ink, target): the one-hot target planes' part of the first
    convolution added as a fixed map per label, on the generator with its batch norms folded.
    Both must give forward() on the stacked (ink, planes) input, borders included, with the
    28x28 stage or without it (space to depth)."""
    import torch

    from inkfill.models import CollaGenerator, folded

    torch.manual_seed(0)
    G = CollaGenerator(n_labels=5, width=4, unshuffle=unshuffle)
    G.train()
    for _ in range(3):  # running statistics away from their start
        G(torch.rand(16, 10, 28, 28))
    G.eval()
    ink = torch.rand(6, 5, 28, 28) * (torch.rand(6, 5, 1, 1) < 0.7)
    target = torch.tensor([0, 4, 2, 2, 1, 3])
    planes = torch.zeros(6, 5, 28, 28)
    planes[torch.arange(6), target] = 1.0
    with torch.no_grad():
        slow = G(torch.cat([ink, planes], 1))
        torch.testing.assert_close(G.draw(ink, target), slow, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(folded(G).draw(ink, target), slow, atol=1e-5, rtol=1e-4)
        # a wrong target label gives another image: the map is not a no-op
        assert (G.draw(ink, (target + 1) % 5) - slow).abs().max() > 1e-3


def test_collagan_fill_reads_one_image_per_present_label_and_drops_some(matrix):
    """A fill's inputs (_picks): for each draw, per label the writer has (but the target), one of
    the writer's images of that label or none (dropped, about 1 - fill_keep of them); the target
    label and the labels the writer lacks are never read; no draw reads nothing."""
    import torch

    from inkfill.methods.collagan import CollaGAN, _picks

    method = CollaGAN(**TINY["collagan"], fill_keep=0.5).fit(matrix)
    row = 0
    mine = np.flatnonzero(method.rows_ == row)
    images, cols = method.images_[mine], method.cols_[mine]
    have = np.unique(cols)
    assert len(have) >= 3
    target = int(have[0])
    inked = torch.from_numpy(images.reshape(len(images), -1).any(1))
    cols = torch.as_tensor(cols)
    counts = torch.bincount(cols, minlength=matrix.n_labels)[None]
    uniforms = torch.rand(1, 2, 400, matrix.n_labels, generator=torch.Generator().manual_seed(0))
    order = torch.argsort(cols, stable=True)
    index = _picks(uniforms, counts, order, inked, torch.tensor([target]), 0.5)[0].numpy()
    cols = cols.numpy()
    assert index.shape == (400, matrix.n_labels)
    assert (index[:, target] == -1).all()
    lacking = np.setdiff1d(np.arange(matrix.n_labels), have)
    assert (index[:, lacking] == -1).all()
    for c in have[1:]:
        read = index[:, c]
        assert (cols[read[read >= 0]] == c).all()
        assert set(read[read >= 0]) == set(np.flatnonzero(cols == c))  # each can be read
        assert 0.3 < (read == -1).mean() < 0.7  # fill_keep 0.5 (a draw left empty reads all)
    assert ((index >= 0).sum(1) >= 1).all()


def test_collagan_fills_leave_the_margin_blank(matrix):
    """Some collagan fits draw a solid block of ink in a corner for one label; fills set the
    `margin` outermost rows and columns to background, as the scans have them."""
    from inkfill.methods.collagan import CollaGAN

    method = CollaGAN(**TINY["collagan"]).fit(matrix)
    cells = matrix.empty_cells()[:3]

    def edges(images):
        return np.concatenate([images[:, :2].ravel(), images[:, -2:].ravel(),
                               images[:, :, :2].ravel(), images[:, :, -2:].ravel()])  # fmt: skip

    assert not edges(np.concatenate(method.generate_cells(cells, 4))).any()
    method.margin = 0  # an untrained generator inks everywhere
    assert edges(np.concatenate(method.generate_cells(cells, 4))).any()


@pytest.mark.parametrize("unshuffle", [False, True])
def test_collagan_runs_load_with_their_own_generator(unshuffle, matrix, tmp_path):
    """A run's weights say which U-Net it trained: one saved before the `unshuffle` parameter
    existed (no word of it in config.json) loads with its own, whatever the default, and fills
    as it did."""
    import json

    from inkfill.methods import load_run
    from inkfill.methods.collagan import CollaGAN

    method = CollaGAN(**TINY["collagan"], unshuffle=unshuffle).fit(matrix)
    method.save(tmp_path)
    cells = matrix.empty_cells()[:3]
    before = np.concatenate(method.generate_cells(cells, 4, seed=2))
    config = json.loads((tmp_path / "config.json").read_text())
    del config["params"]["unshuffle"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_run(tmp_path)
    assert loaded.unshuffle is unshuffle and loaded.generator_.unshuffle is unshuffle
    np.testing.assert_array_equal(np.concatenate(loaded.generate_cells(cells, 4, seed=2)), before)
