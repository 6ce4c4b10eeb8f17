"""`inkfill report`: one self-contained static HTML page for a run, opened from disk.

DIR/index.html shows the writers x labels matrix (real cells and filled cells told apart at a
glance, searchable by writer, paged), the run's metrics, its figures (real vs generated grids,
loss curves) and, when the run came from `inkfill bench`, the bench table. The matrix is drawn as
one sprite image per page of writers (DIR/matrix/page_NNNN.png), so thousands of writers stay a
few MB and the page needs no server and no network.
"""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from .config import LABEL_CHARS, InkfillError
from .methods import load_run, load_run_data
from .methods.base import CONFIG_FILE, read_json

TILE = 28


def _markdown_table(text: str) -> str:
    """The first pipe table of a markdown text as an HTML table (bench results.md)."""
    rows = [line.strip() for line in text.splitlines() if line.strip().startswith("|")]
    if len(rows) < 2:
        return ""
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows if "---" not in r]
    head, body = cells[0], cells[1:]
    out = ["<table class='data'><thead><tr>"]
    out += [f"<th>{html.escape(h)}</th>" for h in head]
    out.append("</tr></thead><tbody>")
    for row in body:
        out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _flat_metrics(metrics: dict, prefix: str = "") -> list[tuple[str, str]]:
    """Scalars of a nested metrics dict as (dotted key, value) pairs; long lists are skipped."""
    out = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out += _flat_metrics(value, name + ".")
        elif isinstance(value, float):
            out.append((name, f"{value:.4g}"))
        elif isinstance(value, int | str | bool):
            out.append((name, str(value)))
    return out


def _find_bench(run: Path) -> Path | None:
    """A bench directory holds runs/<method>/ beside results.md."""
    candidate = run.resolve().parent.parent
    if run.resolve().parent.name == "runs" and (candidate / "results.md").exists():
        return candidate
    return None


def write_report(
    run: Path,
    out: Path,
    data: str | None = None,
    bench: Path | None = None,
    per_page: int = 50,
    seed: int = 0,
) -> dict:
    """Write the report of `run` into the (new, empty) directory `out`; returns a summary."""
    if per_page < 1:
        raise InkfillError("--per-page must be at least 1")
    method = load_run(run)
    config = read_json(run / CONFIG_FILE)
    info = method.matrix_
    dataset = load_run_data(run, method, data)

    writers = [str(w) for w in info.writer_ids]
    row_of = {w: r for r, w in enumerate(writers)}
    col_of = {int(v): c for c, v in enumerate(info.label_ids)}
    n_w, n_l = len(writers), len(col_of)
    observed = info.counts > 0
    # One real image per observed cell: the first of the writer's images of that label.
    real_first = np.full((n_w, n_l), -1, dtype=np.int64)
    for i in range(len(dataset) - 1, -1, -1):  # backwards, so the first one wins
        r, c = row_of.get(str(dataset.writers[i])), col_of.get(int(dataset.labels[i]))
        if r is not None and c is not None and observed[r, c]:
            real_first[r, c] = i
    empty = [(w, int(info.label_ids[c])) for r, w in enumerate(writers) for c in range(n_l)
             if not observed[r, c]]  # fmt: skip
    filled = method.generate_cells(empty, 1, seed) if empty else []
    fill_of = {cell: images[0] for cell, images in zip(empty, filled)}

    (out / "matrix").mkdir(parents=True)
    kinds = []
    for page, start in enumerate(range(0, n_w, per_page)):
        rows = range(start, min(start + per_page, n_w))
        sheet = np.zeros((len(rows) * TILE, n_l * TILE), np.uint8)
        for k, r in enumerate(rows):
            kind = []
            for c in range(n_l):
                if observed[r, c] and real_first[r, c] >= 0:
                    tile, mark = dataset.images[real_first[r, c]], "R"
                elif observed[r, c]:
                    tile, mark = None, "R"  # observed, but not in the given data file
                else:
                    tile, mark = fill_of[(writers[r], int(info.label_ids[c]))], "F"
                if tile is not None:
                    sheet[k * TILE : (k + 1) * TILE, c * TILE : (c + 1) * TILE] = tile
                kind.append(mark)
            kinds.append("".join(kind))
        Image.fromarray(255 - sheet).save(out / "matrix" / f"page_{page:04d}.png", optimize=True)

    figures = []
    fig_dir = run / "figures"
    if fig_dir.is_dir():
        for path in sorted(fig_dir.rglob("*.png"))[:80]:
            rel = path.relative_to(fig_dir)
            target = out / "figures" / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            figures.append(str(Path("figures") / rel))
    if not any("loss" in f for f in figures) and getattr(method, "history_", None):
        from .plots import save_loss_curves

        (out / "figures").mkdir(exist_ok=True)
        save_loss_curves(method.history_, out / "figures" / "losses.png", f"{method.name} losses")
        figures.insert(0, "figures/losses.png")

    metrics = {}
    if (run / "metrics.json").exists():
        metrics = read_json(run / "metrics.json")
    bench = bench or _find_bench(run)
    bench_html = ""
    if bench is not None:
        if not (bench / "results.md").exists():
            raise InkfillError(f"{bench}: no results.md (not an inkfill bench directory)")
        bench_html = _markdown_table((bench / "results.md").read_text())

    label_names = [LABEL_CHARS[int(v)] if int(v) < len(LABEL_CHARS) else str(v)
                   for v in info.label_ids]  # fmt: skip
    payload = {"writers": writers, "kinds": kinds, "labels": label_names, "perPage": per_page,
               "tile": TILE}  # fmt: skip
    n_filled = len(empty)
    summary = {
        "method": method.name,
        "writers": n_w,
        "labels": n_l,
        "real_cells": int(observed.sum()),
        "filled_cells": n_filled,
        "pages": (n_w + per_page - 1) // per_page,
        "figures": len(figures),
        "bench": bench is not None,
    }
    page = _PAGE.format(
        title=html.escape(f"inkfill report: {method.name} ({run.name})"),
        heading=html.escape(f"{method.name} - {run.name}"),
        summary=html.escape(
            f"{n_w:,} writers x {n_l} labels: {summary['real_cells']:,} real cells, "
            f"{n_filled:,} filled by {method.name} (one image each, seed {seed})"
        ),
        params="".join(
            f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
            for k, v in config.get("params", {}).items()
        ),
        metrics="".join(
            f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>"
            for k, v in _flat_metrics(metrics)[:200]
        )
        or "<tr><td colspan=2>no metrics.json in this run</td></tr>",
        bench=bench_html or "<p class='muted'>no bench results for this run</p>",
        figures="".join(
            f"<figure><img src='{html.escape(f)}' loading='lazy'><figcaption>{html.escape(f)}"
            "</figcaption></figure>"
            for f in figures
        )
        or "<p class='muted'>no figures in this run</p>",
        data=json.dumps(payload).replace("</", "<\\/"),
    )
    (out / "index.html").write_text(page)
    return summary


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }}
h1 {{ font-size: 1.4em; }} h2 {{ font-size: 1.15em; margin-top: 1.6em; }}
.muted {{ color: #777; }}
table.data {{ border-collapse: collapse; }}
table.data td, table.data th {{ border: 1px solid #ddd; padding: 2px 8px; text-align: right; }}
table.data td:first-child, table.data th:first-child {{ text-align: left; }}
#matrix {{ border-collapse: collapse; }}
#matrix td {{ padding: 1px; }} #matrix th {{ font-weight: normal; color: #555; }}
#matrix td.writer {{ font-family: monospace; font-size: 12px; padding-right: 6px; }}
.cell {{ width: 28px; height: 28px; image-rendering: pixelated; box-sizing: content-box; }}
.cell.R {{ border: 2px solid #9aa3ad; }}
.cell.F {{ border: 2px solid #f08c00; background-color: #fff4e6; }}
.key span {{ display: inline-block; width: 12px; height: 12px; vertical-align: middle; }}
tr.hit td.writer {{ background: #ffe066; }}
figure {{ display: inline-block; margin: 0 1em 1em 0; vertical-align: top; }}
figure img {{ max-width: 420px; border: 1px solid #eee; }}
figcaption {{ font-size: 12px; color: #666; }}
#pager button {{ margin: 0 2px; }}
</style></head><body>
<h1>{heading}</h1>
<p>{summary}</p>
<p class="key"><span style="border:2px solid #9aa3ad"></span> real cell (one of the writer's
images) &nbsp; <span style="border:2px solid #f08c00;background:#fff4e6"></span> filled cell
(generated)</p>
<h2>Writers x labels</h2>
<div id="pager">
  <input id="search" placeholder="search writer id" size="24">
  <button id="prev">&larr;</button> <span id="pageinfo"></span> <button id="next">&rarr;</button>
</div>
<table id="matrix"></table>
<h2>Bench</h2>{bench}
<h2>Metrics</h2><table class="data">{metrics}</table>
<h2>Parameters</h2><table class="data">{params}</table>
<h2>Figures</h2>{figures}
<script>
const D = {data};
let page = 0, query = "";
const byId = (i) => document.getElementById(i);
function rowHtml(w) {{
  const p = Math.floor(w / D.perPage), r = w % D.perPage;
  const src = "matrix/page_" + String(p).padStart(4, "0") + ".png";
  let h = "<tr" + (query ? " class='hit'" : "") + "><td class='writer'>" +
    D.writers[w].replace(/[&<>]/g, (c) => ({{"&": "&amp;", "<": "&lt;", ">": "&gt;"}})[c]) +
    "</td>";
  for (let c = 0; c < D.labels.length; c++) {{
    const k = D.kinds[w][c];
    h += "<td><div class='cell " + k + "' title='" + (k === "F" ? "filled" : "real") +
      "' style=\\"background-image:url(" + src + ");background-position:" + (-c * D.tile) + "px " +
      (-r * D.tile) + "px\\"></div></td>";
  }}
  return h + "</tr>";
}}
function render() {{
  let rows = [];
  if (query) {{
    for (let w = 0; w < D.writers.length && rows.length < D.perPage; w++)
      if (D.writers[w].toLowerCase().includes(query)) rows.push(w);
    byId("pageinfo").textContent = rows.length + " matching writer(s)" +
      (rows.length === D.perPage ? " (first " + D.perPage + ")" : "");
  }} else {{
    const pages = Math.ceil(D.writers.length / D.perPage);
    page = Math.max(0, Math.min(page, pages - 1));
    for (let w = page * D.perPage; w < Math.min((page + 1) * D.perPage, D.writers.length); w++)
      rows.push(w);
    byId("pageinfo").textContent = "page " + (page + 1) + " of " + pages;
  }}
  let head = "<tr><th></th>" + D.labels.map((l) => "<th>" + l + "</th>").join("") + "</tr>";
  byId("matrix").innerHTML = head + rows.map(rowHtml).join("");
}}
byId("prev").onclick = () => {{ page--; render(); }};
byId("next").onclick = () => {{ page++; render(); }};
byId("search").oninput = (e) => {{ query = e.target.value.trim().toLowerCase(); render(); }};
render();
</script>
</body></html>
"""
