"""Data-parallel training: DDP over gloo in two CPU processes, through torchrun and the CLI."""

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import make_dataset

from inkfill import distributed
from inkfill.data import to_model
from inkfill.methods import load_run
from inkfill.models import Discriminator, Generator
from inkfill.train import train_gan


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(rank)  # different local initialisations: DDP must broadcast rank 0's
    real = to_model(make_dataset(n_writers=6, seed=1).images)
    G, D = Generator(8, 4), Discriminator(4)
    seen = []
    neg = lambda idx, rng: (seen.append(idx.clone()) or real[idx], None)  # noqa: E731
    train_gan(G, D, real, steps=3, batch_size=8, rng=torch.Generator().manual_seed(0),
              negatives=neg, negative_weight=0.5)  # fmt: skip
    flat = torch.cat([p.detach().flatten() for p in [*G.parameters(), *D.parameters()]])
    torch.save({"weights": flat, "seen": torch.cat(seen)}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_ranks_end_with_the_same_weights_from_their_own_shards(tmp_path):
    mp.spawn(_train_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    torch.testing.assert_close(a["weights"], b["weights"], rtol=0, atol=0)
    assert (a["seen"] % 2 == 0).all() and (b["seen"] % 2 == 1).all()  # disjoint shards


def test_outside_torchrun_nothing_changes():
    assert not distributed.active() and distributed.rank() == 0 and distributed.world_size() == 1
    assert distributed.shard(5).tolist() == [0, 1, 2, 3, 4]
    net = torch.nn.Linear(2, 2)
    assert distributed.wrap(net) is net


def _torchrun(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "inkfill", *args]  # fmt: skip
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("mode", ["per-cluster", "conditional"])
def test_torchrun_fit_completes_and_rank0_writes_a_loadable_run(mode, tiny_npz, tmp_path):
    run = tmp_path / "run"
    r = _torchrun(
        "fit", "--method", "cluster-gan", "--data", str(tiny_npz), "--out", str(run),
        "--generator", mode, "--n-clusters", "2", "--ngf", "4", "--ndf", "4", "--steps", "4",
        "--label-steps", "3", "--cluster-steps", "3", "--device", "cpu", "--no-progress",
        "--figures", "none", cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("run written to") == 1  # rank 0 only
    assert "rank 0 of 2 data-parallel processes" in r.stdout
    method = load_run(run)
    writer, label = method.matrix_.empty_cells()[0]
    assert method.generate(writer, label, 3).shape == (3, 28, 28)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no leftovers


def test_torchrun_refuses_single_process_methods(tiny_npz, tmp_path):
    r = _torchrun("fit", "--method", "collagan", "--data", str(tiny_npz), "--out",
                  str(tmp_path / "run"), "--device", "cpu", cwd=tmp_path)  # fmt: skip
    assert r.returncode != 0
    assert "collagan trains in one process" in r.stderr
    assert not (tmp_path / "run").exists()
