import json
import subprocess
import sys

import numpy as np
from conftest import write_leaf

from inkfill.cli import main
from inkfill.data import Dataset


def run(capsys, *argv):
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
        code, out, err = run(capsys, "data", "--data", path, *extra)
        assert code == 2, name
        lines = err.strip().splitlines()
        assert len(lines) == 1, (name, err)
        assert words in lines[0], (name, lines[0])
        assert "Traceback" not in err


def test_no_data_says_how_to_get_femnist(capsys, monkeypatch):
    monkeypatch.delenv("INKFILL_DATA", raising=False)
    code, _, err = run(capsys, "data")
    assert (
        code == 2 and "INKFILL_DATA" in err and "LEAF" in err and len(err.strip().splitlines()) == 1
    )


def test_env_var_points_at_data(tiny_npz, capsys, monkeypatch):
    monkeypatch.setenv("INKFILL_DATA", str(tiny_npz))
    code, out, _ = run(capsys, "data")
    assert code == 0 and "writers          12" in out


def test_console_script_exit_status(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "inkfill", "data", "--data", str(tmp_path / "missing.npz")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_data_summary_on_real_digits(real_digits, tmp_path, capsys):
    code, out, _ = run(capsys, "data", "--data", real_digits, "--preview", tmp_path / "p.png")
    assert code == 0
    assert "writers          516" in out and "images           34,571" in out
    assert "empty cells      774" in out
    assert (tmp_path / "p.png").stat().st_size > 10_000


def test_data_summary_on_real_leaf_dir(real_leaf, capsys):
    code, out, _ = run(capsys, "data", "--data", real_leaf, "--labels", "all")
    assert code == 0 and "writers          5" in out and "images           837" in out


def test_data_summary_all_labels(real_all, capsys):
    code, out, _ = run(capsys, "data", "--data", real_all, "--labels", "all")
    assert code == 0 and "writers          540" in out and "labels           62 (all)" in out
