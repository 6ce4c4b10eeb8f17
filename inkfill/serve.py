"""`inkfill serve`: a local web app over one fitted run, on FastAPI (Starlette + uvicorn).

Pick a writer and a label, see the writer's real cells and generate N new images with a seed;
with a method that fills writers it never saw (completion-gan, encoder-gan, ...), upload a few
images of a new writer and fill their missing labels.

Why FastAPI: typed query parameters, multipart uploads and JSON errors out of the box on a small,
well-kept stack (Starlette, uvicorn) that runs in-process for tests, without the weight of
Gradio's front-end bundle; the page itself is one static HTML file with a little plain JS.

Safety: every parameter is looked up in the run's own tables (an unknown writer is a 404, never
a path), n and uploads are bounded, uploads are decoded by Pillow with a pixel cap, and every
error is a 4xx JSON {"error": "..."} with one clear line. Nothing is read from disk after start-up.
"""

import base64
import io
import threading
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .config import LABEL_CHARS, InkfillError
from .methods import load_run, load_run_data, reference_methods

MAX_N = 64
MAX_FILES = 32
MAX_UPLOAD_BYTES = 2_000_000  # per file
MAX_PIXELS = 4096 * 4096  # Pillow's decompression-bomb guard, much lower than its default


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def grid_png(images: np.ndarray, cols: int = 8, scale: int = 2) -> bytes:
    """uint8 (N, 28, 28), ink high -> PNG bytes of a grid, dark ink on white."""
    n = max(1, len(images))
    cols = min(cols, n)
    rows = (n + cols - 1) // cols
    sheet = np.zeros((rows * 30, cols * 30), np.uint8)
    for k, image in enumerate(images):
        r, c = divmod(k, cols)
        sheet[r * 30 + 1 : r * 30 + 29, c * 30 + 1 : c * 30 + 29] = image
    img = Image.fromarray(255 - sheet).resize((cols * 30 * scale, rows * 30 * scale), 0)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def upload_to_image(raw: bytes) -> np.ndarray:
    """Any image file -> uint8 (28, 28), ink high, as FEMNIST: grey, ink brighter than paper
    (inverted if the paper is bright), cropped to the ink's bounding box, padded to a square and
    resized to 28x28."""
    try:
        with Image.open(io.BytesIO(raw)) as img:
            if img.width * img.height > MAX_PIXELS:
                raise BadRequest(413, f"image too large ({img.width}x{img.height} pixels)")
            grey = np.asarray(img.convert("L"), dtype=np.float32)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError):
        raise BadRequest(400, "not an image Pillow can read (PNG, JPEG, ...)") from None
    if grey.mean() > 127:
        grey = 255 - grey  # dark ink on light paper
    ink = grey > 0.25 * grey.max() if grey.max() > 0 else np.zeros_like(grey, bool)
    if ink.any():
        ys, xs = np.nonzero(ink)
        grey = grey[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h, w = grey.shape
    side = int(max(h, w) * 1.25) + 1
    square = np.zeros((side, side), np.float32)
    square[(side - h) // 2 : (side - h) // 2 + h, (side - w) // 2 : (side - w) // 2 + w] = grey
    small = Image.fromarray(square.clip(0, 255).astype(np.uint8)).resize((28, 28), Image.LANCZOS)
    return np.asarray(small, dtype=np.uint8)


class App:
    """The run, its real images by cell, and the request handlers' logic (framework-free)."""

    def __init__(self, run: Path, data: str | None = None, device: torch.device | None = None):
        self.run = Path(run)
        self.method = load_run(self.run, device or torch.device("cpu"))
        info = self.method.matrix_
        self.writers = [str(w) for w in info.writer_ids]
        self.label_ids = [int(v) for v in info.label_ids]
        dataset = load_run_data(self.run, self.method, data)
        row_of = {w: r for r, w in enumerate(self.writers)}
        col_of = {v: c for c, v in enumerate(self.label_ids)}
        self.real: dict[tuple[int, int], list[int]] = {}
        for i, (w, lab) in enumerate(zip(dataset.writers, dataset.labels)):
            r, c = row_of.get(str(w)), col_of.get(int(lab))
            if r is not None and c is not None and info.counts[r, c] > 0:
                self.real.setdefault((r, c), []).append(i)
        self.images = dataset.images
        self.row_of, self.col_of = row_of, col_of
        self.can_reference = hasattr(self.method, "generate_from_reference")
        self.lock = threading.Lock()  # one generation at a time: 2 cores, no oversubscription

    # -- validation ------------------------------------------------------------------------

    def row(self, writer: str) -> int:
        if writer not in self.row_of:
            raise BadRequest(404, f"unknown writer {writer[:80]!r}")
        return self.row_of[writer]

    def col(self, label: int) -> int:
        if label not in self.col_of:
            names = ", ".join(str(v) for v in self.label_ids[:12])
            raise BadRequest(400, f"invalid label {label} (this run's labels: {names}...)")
        return self.col_of[label]

    @staticmethod
    def count(n: int) -> int:
        if not 1 <= n <= MAX_N:
            raise BadRequest(400, f"n must be between 1 and {MAX_N}, not {n}")
        return n

    # -- handlers ----------------------------------------------------------------------------

    def info(self) -> dict:
        return {
            "run": self.run.name,
            "method": self.method.name,
            "writers": len(self.writers),
            "labels": self.label_ids,
            "label_names": [LABEL_CHARS[v] for v in self.label_ids],
            "max_n": MAX_N,
            "can_reference": self.can_reference,
            "max_files": MAX_FILES,
            "max_upload_bytes": MAX_UPLOAD_BYTES,
        }

    def find_writers(self, q: str, limit: int) -> list[str]:
        q = q.lower()
        return [w for w in self.writers if q in w.lower()][: max(1, min(limit, 200))]

    def writer(self, writer: str) -> dict:
        r = self.row(writer)
        observed = [v for c, v in enumerate(self.label_ids) if (r, c) in self.real]
        return {
            "writer": writer,
            "observed": observed,
            "empty": [v for v in self.label_ids if v not in observed],
        }

    def real_png(self, writer: str, label: int, n: int) -> bytes:
        r, c, n = self.row(writer), self.col(label), self.count(n)
        if (r, c) not in self.real:
            raise BadRequest(404, f"writer {writer!r} has no real images of label {label}")
        return grid_png(self.images[self.real[(r, c)][:n]])

    def generate_png(self, writer: str, label: int, n: int, seed: int) -> bytes:
        self.row(writer), self.col(label), self.count(n)
        with self.lock:
            images = self.method.generate(writer, label, n, seed)
        return grid_png(images)

    def fill_new(self, files: list[bytes], labels: list[int], n: int, seed: int) -> dict:
        if not self.can_reference:
            raise BadRequest(
                400,
                f"this run's method ({self.method.name}) cannot fill writers it was not trained "
                f"on; use a run of {', '.join(reference_methods())}",
            )
        if not files:
            raise BadRequest(400, "upload at least one image")
        if len(files) > MAX_FILES:
            raise BadRequest(413, f"at most {MAX_FILES} images per request")
        if len(labels) != len(files):
            raise BadRequest(400, f"{len(files)} images but {len(labels)} labels: give one each")
        self.count(n)
        for label in labels:
            self.col(label)
        images = np.stack([upload_to_image(raw) for raw in files])
        labels_arr = np.asarray(labels, dtype=np.int64)
        missing = [v for v in self.label_ids if v not in set(labels)]
        out = {}
        with self.lock:
            for label in missing:
                try:
                    gen = self.method.generate_from_reference(images, labels_arr, label, n, seed)
                except InkfillError as e:
                    raise BadRequest(400, str(e)) from None
                out[str(label)] = "data:image/png;base64," + base64.b64encode(grid_png(gen)).decode(
                    "ascii"
                )
        return {"filled": out, "uploaded": [str(v) for v in labels]}


def create_app(run: Path, data: str | None = None, device: torch.device | None = None):
    from fastapi import FastAPI, File, Form, Query, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    state = App(run, data, device)
    Writer = Annotated[str, Query(max_length=200)]
    Seed = Annotated[int, Query(ge=0, le=2**31 - 1)]
    api = FastAPI(title="inkfill", docs_url=None, redoc_url=None, openapi_url=None)

    @api.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @api.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        message = f"{where}: {first.get('msg', 'invalid value')}"
        return JSONResponse({"error": message}, status_code=400)

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @api.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):  # never a bare 500 page
        return JSONResponse({"error": f"internal error: {type(exc).__name__}"}, status_code=500)

    def png(data: bytes) -> Response:
        return Response(data, media_type="image/png", headers={"Cache-Control": "no-store"})

    @api.get("/", response_class=HTMLResponse)
    def index():
        return _PAGE

    @api.get("/api/info")
    def info():
        return state.info()

    @api.get("/api/writers")
    def writers(
        q: Annotated[str, Query(max_length=200)] = "",
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
    ):
        return {"writers": state.find_writers(q, limit)}

    @api.get("/api/writer")
    def writer(writer: Writer):
        return state.writer(writer)

    @api.get("/api/real.png")
    def real(writer: Writer, label: int, n: int = 8):
        return png(state.real_png(writer, label, n))

    @api.get("/api/generate.png")
    def generate(writer: Writer, label: int, n: int = 16, seed: Seed = 0):
        return png(state.generate_png(writer, label, n, seed))

    @api.post("/api/fill-new")
    async def fill_new(
        files: Annotated[list[UploadFile], File()],
        labels: Annotated[str, Form(max_length=2000)],
        n: Annotated[int, Form()] = 8,
        seed: Annotated[int, Form(ge=0, le=2**31 - 1)] = 0,
    ):
        if len(files) > MAX_FILES:
            raise BadRequest(413, f"at most {MAX_FILES} images per request")
        raws = []
        for f in files:
            raw = await f.read(MAX_UPLOAD_BYTES + 1)
            if len(raw) > MAX_UPLOAD_BYTES:
                raise BadRequest(413, f"{f.filename!r} is over {MAX_UPLOAD_BYTES:,} bytes")
            raws.append(raw)
        try:
            label_list = [int(v) for v in labels.replace(" ", "").split(",") if v]
        except ValueError:
            raise BadRequest(400, "labels: a comma-separated list of label ids") from None
        return state.fill_new(raws, label_list, n, seed)

    return api


class LiveServer:
    """`with LiveServer(app) as base_url:` the app on a free loopback port, in a thread (for
    tests, benchmarks and screenshots)."""

    def __init__(self, app, host: str = "127.0.0.1"):
        import socket

        import uvicorn

        with socket.socket() as s:
            s.bind((host, 0))
            self.port = s.getsockname()[1]
        self.host = host
        config = uvicorn.Config(app, host=host, port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        import time

        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline and self.thread.is_alive():
            time.sleep(0.05)
        if not self.server.started:
            raise RuntimeError("the server did not start")
        return f"http://{self.host}:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def load_test(urls: list[str], concurrency: int = 8, timeout: float = 60) -> dict:
    """GET every url, `concurrency` at a time: the count of errors (anything but a 200 PNG or
    JSON) and the latency percentiles in ms."""
    import statistics
    import time
    import urllib.error
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    def get(url):
        start = time.perf_counter()
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                ok = r.status == 200 and len(r.read()) > 0
        except (urllib.error.URLError, OSError):
            ok = False
        return ok, (time.perf_counter() - start) * 1000

    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(get, urls))
    ms = sorted(t for _, t in results)
    q = statistics.quantiles(ms, n=100) if len(ms) > 1 else ms * 99
    return {"requests": len(urls), "errors": sum(not ok for ok, _ in results), "p50": q[49],
            "p95": q[94], "p99": q[98], "max": ms[-1]}  # fmt: skip


def serve(run: Path, data: str | None, host: str, port: int, device: torch.device) -> None:
    import uvicorn

    app = create_app(run, data, device)
    print(f"inkfill serve: {run} on http://{host}:{port}/ (Ctrl-C stops)")
    uvicorn.run(app, host=host, port=port, log_level="warning")


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>inkfill</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1100px; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 1.4em; }
label { margin-right: 1em; } input[type=number] { width: 5em; }
#error { color: #c92a2a; min-height: 1.4em; }
.cellbox { display: inline-block; margin: 0 12px 12px 0; vertical-align: top; }
.cellbox div { font-size: 12px; color: #555; }
img { image-rendering: pixelated; border: 1px solid #ddd; }
#generated { border-color: #f08c00; }
.muted { color: #777; }
</style></head><body>
<h1>inkfill <span id="title" class="muted"></span></h1>
<div id="error" role="alert"></div>
<h2>A writer of the run</h2>
<p>
<label>writer <input id="writer" list="writer-list" size="18" autocomplete="off"></label>
<datalist id="writer-list"></datalist>
<label>label <select id="label"></select></label>
<label>n <input id="n" type="number" value="16" min="1"></label>
<label>seed <input id="seed" type="number" value="0" min="0"></label>
<button id="generate">Generate</button>
</p>
<p id="cells-info" class="muted"></p>
<div><div class="cellbox"><div id="generated-caption">generated</div>
<img id="generated" alt="generated images"></div></div>
<h2>Real cells of this writer</h2>
<div id="real"></div>
<div id="new-writer">
<h2>A new writer: upload a few images, fill the missing labels</h2>
<p><input id="files" type="file" accept="image/*" multiple>
<label>their labels, in order <input id="file-labels" placeholder="e.g. 0,3,7" size="14"></label>
<button id="fill-new">Fill missing labels</button></p>
<div id="new-results"></div>
</div>
<script>
const $ = (id) => document.getElementById(id);
let INFO = null;
function showError(msg) { $("error").textContent = msg || ""; }
async function getJSON(url, opts) {
  const r = await fetch(url, opts);
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || ("HTTP " + r.status));
  return body;
}
function loadImg(img, url) {
  return fetch(url).then(async (r) => {
    if (!r.ok) throw new Error((await r.json()).error);
    img.src = URL.createObjectURL(await r.blob());
  });
}
async function showWriter() {
  const w = $("writer").value.trim();
  if (!w) return;
  try {
    const info = await getJSON("/api/writer?writer=" + encodeURIComponent(w));
    showError("");
    $("cells-info").textContent = "real labels: " + info.observed.join(", ") +
      " | empty (to fill): " + (info.empty.join(", ") || "none");
    const box = $("real"); box.innerHTML = "";
    for (const lab of info.observed) {
      const d = document.createElement("div"); d.className = "cellbox";
      const cap = document.createElement("div"); cap.textContent = "label " + lab;
      const img = document.createElement("img"); img.className = "real";
      d.appendChild(cap); d.appendChild(img); box.appendChild(d);
      loadImg(img, "/api/real.png?n=8&writer=" + encodeURIComponent(w) + "&label=" + lab);
    }
  } catch (e) { showError(e.message); }
}
async function generate() {
  const w = $("writer").value.trim(), lab = $("label").value;
  const url = "/api/generate.png?writer=" + encodeURIComponent(w) + "&label=" + lab +
    "&n=" + $("n").value + "&seed=" + $("seed").value;
  try {
    await loadImg($("generated"), url);
    $("generated-caption").textContent = "generated: writer " + w + ", label " + lab +
      ", seed " + $("seed").value;
    showError("");
  } catch (e) { showError(e.message); }
}
async function fillNew() {
  const fd = new FormData();
  for (const f of $("files").files) fd.append("files", f);
  fd.append("labels", $("file-labels").value);
  fd.append("n", $("n").value); fd.append("seed", $("seed").value);
  try {
    const out = await getJSON("/api/fill-new", {method: "POST", body: fd});
    const box = $("new-results"); box.innerHTML = "";
    for (const [lab, src] of Object.entries(out.filled)) {
      const d = document.createElement("div"); d.className = "cellbox";
      d.innerHTML = "<div>label " + lab + "</div>";
      const img = document.createElement("img"); img.className = "new"; img.src = src;
      d.appendChild(img); box.appendChild(d);
    }
    showError("");
  } catch (e) { showError(e.message); }
}
async function init() {
  INFO = await getJSON("/api/info");
  $("title").textContent = INFO.method + " - " + INFO.run + " (" + INFO.writers + " writers)";
  $("n").max = INFO.max_n;
  INFO.labels.forEach((v, i) => {
    const o = document.createElement("option"); o.value = v; o.textContent = INFO.label_names[i];
    $("label").appendChild(o);
  });
  if (!INFO.can_reference) $("new-writer").style.display = "none";
  const ws = await getJSON("/api/writers?limit=200");
  for (const w of ws.writers) {
    const o = document.createElement("option"); o.value = w; $("writer-list").appendChild(o);
  }
  $("writer").value = ws.writers[0] || "";
  $("writer").addEventListener("change", showWriter);
  $("generate").addEventListener("click", generate);
  $("fill-new").addEventListener("click", fillNew);
  await showWriter();
  document.body.dataset.ready = "1";
}
init().catch((e) => showError(e.message));
</script>
</body></html>
"""
