"""Imputation methods, all with the same fit / generate / save / load contract (see base.py)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..config import InkfillError
from .base import CONFIG_FILE, Method, fill, read_json
from .baselines import Generic, Linear, Retrieval
from .clustergan import ClusterGAN
from .collagan import CollaGAN
from .completion import CompletionGAN, PredictedRetrieval
from .personal import EmbedGAN, EncoderGAN

METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (
        Generic,
        Retrieval,
        PredictedRetrieval,
        Linear,
        ClusterGAN,
        EmbedGAN,
        EncoderGAN,
        CollaGAN,
        CompletionGAN,
    )
}


def reference_methods() -> list[str]:
    """The methods that fill writers they were not trained on, from a few of their images."""
    return [name for name, cls in METHODS.items() if hasattr(cls, "generate_from_reference")]


def method_class(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise InkfillError(f"unknown method {name!r} (methods: {', '.join(METHODS)})") from None


def load_run(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> Method:
    """The fitted method saved in `run_dir` by `inkfill fit`."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InkfillError(f"{run_dir}: no such run directory")
    name = read_json(run_dir / CONFIG_FILE).get("method")
    return method_class(str(name)).load(run_dir, device=device)


def load_run_data(run_dir: str | os.PathLike, method: Method, data: str | None = None):
    """The Dataset `run_dir` was fitted on: `data` if given, else the path its config.json
    recorded (the label set as recorded, or inferred from the run's labels)."""
    from ..data import load_dataset

    saved = read_json(Path(run_dir) / CONFIG_FILE).get("data", {})
    inferred = "all" if any(int(v) > 9 for v in method.matrix_.label_ids) else "digits"
    return load_dataset(data or saved.get("path"), saved.get("label_set", inferred))


__all__ = [
    "METHODS",
    "Method",
    "fill",
    "load_run",
    "load_run_data",
    "method_class",
    "reference_methods",
]
