"""Frozen dataclasses holding every default once; the CLI names its flags after these fields."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

LabelSet = Literal["digits", "all"]

# LEAF's FEMNIST class ids: 0-9 digits, 10-35 A-Z, 36-61 a-z.
N_LEAF_CLASSES = 62
LABEL_CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
IMAGE_SIZE = 28
DATA_ENV = "INKFILL_DATA"


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


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def from_dict(cls, values: dict):
    """Build `cls` from a dict, ignoring unknown keys so older run directories still load."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


class InkfillError(Exception):
    """A problem with the user's input; the CLI prints it on one line and exits with status 2."""
