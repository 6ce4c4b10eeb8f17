"""inkfill serve: the API on a tiny encoder-gan run (every bad input is a clear 4xx, never a
500 or a file outside the run), a bounded load test on loopback, and end-to-end runs of the
viewer and the static report in headless Chromium on the real FEMNIST digits."""

import io

import numpy as np
import pytest
from conftest import make_dataset
from PIL import Image

from inkfill.data import WriterMatrix
from inkfill.methods.personal import EncoderGAN
from inkfill.serve import (
    MAX_N,
    MAX_UPLOAD_BYTES,
    LiveServer,
    create_app,
    load_test,
    upload_to_image,
)

TINY = dict(style_dim=8, nz=4, ngf=8, ndf=8, steps=3, batch_cells=4, classifier_epochs=1)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    data = make_dataset(n_writers=8, seed=7)
    data.save(root / "tiny.npz")
    EncoderGAN(**TINY).fit(WriterMatrix(data)).save(root / "run")
    return root / "run", root / "tiny.npz", data


@pytest.fixture(scope="module")
def client(tiny_run):
    from fastapi.testclient import TestClient

    run, npz, _ = tiny_run
    return TestClient(create_app(run, str(npz)))


def png_bytes(image: np.ndarray, invert: bool = False) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(255 - image if invert else image).save(buf, format="PNG")
    return buf.getvalue()


def test_info_writers_and_cells(client, tiny_run):
    info = client.get("/api/info").json()
    assert info["method"] == "encoder-gan" and info["writers"] == 8 and info["can_reference"]
    assert client.get("/api/writers", params={"q": "w00"}).json()["writers"][:2] == [
        "w000",
        "w001",
    ]
    cell = client.get("/api/writer", params={"writer": "w001"}).json()
    assert set(cell["observed"]) | set(cell["empty"]) == set(info["labels"])
    label = cell["observed"][0]
    r = client.get("/api/real.png", params={"writer": "w001", "label": label, "n": 4})
    assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_generate_is_seeded(client):
    def get(seed):
        r = client.get("/api/generate.png", params={"writer": "w002", "label": 3, "n": 5,
                                                   "seed": seed})  # fmt: skip
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        return r.content

    assert get(1) == get(1) and get(1) != get(2)


@pytest.mark.parametrize(
    "url, params, status, words",
    [
        ("/api/writer", {"writer": "nobody"}, 404, "unknown writer"),
        ("/api/writer", {"writer": "../config.json"}, 404, "unknown writer"),
        ("/api/writer", {"writer": "/etc/passwd"}, 404, "unknown writer"),
        ("/api/generate.png", {"writer": "w001", "label": 42}, 400, "invalid label"),
        ("/api/generate.png", {"writer": "w001", "label": "x"}, 400, "label"),
        ("/api/generate.png", {"writer": "w001", "label": 1, "n": MAX_N + 1}, 400, "n must be"),
        ("/api/generate.png", {"writer": "w001", "label": 1, "n": 0}, 400, "n must be"),
        ("/api/generate.png", {"writer": "w001", "label": 1, "n": 10**12}, 400, "n must be"),
        ("/api/generate.png", {"writer": "w001", "label": 1, "seed": -1}, 400, "seed"),
        ("/api/generate.png", {"label": 1}, 400, "writer"),
        ("/api/real.png", {"writer": "w001", "label": 1, "n": 999}, 400, "n must be"),
        ("/api/writers", {"limit": 10**6}, 400, "limit"),
        ("/../config.json", {}, 404, "Not Found"),
        ("/static/../../model.safetensors", {}, 404, "Not Found"),
        ("/api/%2e%2e/config.json", {}, 404, "Not Found"),
    ],
)
def test_bad_requests_are_clear_4xx(client, url, params, status, words):
    r = client.get(url, params=params)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error and "\n" not in error


def test_upload_fills_the_missing_labels(client, tiny_run):
    _, _, data = tiny_run
    mine = data.writers == "w003"
    labels = [int(v) for v in np.unique(data.labels[mine])[:3]]
    files = [("files", (f"{k}.png", png_bytes(data.images[mine & (data.labels == v)][0],
                                              invert=k % 2 == 0), "image/png"))
             for k, v in enumerate(labels)]  # fmt: skip
    r = client.post("/api/fill-new", files=files, data={"labels": ",".join(map(str, labels)),
                                                        "n": "4", "seed": "1"})  # fmt: skip
    assert r.status_code == 200, r.text
    filled = r.json()["filled"]
    assert set(filled) == {str(v) for v in range(10)} - {str(v) for v in labels}
    assert all(src.startswith("data:image/png;base64,") for src in filled.values())


def test_bad_uploads_are_clear_4xx(client):
    good = ("files", ("a.png", png_bytes(np.zeros((28, 28), np.uint8)), "image/png"))
    cases = [
        ([("files", ("a.txt", b"hello, not an image", "text/plain"))], "1", 400, "not an image"),
        ([("files", ("big.png", b"\x89PNG" + b"0" * MAX_UPLOAD_BYTES, "image/png"))], "1", 413,
         "over"),
        ([good] * 40, ",".join(["1"] * 40), 413, "at most"),
        ([good, good], "1", 400, "2 images but 1 labels"),
        ([good], "one", 400, "comma-separated"),
        ([good], "77", 400, "invalid label"),
    ]  # fmt: skip
    for files, labels, status, words in cases:
        r = client.post("/api/fill-new", files=files, data={"labels": labels})
        assert r.status_code == status, (words, r.text)
        assert words in r.json()["error"]
    r = client.post("/api/fill-new", data={"labels": "1"})
    assert r.status_code == 400 and "files" in r.json()["error"]


def test_a_bomb_is_refused_before_decoding():
    img = Image.new("L", (5000, 5000))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    from inkfill.serve import BadRequest

    with pytest.raises(BadRequest) as e:
        upload_to_image(buf.getvalue())
    assert e.value.status == 413


def test_upload_normalisation_matches_femnist_polarity():
    ink = np.zeros((60, 40), np.uint8)
    ink[10:50, 18:22] = 255  # a "1", white ink on black
    a = upload_to_image(png_bytes(ink))
    b = upload_to_image(png_bytes(ink, invert=True))  # dark ink on white paper
    assert a.shape == (28, 28) and np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert a[:, 13:15].mean() > 100 and a[:, :5].mean() < 5  # centred, ink high


def test_methods_that_cannot_take_new_writers_say_so(tmp_path):
    from fastapi.testclient import TestClient

    from inkfill.methods.baselines import Generic

    data = make_dataset(n_writers=5, seed=8)
    data.save(tmp_path / "d.npz")
    Generic().fit(WriterMatrix(data)).save(tmp_path / "run")
    client = TestClient(create_app(tmp_path / "run", str(tmp_path / "d.npz")))
    assert not client.get("/api/info").json()["can_reference"]
    good = ("files", ("a.png", png_bytes(np.zeros((28, 28), np.uint8)), "image/png"))
    r = client.post("/api/fill-new", files=[good], data={"labels": "1"})
    assert r.status_code == 400 and "cannot fill writers" in r.json()["error"]


# -- a live server on loopback -------------------------------------------------------------------


def test_bounded_load_on_loopback(tiny_run, capsys):
    run, npz, _ = tiny_run
    with LiveServer(create_app(run, str(npz))) as base:
        urls = [f"{base}/api/generate.png?writer=w00{k % 8}&label={k % 10}&n=16&seed={k}"
                for k in range(200)]  # fmt: skip
        stats = load_test(urls, concurrency=8)
    with capsys.disabled():
        print(f"\nload test: {stats['requests']} requests, 8 at a time, {stats['errors']} errors; "
              f"latency ms p50 {stats['p50']:.1f}, p95 {stats['p95']:.1f}, "
              f"p99 {stats['p99']:.1f}, max {stats['max']:.1f}")  # fmt: skip
    assert stats["errors"] == 0
