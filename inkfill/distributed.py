"""Data-parallel training under torchrun: one process per device (gloo on CPU, nccl on CUDA),
each rank drawing batches from its own shard of the data with noise of its own; rank 0 alone
writes (runs, checkpoints), every rank reads.

    torchrun --nproc_per_node 2 -m inkfill fit --method completion-gan --out runs/ddp

The ranks' models stay equal the same way for every GAN (train.adversarial, the one loop) and
for the feature networks: the personal generators' steps take a second derivative (R1) and
compute losses outside any one module's forward, which DistributedDataParallel does not support,
so, as StyleGAN2-ADA's training loop does, every loop starts from rank 0's weights (`broadcast`)
and averages each step's gradients with one all-reduce per optimiser (`average_gradients`).

Outside torchrun (no WORLD_SIZE in the environment) everything here is a no-op, so the training
loops call it unconditionally.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from .config import InkfillError


def launched() -> bool:
    """True in a process that torchrun started with more than one process in the group."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def setup(device: torch.device) -> torch.device:
    """Join the process group torchrun describes; returns this rank's device (cuda:LOCAL_RANK
    when training on CUDA, else the device given)."""
    if not launched() or active():
        return device
    if not dist.is_available():
        raise InkfillError("this PyTorch build has no torch.distributed")
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise InkfillError(
                f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices here"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    elif device.type == "cpu":
        dist.init_process_group("gloo")
    else:
        raise InkfillError(f"distributed training runs on cpu (gloo) or cuda (nccl), not {device}")
    return device


def teardown() -> None:
    if active():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def generator(seed: int) -> torch.Generator:
    """A random generator for this rank: `seed` itself on rank 0 (so that a single-process fit
    is unchanged), another stream on every other rank."""
    if rank():
        seed = (seed * 1_000_003 + rank() * 0x9E3779B9) % 2**63
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def broadcast(modules) -> None:
    """Every rank takes rank 0's parameters and buffers of `modules` (modules or tensors)."""
    if not active():
        return
    for item in modules:
        tensors = [*item.parameters(), *item.buffers()] if isinstance(item, nn.Module) else [item]
        for t in tensors:
            dist.broadcast(t.data, 0)


@torch.no_grad()
def average_gradients(params) -> None:
    """Replace each parameter's gradient by its mean over the ranks, in one all-reduce.
    Parameters without a gradient are left alone: every rank runs the same graph, so they are
    the same ones on every rank (and Adam skips them, as in one process)."""
    if not active():
        return
    params = [p for p in params if p.grad is not None]
    if not params:
        return
    flat = torch.cat([p.grad.flatten() for p in params])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


def gather(obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if not active():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def smallest_shard(n: int) -> int:
    """The size of the smallest rank's `shard(n)`: a loop that takes a collective step per batch
    must step as often on every rank, or the rank with one batch more waits forever."""
    return n if n < world_size() else n // world_size()


def shard(n: int) -> torch.Tensor:
    """This rank's share of n items: indices rank, rank + world, ... (all of them when there are
    fewer items than ranks)."""
    if n < world_size():
        return torch.arange(n)
    return torch.arange(rank(), n, world_size())
