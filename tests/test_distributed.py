"""Data-parallel training: DDP over gloo in two CPU processes, through torchrun and the CLI,
and checkpoints under torchrun (kill -9 every process, resume, same weights)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import make_dataset

from inkfill import distributed
from inkfill.data import WriterMatrix, to_model
from inkfill.methods import METHODS, load_run
from inkfill.methods.personal import _CellSampler
from inkfill.models import Discriminator, FeatureNet, Generator
from inkfill.train import train_feature_net, train_gan


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


def _feature_rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(rank)
    # 31 images in batches of 8: rank 0's shard (16) is two whole batches, rank 1's (15) not.
    data = make_dataset(n_writers=6, seed=1).subset(torch.arange(31).numpy())
    net = FeatureNet(10, 6, width=4, dim=8)
    rows = torch.as_tensor([int(w[1:]) for w in data.writers])
    train_feature_net(net, to_model(data.images), torch.as_tensor(data.labels), rows, epochs=2,
                      batch_size=8, rng=torch.Generator().manual_seed(rank))  # fmt: skip
    torch.save(torch.cat([p.detach().flatten() for p in net.parameters()]), f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_feature_net_ranks_step_alike_when_their_shards_differ_in_batches(tmp_path):
    """35,071 images in two ranks' shards of 17,536 and 17,535: 137 batches of 128 against 136,
    and the rank with one more waited in its all-reduce forever (a real torchrun fit hung). Every
    rank now steps as often as the smallest shard allows."""
    ctx = mp.spawn(_feature_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False)
    deadline = time.time() + 120
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the ranks did not finish: one waits in a collective the other skipped")
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_ddp_ranks_end_with_the_same_weights_from_their_own_shards(tmp_path):
    mp.spawn(_train_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    torch.testing.assert_close(a["weights"], b["weights"], rtol=0, atol=0)
    assert (a["seen"] % 2 == 0).all() and (b["seen"] % 2 == 1).all()  # disjoint shards


PARALLEL = {
    "completion-gan": dict(style_dim=8, nz=4, ngf=8, ndf=8, steps=12, batch_cells=4,
                           classifier_epochs=1, predictor_draws=2000, rank_steps=30),
    "collagan": dict(width=4, ndf=8, steps=12, batch_cells=4),
}  # fmt: skip


def _fit_parallel_rank(rank: int, world: int, port: int, out: str, name: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(rank)
    matrix = WriterMatrix(make_dataset(n_writers=8, seed=3))
    method = METHODS[name](**PARALLEL[name]).fit(matrix)
    sampler = _CellSampler(matrix, "cpu", 4, 1, torch.Generator().manual_seed(0))
    torch.save({"state": method._state()[0], "cells": sampler.mine, "n_cells": len(sampler)},
               f"{out}/rank{rank}.pt")  # fmt: skip
    dist.destroy_process_group()


@pytest.mark.parametrize("name", list(PARALLEL))
def test_personal_methods_ranks_end_bit_identical_from_disjoint_cells(name, tmp_path):
    """Gradients averaged over the ranks (the classifier's too): every rank ends with the same
    weights and batch-norm statistics, though each drew its own cells and noise."""
    mp.spawn(_fit_parallel_rank, args=(2, _free_port(), str(tmp_path), name), nprocs=2)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        torch.testing.assert_close(a["state"][key], b["state"][key], rtol=0, atol=0, msg=key)
    assert set(a["cells"].tolist()).isdisjoint(b["cells"].tolist())
    cells = torch.cat([a["cells"], b["cells"]]).sort().values
    assert cells.tolist() == list(range(a["n_cells"]))  # the shards cover every cell once
    # Not trivially equal: one process on the same data ends elsewhere (other batches).
    single = METHODS[name](**PARALLEL[name]).fit(WriterMatrix(make_dataset(n_writers=8, seed=3)))
    key = "generator.net.fc.weight" if name == "completion-gan" else next(iter(a["state"]))
    assert not torch.equal(single._state()[0][key], a["state"][key])


def test_outside_torchrun_nothing_changes():
    assert not distributed.active() and distributed.rank() == 0 and distributed.world_size() == 1
    assert distributed.shard(5).tolist() == [0, 1, 2, 3, 4]
    net = torch.nn.Linear(2, 2)
    before = [p.detach().clone() for p in net.parameters()]
    net(torch.ones(1, 2)).sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    distributed.broadcast([net])
    distributed.average_gradients(net.parameters())
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))
    assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), grads))


def _torchrun(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "inkfill", *args]  # fmt: skip
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


FIT_ARGS = {
    "per-cluster": ["--method", "cluster-gan", "--n-clusters", "2", "--ngf", "4", "--ndf", "4",
                    "--label-steps", "3", "--cluster-steps", "3", "--generator", "per-cluster"],
    "conditional": ["--method", "cluster-gan", "--generator", "conditional", "--n-clusters", "2",
                    "--ngf", "4", "--ndf", "4", "--steps", "4"],
}  # fmt: skip
# completion-gan under the torchrun CLI: in the kill -9 test below (it also loads and fills).
CG_ARGS = ["--method", "completion-gan", "--style-dim", "8", "--nz", "4", "--ngf", "8", "--ndf",
           "8", "--batch-cells", "4", "--classifier-epochs", "1", "--predictor-draws", "2000",
           "--rank-steps", "30"]  # fmt: skip


@pytest.mark.parametrize("case", list(FIT_ARGS))
def test_torchrun_fit_completes_and_rank0_writes_a_loadable_run(case, tiny_npz, tmp_path):
    run = tmp_path / "run"
    r = _torchrun(
        "fit", *FIT_ARGS[case], "--data", str(tiny_npz), "--out", str(run), "--device", "cpu",
        "--no-progress", "--figures", "none", cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("run written to") == 1  # rank 0 only
    assert "rank 0 of 2 data-parallel processes" in r.stdout
    method = load_run(run)
    writer, label = method.matrix_.empty_cells()[0]
    assert method.generate(writer, label, 3).shape == (3, 28, 28)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no leftovers


def test_torchrun_refuses_single_process_methods(tiny_npz, tmp_path):
    r = _torchrun("fit", "--method", "generic", "--data", str(tiny_npz), "--out",
                  str(tmp_path / "run"), "--device", "cpu", cwd=tmp_path)  # fmt: skip
    assert r.returncode != 0
    assert "generic has no data-parallel training" in r.stderr
    assert not (tmp_path / "run").exists()


def _kill_all(proc: subprocess.Popen) -> None:
    """kill -9 torchrun's agent and its workers (which outlive the agent if it dies alone)."""
    kids = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    for pid in kids.stdout.split():
        os.kill(int(pid), signal.SIGKILL)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_torchrun_kill_9_then_resume_matches_an_uninterrupted_fit(tiny_npz, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    def fit(out):
        return ["fit", *CG_ARGS, "--steps", "60", "--data", str(tiny_npz),
                "--out", str(out), "--device", "cpu", "--no-progress", "--figures", "none",
                "--checkpoint-every", "10"]  # fmt: skip

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2", "-m", "inkfill"]  # fmt: skip
    run = tmp_path / "run"
    proc = subprocess.Popen([*launcher, *fit(run)], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    current = tmp_path / ".run.partial" / "checkpoint" / "current.safetensors"
    deadline, step = time.time() + 120, 0
    while time.time() < deadline and proc.poll() is None and step < 20:
        try:
            with safe_open(str(current), "pt") as f:
                meta = json.loads(f.metadata()["inkfill"])
                step = meta["step"] if meta["stage"] == "completion-gan" else 0
        except Exception:
            pass  # not written yet, or caught between write and rename
        time.sleep(0.05)
    assert proc.poll() is None, "the fit ended before it could be killed"
    with safe_open(str(current), "pt") as f:
        assert meta["world"] == 2 and "rank1.rng" in f.keys()  # noqa: SIM118
    _kill_all(proc)
    assert not run.exists()

    # A checkpoint of two processes does not resume in one.
    r = subprocess.run([sys.executable, "-m", "inkfill", "fit", "--resume", str(run)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and "--nproc_per_node 2" in r.stderr, r.stderr
    r = subprocess.run([*launcher, "fit", "--resume", str(run)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming" in r.stdout and not (tmp_path / ".run.partial").exists()
    assert r.stdout.count("run written to") == 1  # rank 0 only
    assert "rank 0 of 2 data-parallel processes" in r.stdout
    method = load_run(run)
    writer, label = method.matrix_.empty_cells()[0]
    assert method.generate(writer, label, 3).shape == (3, 28, 28)

    plain = tmp_path / "plain"
    r = subprocess.run([*launcher, *fit(plain)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = load_file(str(run / "model.safetensors")), load_file(str(plain / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
