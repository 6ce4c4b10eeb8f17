"""Resumable training: atomic safetensors checkpoints of every training loop.

A fit is a sequence of named stages (cluster-gan: one per DCGAN; embed-gan: the classifier,
then the GAN). A checkpoint directory holds

    stages/<name>.safetensors   a finished stage's weights and loss history, written once
    current.safetensors         the stage in progress: weights, optimiser moments, the random
                                generator, the batch order, the step and the history so far

Every file is written to a temporary name and renamed into place, and carries its JSON (step,
history, optimiser settings) inside the safetensors header, so a `kill -9` at any moment leaves
either the previous complete file or the new one, never a mix. Only tensors and JSON are stored:
no pickle, so loading a checkpoint cannot run code.

On resume a fit runs from the top again: deterministic preparation (clustering, data tables) is
recomputed, finished stages are loaded instead of trained, and the stage in progress continues
from its last checkpoint, with the same random stream, so it ends where an uninterrupted fit ends.

Under torchrun every rank keeps a Checkpoints on the same directory: at a save the ranks send
their own random generator and batch order to rank 0, which alone writes (`rank<r>.` entries);
on resume each rank reads the weights and takes its own stream back. A checkpoint resumes only
with as many processes as wrote it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import distributed
from .config import InkfillError
from .data import atomic_path, file_mode

CURRENT = "current.safetensors"


class CheckpointError(InkfillError):
    """A checkpoint that cannot be read or does not match what is being trained."""


def _write(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(tensors, str(tmp), metadata={"inkfill": json.dumps(meta)})
    os.chmod(tmp, file_mode())  # safetensors writes 0600; a run is read like its other files
    os.replace(tmp, path)


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {})["inkfill"])
        return load_file(str(path)), meta
    except (SafetensorError, KeyError, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({e})") from None


def _safe_name(name: str) -> str:
    if not re.fullmatch(r"[\w.\-]+", name):
        raise ValueError(f"bad stage name {name!r}")
    return name


def _module_tensors(prefix: str, modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{prefix}{n}.{k}": v for n, m in modules.items() for k, v in m.state_dict().items()}


def _load_modules(prefix: str, modules: dict[str, nn.Module], tensors, where: Path) -> None:
    for n, m in modules.items():
        own = {k[len(prefix) + len(n) + 1 :]: v for k, v in tensors.items()
               if k.startswith(f"{prefix}{n}.")}  # fmt: skip
        try:
            m.load_state_dict(own)
        except RuntimeError as e:
            raise CheckpointError(f"{where}: does not match the model trained ({e})") from None


class Checkpoints:
    """The checkpoint directory of one fit; `every`: steps between saves of a running stage."""

    def __init__(self, directory: str | os.PathLike, every: int = 500):
        if every < 1:
            raise InkfillError("--checkpoint-every must be at least 1")
        self.dir, self.every = Path(directory), every
        self.dir.mkdir(parents=True, exist_ok=True)

    def has_state(self) -> bool:
        return (self.dir / CURRENT).exists() or any((self.dir / "stages").glob("*.safetensors"))

    # -- finished stages --------------------------------------------------------------------

    def finished(self, name: str, modules: dict[str, nn.Module]) -> dict | None:
        """Load a finished stage into `modules` and return its history, or None if not finished."""
        path = self.dir / "stages" / f"{_safe_name(name)}.safetensors"
        if not path.exists():
            return None
        tensors, meta = _read(path)
        _load_modules("", modules, tensors, path)
        return meta["history"]

    def finish(self, name: str, modules: dict[str, nn.Module], history: dict) -> None:
        if not distributed.is_main():
            return
        path = self.dir / "stages" / f"{_safe_name(name)}.safetensors"
        _write(path, _module_tensors("", modules), {"stage": name, "history": history})

    # -- the stage in progress --------------------------------------------------------------

    def loop(self, name: str, modules: dict[str, nn.Module]) -> Loop:
        return Loop(self, _safe_name(name), modules)


class Loop:
    """The checkpointing of one training loop. The loop calls `resume(...)` once with its
    optimisers, random generator and batch sampler, then `step(step, history)` after each step."""

    def __init__(self, owner: Checkpoints, name: str, modules: dict[str, nn.Module]):
        self.owner, self.name, self.modules = owner, name, modules
        self.last_saved = 0

    def resume(
        self,
        optimizers: dict[str, torch.optim.Optimizer],
        rng: torch.Generator,
        sampler=None,
        extra: dict[str, torch.Tensor] | None = None,
    ) -> tuple[int, dict | None]:
        """Restore the last checkpoint of this stage, if there is one: (its step, its history);
        else (0, None). `extra` tensors (e.g. running sums) are restored in place."""
        self.optimizers, self.rng, self.sampler, self.extra = optimizers, rng, sampler, extra or {}
        path = self.owner.dir / CURRENT
        if not path.exists():
            return 0, None
        tensors, meta = _read(path)
        if meta.get("stage") != self.name:
            return 0, None  # a checkpoint of an earlier stage, which has finished since
        _load_modules("module.", self.modules, tensors, path)
        for n, opt in optimizers.items():
            state = {}
            for key, value in tensors.items():
                if key.startswith(f"optim.{n}."):
                    index, field = key[len(f"optim.{n}.") :].split(".", 1)
                    state.setdefault(int(index), {})[field] = value
            try:
                opt.load_state_dict({"state": state, "param_groups": meta["optim"][n]})
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{path}: optimiser state does not match ({e})") from None
        world = meta.get("world", 1)
        if world != distributed.world_size():
            raise CheckpointError(
                f"{path} was written by {world} data-parallel process(es): resume it with "
                + ("`inkfill fit --resume`" if world == 1
                   else f"`torchrun --nproc_per_node {world} -m inkfill fit --resume`")
            )  # fmt: skip
        own = f"rank{distributed.rank()}." if distributed.rank() else ""
        rng.set_state(tensors[f"{own}rng"])
        if sampler is not None:
            sampler.load_state(tensors[f"{own}sampler.order"], meta[f"{own}sampler_pos"])
        for key, value in self.extra.items():
            value.copy_(tensors[f"extra.{key}"])
        self.last_saved = meta["step"]
        return meta["step"], meta["history"]

    def step(self, step: int, history: dict, force: bool = False) -> None:
        """Save every `every` steps (every rank calls this at the same steps)."""
        if not force and step - self.last_saved < self.owner.every:
            return
        own = {"rng": self.rng.get_state()}
        if self.sampler is not None:
            own["sampler.order"], own["sampler_pos"] = self.sampler.state()
        ranks = distributed.gather(own)
        self.last_saved = step
        if not distributed.is_main():
            return
        tensors = _module_tensors("module.", self.modules)
        groups = {}
        for n, opt in self.optimizers.items():
            sd = opt.state_dict()
            groups[n] = sd["param_groups"]
            for index, fields in sd["state"].items():
                for field, value in fields.items():
                    tensors[f"optim.{n}.{index}.{field}"] = torch.as_tensor(value)
        meta = {"stage": self.name, "step": step, "history": history, "optim": groups,
                "world": len(ranks)}  # fmt: skip
        for r, state in enumerate(ranks):
            prefix = f"rank{r}." if r else ""
            tensors[f"{prefix}rng"] = state["rng"]
            if self.sampler is not None:
                tensors[f"{prefix}sampler.order"] = state["sampler.order"]
                meta[f"{prefix}sampler_pos"] = state["sampler_pos"]
        tensors.update({f"extra.{k}": v for k, v in self.extra.items()})
        _write(self.owner.dir / CURRENT, tensors, meta)
