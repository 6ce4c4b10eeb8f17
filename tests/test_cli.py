import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import write_leaf

from inkfill.cli import main
from inkfill.data import Dataset, load_dataset


def run_cli(capsys, *argv):
    """main() in-process; argparse's usage errors leave through SystemExit."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def _good(n=6):
    rng = np.random.default_rng(0)
    return {
        "images": rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
        "labels": np.arange(n) % 10,
        "writers": np.array(["a", "b"] * (n // 2)),
    }


def _bad_inputs(tmp_path):
    """(name, path, extra args, words the message must contain)."""
    g = _good()
    truncated = tmp_path / "truncated.npz"
    _npz(tmp_path / "whole.npz", **g)
    truncated.write_bytes((tmp_path / "whole.npz").read_bytes()[:3000])
    garbage = tmp_path / "garbage.npz"
    garbage.write_text("this is not an archive")
    leaf_truncated = write_leaf(
        Dataset(g["images"], g["labels"], g["writers"]), tmp_path / "l.json"
    )
    leaf_truncated.write_text(leaf_truncated.read_text()[:500])
    leaf_short = tmp_path / "short.json"
    leaf_short.write_text(
        json.dumps({"users": ["u"], "user_data": {"u": {"x": [[0.5] * 700], "y": [1]}}})
    )
    leaf_nan = tmp_path / "nan.json"
    leaf_nan.write_text(
        json.dumps({"users": ["u"], "user_data": {"u": {"x": [[float("nan")] * 784], "y": [1]}}})
    )
    empty_dir = tmp_path / "empty_dir"
    empty_dir.mkdir()
    return [
        ("missing path", tmp_path / "nope.npz", [], "no such file"),
        ("garbage", garbage, [], "not a readable npz"),
        ("truncated npz", truncated, [], "npz"),
        (
            "missing array",
            _npz(tmp_path / "m.npz", images=g["images"], labels=g["labels"]),
            [],
            "missing array writers",
        ),
        (
            "mismatched",
            _npz(tmp_path / "mm.npz", **{**g, "labels": g["labels"][:-1]}),
            [],
            "mismatched lengths",
        ),
        (
            "shape",
            _npz(tmp_path / "s.npz", **{**g, "images": g["images"].reshape(6, 784)}),
            [],
            "(N, 28, 28)",
        ),
        (
            "dtype",
            _npz(tmp_path / "d.npz", **{**g, "images": g["images"].astype(np.float32)}),
            [],
            "uint8",
        ),
        (
            "nan labels",
            _npz(tmp_path / "n.npz", **{**g, "labels": np.full(6, np.nan)}),
            [],
            "non-finite",
        ),
        (
            "label range",
            _npz(tmp_path / "r.npz", **{**g, "labels": np.full(6, 70)}),
            [],
            "outside 0-61",
        ),
        (
            "negative label",
            _npz(tmp_path / "neg.npz", **{**g, "labels": np.full(6, -1)}),
            [],
            "outside 0-61",
        ),
        (
            "empty after filter",
            _npz(tmp_path / "e.npz", **{**g, "labels": np.full(6, 20)}),
            [],
            "no images with digits",
        ),
        ("truncated json", leaf_truncated, [], "not readable LEAF json"),
        ("short leaf image", leaf_short, [], "784 floats"),
        ("nan leaf", leaf_nan, [], "non-finite"),
        ("empty dir", empty_dir, [], "no LEAF .json shards"),
        ("bad label set", tmp_path / "whole.npz", ["--labels", "greek"], "invalid choice"),
    ]


def test_every_bad_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("INKFILL_DATA", raising=False)
    for name, path, extra, words in _bad_inputs(tmp_path):
        code, out, err = run_cli(capsys, "data", "--data", path, *extra)
        assert code == 2, name
        lines = err.strip().splitlines()
        assert len(lines) == 1, (name, err)
        assert words in lines[0], (name, lines[0])
        assert "Traceback" not in err


def test_no_data_says_how_to_get_femnist(capsys, monkeypatch):
    monkeypatch.delenv("INKFILL_DATA", raising=False)
    code, _, err = run_cli(capsys, "data")
    assert (
        code == 2 and "INKFILL_DATA" in err and "LEAF" in err and len(err.strip().splitlines()) == 1
    )


def test_env_var_points_at_data(tiny_npz, capsys, monkeypatch):
    monkeypatch.setenv("INKFILL_DATA", str(tiny_npz))
    code, out, _ = run_cli(capsys, "data")
    assert code == 0 and "writers          12" in out


def test_console_script_exit_status(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "inkfill", "data", "--data", str(tmp_path / "missing.npz")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "command", ["", "data", "fit", "fill", "bench", "report", "serve", "explain"]
)
def test_every_help_prints(command, capsys):
    """--help on every command prints and exits 0 (a '%' in a hyperparameter's help once broke
    `fit --help` with a traceback: argparse formats help strings with %)."""
    with pytest.raises(SystemExit) as exit_:
        main([*command.split(), "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: inkfill")
    if command == "fit":
        assert "--head" in out and "step +31%)" in out


def test_data_summary_on_real_digits(real_digits, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "data", "--data", real_digits, "--preview", tmp_path / "p.png")
    assert code == 0
    assert "writers          516" in out and "images           34,571" in out
    assert "empty cells      774" in out
    assert (tmp_path / "p.png").stat().st_size > 10_000


def test_data_summary_on_real_leaf_dir(real_leaf, capsys):
    code, out, _ = run_cli(capsys, "data", "--data", real_leaf, "--labels", "all")
    assert code == 0 and "writers          5" in out and "images           837" in out


def test_data_summary_all_labels(real_all, capsys):
    code, out, _ = run_cli(capsys, "data", "--data", real_all, "--labels", "all")
    assert code == 0 and "writers          540" in out and "labels           62 (all)" in out


TINY_FLAGS = ["--n-clusters", "3", "--n-components", "8", "--ngf", "8", "--ndf", "8", "--nz", "16"]
TINY_FLAGS += ["--generator", "per-cluster", "--label-steps", "6", "--cluster-steps", "4"]
TINY_FLAGS += ["--no-progress"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from conftest import make_dataset

    root = tmp_path_factory.mktemp("cli")
    make_dataset().save(root / "tiny.npz")
    code = main(
        [
            "fit",
            "--data",
            str(root / "tiny.npz"),
            "--method",
            "cluster-gan",
            "--out",
            str(root / "run"),
            *TINY_FLAGS,
        ]
    )
    assert code == 0
    return root


def test_fit_writes_a_complete_run(tiny_run):
    run = tiny_run / "run"
    for name in (
        "config.json",
        "matrix.json",
        "model.safetensors",
        "metrics.json",
        "metrics.jsonl",
        "log.txt",
    ):
        assert (run / name).stat().st_size > 0, name
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics["cluster_check"]["labels"]) >= 10
    assert (run / "figures" / "label_3.png").exists()
    assert (run / "figures" / "clusters" / "label_3_cluster_0.png").exists()
    assert (run / "figures" / "losses" / "label_3.png").exists()
    assert (run / "figures" / "cluster_check_tradeoff.png").exists()
    assert not list(tiny_run.glob(".run.partial-*"))


def test_fill_missing_and_cells(tiny_run, capsys):
    run, out = tiny_run / "run", tiny_run / "filled.npz"
    code, text, _ = run_cli(
        capsys, "fill", "--run", run, "--missing", "--per-cell", 3, "--out", out, "--no-progress"
    )
    assert code == 0 and "images for" in text
    filled = load_dataset(out)
    info = json.loads((run / "matrix.json").read_text())
    n_empty = sum(c == 0 for row in info["counts"] for c in row)
    assert len(filled) == 3 * n_empty
    first = (filled.writers[0], int(filled.labels[0]))
    cells = tiny_run / "cells.csv"
    cells.write_text(f"writer,label\n{first[0]},{first[1]}\n")
    code, _, _ = run_cli(
        capsys,
        "fill",
        "--run",
        run,
        "--cells",
        cells,
        "--per-cell",
        3,
        "--out",
        tiny_run / "one.npz",
    )
    assert code == 0
    np.testing.assert_array_equal(load_dataset(tiny_run / "one.npz").images, filled.images[:3])
    code, text, _ = run_cli(
        capsys, "explain", "--run", run, "--writer", first[0], "--label", first[1]
    )
    assert code == 0 and "chosen cluster" in text and "votes" in text


def test_fill_bad_cells_are_one_line_errors(tiny_run, capsys):
    run = tiny_run / "run"
    info = json.loads((run / "matrix.json").read_text())
    observed = next(
        (w, info["label_ids"][c])
        for r, w in enumerate(info["writer_ids"])
        for c in range(10)
        if info["counts"][r][c]
    )
    cases = {
        "bad header": ("who,what\nw000,1\n", "header writer,label"),
        "unknown writer": ("writer,label\nnobody,1\n", "unknown writer"),
        "label not in data": ("writer,label\nw000,40\n", "not in the data"),
        "not a number": ("writer,label\nw000,one\n", "not a LEAF class id"),
        "observed cell": (f"writer,label\n{observed[0]},{observed[1]}\n", "observed"),
        "duplicate": ("writer,label\nw000,1\nw000,1\n", "twice"),
        "empty": ("writer,label\n", "no cells"),
    }
    for name, (text, words) in cases.items():
        cells = tiny_run / f"{name}.csv"
        cells.write_text(text)
        out = tiny_run / f"{name}.npz"
        code, _, err = run_cli(
            capsys, "fill", "--run", run, "--cells", cells, "--out", out, "--no-progress"
        )
        assert code == 2 and len(err.strip().splitlines()) == 1 and words in err, (name, err)
        assert not out.exists(), name


def test_fit_and_fill_refuse_bad_arguments(tiny_run, tiny_npz, tmp_path, capsys):
    fit = ["fit", "--data", tiny_npz, "--method", "cluster-gan", "--out", tmp_path / "r"]
    cases = [
        (fit[:4] + ["magic", "--out", tmp_path / "r"], "unknown method"),
        (fit[:6] + [tiny_run / "run"], "already exists"),
        (fit + ["--generator", "x"], "--generator"),
        (fit + ["--n-clusters", "0"], "at least 1"),
        (fit + ["--k", "3"], "does not apply"),
        (["fit", "--data", tmp_path / "none.npz"] + fit[3:], "no such file"),
        (fit + ["--device", "cuda:7"], "cuda"),
        (
            ["fill", "--run", tmp_path / "nothing", "--missing", "--out", tmp_path / "o.npz"],
            "no such run",
        ),
    ]
    for argv, words in cases:
        code, _, err = run_cli(capsys, *argv)
        if "cuda" in words and code == 0:  # a machine with that GPU: nothing to check
            continue
        assert code == 2 and len(err.strip().splitlines()) == 1 and words in err, (argv, err)
    assert not (tmp_path / "r").exists() and not list(tmp_path.glob(".r.partial-*"))


def test_corrupt_run_is_a_one_line_error(tiny_run, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_run / "run", broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    code, _, err = run_cli(
        capsys, "fill", "--run", broken, "--missing", "--out", tmp_path / "o.npz"
    )
    assert code == 2 and "corrupt" in err and len(err.strip().splitlines()) == 1
    (broken / "config.json").write_text("{not json")
    code, _, err = run_cli(capsys, "explain", "--run", broken, "--writer", "w000", "--label", "1")
    assert code == 2 and "corrupt" in err


def test_dry_run_prints_the_resolved_config(tiny_npz, tmp_path, capsys):
    argv = ["fit", "--data", tiny_npz, "--method", "cluster-gan", "--out", tmp_path / "r"]
    code, out, _ = run_cli(capsys, *argv, "--generator", "conditional", "--dry-run")
    resolved = json.loads(out)
    assert code == 0 and resolved["params"]["generator"] == "conditional"
    assert resolved["params"]["n_clusters"] == 7
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("name", ["done.npz", "done.json", "done/"])
def test_fill_complete_writes_real_plus_flagged_fills(tiny_run, tmp_path, capsys, name):
    run, out = tiny_run / "run", str(tmp_path) + "/" + name  # pathlib would drop a trailing /
    code, text, err = run_cli(
        capsys, "fill", "--run", run, "--missing", "--complete", "--per-cell", 2, "--out", out,
        "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    real = load_dataset(tiny_run / "tiny.npz")
    done = load_dataset(out)
    info = json.loads((run / "matrix.json").read_text())
    n_empty = sum(c == 0 for row in info["counts"] for c in row)
    assert len(done) == len(real) + 2 * n_empty and done.n_generated == 2 * n_empty
    assert done.source["method"] == "cluster-gan" and done.source["seed"] == 0
    # The real part is the run's data, image for image; no generated image sits in an observed cell.
    mine = ~done.generated
    key = lambda d, m: sorted(zip(d.writers[m], d.labels[m], map(bytes, d.images[m])))  # noqa: E731
    assert key(done, mine) == key(real, np.ones(len(real), bool))
    observed = set(zip(real.writers.tolist(), real.labels.tolist()))
    assert not observed & set(zip(done.writers[~mine].tolist(), done.labels[~mine].tolist()))
    code, text, _ = run_cli(capsys, "data", "--data", out, "--preview", tmp_path / "p.png")
    assert code == 0 and f"generated        {2 * n_empty:,} images" in text
    assert (tmp_path / "p.png").stat().st_size > 0
    code, _, err = run_cli(capsys, "fill", "--run", run, "--missing", "--complete", "--out", out)
    if name.endswith("/"):  # a LEAF directory of shards, never written over
        assert (tmp_path / "done" / "all_data_0.json").is_file()
        assert code == 2 and "already exists" in err


def test_fill_streams_and_refuses_what_the_disk_cannot_hold(tiny_run, tmp_path, capsys):
    import inkfill.methods.base as base

    run = tiny_run / "run"
    code, _, err = run_cli(capsys, "fill", "--run", run, "--missing", "--per-cell", 10**12,
                           "--out", tmp_path / "huge.npz", "--no-progress")  # fmt: skip
    assert code == 2 and "GB free" in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())  # nothing written, not even a temporary file
    code, _, err = run_cli(capsys, "fill", "--run", run, "--missing", "--per-cell", 10**9,
                           "--out", tmp_path / "huge.json", "--no-progress")  # fmt: skip
    assert code == 2 and "write an .npz" in err
    # Cells bigger than one generator call come in pieces; the first piece is the plain draw.
    old = base.FILL_IMAGES
    base.FILL_IMAGES = 5
    try:
        code, _, _ = run_cli(capsys, "fill", "--run", run, "--missing", "--per-cell", 12,
                             "--out", tmp_path / "pieces.npz", "--no-progress")  # fmt: skip
    finally:
        base.FILL_IMAGES = old
    assert code == 0
    pieces = load_dataset(tmp_path / "pieces.npz")
    run_cli(capsys, "fill", "--run", run, "--missing", "--per-cell", 5,
            "--out", tmp_path / "five.npz", "--no-progress")  # fmt: skip
    five = load_dataset(tmp_path / "five.npz")
    assert len(pieces) == 12 * len(five) // 5 and pieces.generated.all()
    np.testing.assert_array_equal(pieces.images[:5], five.images[:5])
    assert not np.array_equal(pieces.images[5:10], five.images[:5])


def test_cells_csv_from_a_spreadsheet_and_sampling_overrides(tiny_run, tmp_path, capsys):
    run = tiny_run / "run"
    info = json.loads((run / "matrix.json").read_text())
    r, c = next((r, c) for r, row in enumerate(info["counts"]) for c, n in enumerate(row) if not n)
    cells = tmp_path / "cells.csv"
    line = f"{info['writer_ids'][r]},{info['label_ids'][c]}"
    cells.write_bytes(b"\xef\xbb\xbfwriter,label\r\n" + line.encode() + b"\r\n")  # BOM, CRLF
    out = tmp_path / "o.npz"
    code, _, err = run_cli(capsys, "fill", "--run", run, "--cells", cells, "--per-cell", 3,
                           "--out", out, "--sample", "truncation=0.5")  # fmt: skip
    assert code == 0, err
    assert len(load_dataset(out)) == 3
    for bad, words in (("steps=3", "need a refit"), ("truncation=x", "not a float"),
                       ("truncation", "PARAM=VALUE"), ("truncation=-1", "truncation")):  # fmt: skip
        code, _, err = run_cli(capsys, "fill", "--run", run, "--cells", cells,
                               "--out", tmp_path / "x.npz", "--sample", bad)  # fmt: skip
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, (bad, err)
    code, _, err = run_cli(capsys, "fill", "--run", run, "--missing", "--complete",
                           "--data", tmp_path / "o.npz", "--out", tmp_path / "x.npz")  # fmt: skip
    assert code == 2 and "not those" in err
    assert not (tmp_path / "x.npz").exists()


def test_progress_to_a_log_file_redraws_every_30_s(tiny_npz, tmp_path, capsys):
    import io

    from inkfill import progress

    def bar():
        return progress.tqdm(total=3, file=io.StringIO())

    progress.to_log = False
    assert bar().mininterval < 1  # library use: tqdm's own default
    code, _, _ = run_cli(capsys, "data", "--data", tiny_npz)  # stderr here is not a terminal
    assert code == 0 and progress.to_log
    assert bar().mininterval == progress.LOG_INTERVAL
    progress.to_log = False
