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
from .personal import EmbedGAN, EncoderGAN

METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (Generic, Retrieval, Linear, ClusterGAN, EmbedGAN, EncoderGAN, CollaGAN)
}


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


__all__ = ["METHODS", "Method", "fill", "load_run", "method_class"]
