"""Tiny seeded datasets for the fast tier, and the real FEMNIST files for the real-data tier."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from inkfill.data import Dataset

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "femnist"
REAL_DIGITS = SHARED / "femnist_digits.npz"
REAL_ALL = SHARED / "femnist_all.npz"
REAL_LEAF = SHARED / "leaf"


def make_dataset(
    n_writers: int = 12,
    labels: tuple[int, ...] = tuple(range(10)),
    per_cell: tuple[int, int] = (2, 5),
    p_empty: float = 0.15,
    seed: int = 0,
) -> Dataset:
    """Synthetic handwriting: each label is a fixed random stroke pattern; each writer shifts it,
    thickens it and scales its ink, so both label and writer are recoverable from the pixels."""
    rng = np.random.default_rng(seed)
    templates = {}
    for label in labels:
        t = np.zeros((28, 28), dtype=np.float32)
        points = rng.integers(6, 22, size=(4, 2))
        for (y0, x0), (y1, x1) in zip(points[:-1], points[1:]):
            for s in np.linspace(0, 1, 30):
                t[int(round(y0 + s * (y1 - y0))), int(round(x0 + s * (x1 - x0)))] = 1.0
        templates[label] = t
    images, out_labels, writers = [], [], []
    for w in range(n_writers):
        dy, dx = rng.integers(-3, 4, size=2)
        thick = int(rng.integers(0, 2))
        ink = rng.uniform(0.6, 1.0)
        for label in labels:
            if rng.random() < p_empty:
                continue
            for _ in range(int(rng.integers(per_cell[0], per_cell[1] + 1))):
                img = np.roll(templates[label], (dy + rng.integers(-1, 2), dx), axis=(0, 1))
                if thick:
                    img = np.maximum(img, np.roll(img, 1, axis=1))
                img = np.clip(img * ink + rng.normal(0, 0.03, img.shape), 0, 1)
                images.append((img * 255).round().astype(np.uint8))
                out_labels.append(label)
                writers.append(f"w{w:03d}")
    return Dataset(np.stack(images), np.array(out_labels, dtype=np.int64), np.array(writers))


def write_leaf(data: Dataset, path: Path) -> Path:
    """Write `data` as one LEAF json shard (784 floats per image, background 1.0)."""
    users = sorted(set(data.writers.tolist()))
    user_data = {}
    for u in users:
        m = data.writers == u
        x = 1.0 - data.images[m].reshape(-1, 784).astype(np.float64) / 255.0
        user_data[u] = {"x": x.round(8).tolist(), "y": data.labels[m].tolist()}
    blob = {
        "users": users,
        "num_samples": [int((data.writers == u).sum()) for u in users],
        "user_data": user_data,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(blob))
    return path


@pytest.fixture
def native_bf16(monkeypatch):
    """Treat the CPU as computing bf16 natively, so that bf16=True trains in bf16 here too (an
    AVX2-only CPU emulates it: slow, but the numerics under test are the same)."""
    from inkfill import train

    monkeypatch.setattr(train, "bf16_native", lambda device_type: True)


@pytest.fixture
def tiny() -> Dataset:
    return make_dataset()


@pytest.fixture
def tiny_npz(tiny, tmp_path) -> Path:
    path = tmp_path / "tiny.npz"
    tiny.save(path)
    return path


def _shared(path: Path, what: str = "real FEMNIST") -> Path:
    """`path` under ../shared/data, or skip the test with where it was looked for."""
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (needs ../shared/data beside the repo)")
    return path


@pytest.fixture
def real_digits() -> Path:
    return _shared(REAL_DIGITS)


@pytest.fixture(scope="session")
def real_digits_half(tmp_path_factory) -> Path:
    """Every other writer of the real FEMNIST digits (258 of 516, ~17k images): real data for
    the end-to-end tests that train networks, in about half the time of the whole file."""
    from inkfill.data import load_dataset

    data = load_dataset(_shared(REAL_DIGITS))
    keep = np.isin(data.writers, np.unique(data.writers)[::2])
    path = tmp_path_factory.mktemp("real") / "femnist_digits_half.npz"
    data.subset(np.flatnonzero(keep)).save(path)
    return path


@pytest.fixture
def real_all() -> Path:
    return _shared(REAL_ALL)


@pytest.fixture
def real_leaf() -> Path:
    return _shared(REAL_LEAF, "LEAF shards")
