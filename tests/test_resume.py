"""Resumable fits: atomic checkpoints, --resume after an interruption or a kill -9 ends where an
uninterrupted fit ends (exactly, on the CPU), non-finite losses stop training and keep the last
good checkpoint, and corrupt state gives a one-line error."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_dataset
from safetensors import safe_open

from inkfill import checkpoint as checkpoint_module
from inkfill import train as train_module
from inkfill.checkpoint import Checkpoints
from inkfill.cli import main
from inkfill.data import WriterMatrix
from inkfill.methods import METHODS

CASES = {
    "cluster-gan": dict(
        generator="per-cluster", n_clusters=2, ngf=4, ndf=4, label_steps=20, cluster_steps=20
    ),
    "cluster-gan conditional": dict(generator="conditional", n_clusters=2, ngf=4, ndf=4, steps=40),
    "embed-gan": dict(
        style_dim=8, nz=4, ngf=8, ndf=8, steps=40, batch_cells=4, classifier_epochs=1
    ),  # fmt: skip
    "encoder-gan": dict(
        style_dim=8, nz=4, ngf=8, ndf=8, steps=40, batch_cells=4, classifier_epochs=1
    ),  # fmt: skip
    "collagan": dict(width=4, ndf=8, steps=40, batch_cells=4),
    # The averaged generator and lazy R1 resume exactly too.
    "completion-gan": dict(
        style_dim=8,
        nz=4,
        ngf=8,
        ndf=8,
        steps=40,
        batch_cells=4,
        classifier_epochs=1,
        rank_steps=30,
        predictor_draws=2000,
        ema_halflife=5,
        r1_every=3,
    ),
}


@pytest.fixture(scope="module")
def matrix():
    return WriterMatrix(make_dataset(n_writers=8, seed=6))


def _tensors(method) -> dict:
    return method._state()[0]


class Crash(Exception):
    pass


@pytest.mark.parametrize("name", list(CASES))
def test_interrupted_fit_resumes_to_the_uninterrupted_result(name, matrix, tmp_path, monkeypatch):
    cls, params = METHODS[name.split()[0]], CASES[name]
    reference = cls(**params).fit(matrix)

    saves = {"n": 0}
    original = checkpoint_module.Loop.step

    def crash_after_third_save(self, step, history, force=False):
        before = self.last_saved
        original(self, step, history, force)
        if self.last_saved != before:
            saves["n"] += 1
            if saves["n"] == 3:
                raise Crash(f"simulated crash after saving step {step}")

    monkeypatch.setattr(checkpoint_module.Loop, "step", crash_after_third_save)
    ck = Checkpoints(tmp_path / "ck", every=10)
    with pytest.raises(Crash):
        cls(**params).fit(matrix, checkpoints=ck)
    monkeypatch.setattr(checkpoint_module.Loop, "step", original)
    assert ck.has_state()
    resumed = cls(**params).fit(matrix, checkpoints=Checkpoints(tmp_path / "ck", every=10))

    a, b = _tensors(reference), _tensors(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert reference.history_ == resumed.history_


def _fit_argv(data, out, steps=200, every=20):
    return ["fit", "--method", "cluster-gan", "--generator", "conditional", "--n-clusters", "2",
            "--ngf", "8", "--ndf", "8", "--steps", str(steps), "--data", str(data), "--out",
            str(out), "--figures", "none", "--no-progress", "--device", "cpu",
            "--checkpoint-every", str(every)]  # fmt: skip


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


def test_kill_9_then_resume_matches_an_uninterrupted_fit(tiny_npz, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "inkfill"]
    run = tmp_path / "run"
    proc = subprocess.Popen([*cmd, *_fit_argv(tiny_npz, run)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    current = tmp_path / ".run.partial" / "checkpoint" / "current.safetensors"
    deadline = time.time() + 120
    step = 0
    while time.time() < deadline and proc.poll() is None:
        if current.exists():
            try:
                with safe_open(str(current), "pt") as f:
                    step = json.loads(f.metadata()["inkfill"])["step"]
            except Exception:
                step = 0  # caught between the writer's write and rename: look again
            if step >= 40:
                break
        time.sleep(0.05)
    # Stopped, not finished: the fit holds its lock however slow the second process starts.
    proc.send_signal(signal.SIGSTOP)
    assert proc.poll() is None, "the fit ended before it could be killed"
    # While it runs, a second fit or resume of the same run is refused, not raced.
    r = subprocess.run([*cmd, "fit", "--resume", str(run)], env=env, capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and f"being fitted by process {proc.pid}" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not run.exists()

    r = subprocess.run([*cmd, "fit", "--resume", str(run)], env=env, capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stdout
    assert not (tmp_path / ".run.partial").exists()  # checkpoints cleaned up on success
    assert not (tmp_path / ".run.lock").exists()  # the killed fit's lock was taken over, then freed
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.safetensors", "config.json"):  # a run is readable like any other file
        assert (run / name).stat().st_mode & 0o777 == 0o666 & ~umask, name

    plain = tmp_path / "plain"
    r = subprocess.run([*cmd, *_fit_argv(tiny_npz, plain)], env=env, capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    a, b = _weights(run), _weights(plain)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    tiny_npz, tmp_path, capsys, monkeypatch
):
    calls = {"n": 0}
    original = train_module.bce_g_loss

    def poisoned(logits):
        calls["n"] += 1
        loss = original(logits)
        return loss * float("nan") if calls["n"] > 25 else loss

    monkeypatch.setattr(train_module, "bce_g_loss", poisoned)
    run = tmp_path / "run"
    code = main(_fit_argv(tiny_npz, run, steps=100, every=10))
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert "non-finite" in err and "--resume" in err
    current = tmp_path / ".run.partial" / "checkpoint" / "current.safetensors"
    with safe_open(str(current), "pt") as f:
        meta = json.loads(f.metadata()["inkfill"])
        assert meta["step"] == 20  # NaN from step 26, seen at the step-30 log: 20 is the last good
        assert all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys() if "module." in k)  # noqa: SIM118
    assert not run.exists()

    monkeypatch.setattr(train_module, "bce_g_loss", original)
    assert main(["fit", "--resume", str(run)]) == 0
    assert (run / "model.safetensors").exists()


def test_resume_errors_are_one_line(tiny_npz, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"

    def status(*argv):
        code = main([str(a) for a in argv])
        err = capsys.readouterr().err.strip()
        return code, err

    code, err = status("fit", "--resume", run)
    assert code == 2 and "no interrupted fit" in err and len(err.splitlines()) == 1

    # Leave a partial fit behind, as a crash would.
    saves = {"n": 0}
    original = checkpoint_module.Loop.step

    def crash(self, step, history, force=False):
        original(self, step, history, force)
        saves["n"] += 1
        if saves["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module.Loop, "step", crash)
    assert main(_fit_argv(tiny_npz, run, steps=100, every=10)) == 130
    monkeypatch.setattr(checkpoint_module.Loop, "step", original)
    capsys.readouterr()

    code, err = status(*_fit_argv(tiny_npz, run, steps=100, every=10))
    assert code == 2 and "--resume" in err and len(err.splitlines()) == 1

    current = tmp_path / ".run.partial" / "checkpoint" / "current.safetensors"
    current.write_bytes(current.read_bytes()[:100])  # truncated
    code, err = status("fit", "--resume", run)
    assert code == 2 and "corrupt or truncated" in err and len(err.splitlines()) == 1

    (tmp_path / ".run.partial" / "fit_args.json").write_text("{not json")
    code, err = status("fit", "--resume", run)
    assert code == 2 and len(err.splitlines()) == 1

    code, err = status("fit", "--resume", run, "--method", "generic")
    assert code == 2 and "without --method" in err
