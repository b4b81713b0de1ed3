"""report.html: one self-contained page (images embedded) of a finished run, built from report.json and
the run folder's shards; and a grid's page (its tables and every cell's images).

Per class shown: the real initial images, the distilled images and the random real subset side by side,
upscaled; the learning curves (top-1 against epoch, mean over seeds) of every evaluated set; the accuracy
table (+- over seeds); the observers' full-data accuracy; stage times; the resolved config.
"""
from __future__ import annotations

import base64
import html
import io
import re

import numpy as np
import torch
from PIL import Image

from edc_ray.pipeline.common import PREVIEW_CLASSES
from edc_ray.storage import fsio
from edc_ray.storage.run_folder import RunFolder
from edc_ray.storage.shards import iter_samples

SET_TITLES = {"initial": "real initial images", "distilled": "distilled", "random": "random real subset"}
TILE_PX = 96  # every image is shown at least this tall (nearest-neighbour upscaling)
STYLE = ("body{font-family:sans-serif;margin:2em;max-width:110em}table{border-collapse:collapse;margin:1em 0}"
         "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:middle}"
         "pre{background:#f6f6f6;padding:1em;overflow:auto}")


def preview_grid(images: torch.Tensor, labels: torch.Tensor, max_per_class: int = 10,
                 max_classes: int = PREVIEW_CLASSES, pad: int = 1) -> np.ndarray:
    """One row per class (up to `max_classes`), its first `max_per_class` images: uint8 HxWx3."""
    classes = torch.unique(labels).tolist()[:max_classes]
    max_per_class = min(max_per_class, int(torch.bincount(labels).max()))
    _, c, h, w = images.shape
    grid = np.full((len(classes) * (h + pad) + pad, max_per_class * (w + pad) + pad, 3), 255, np.uint8)
    for row, cls in enumerate(classes):
        for col, image in enumerate(images[labels == cls][:max_per_class]):
            tile = image.permute(1, 2, 0).numpy()
            tile = np.repeat(tile, 3, axis=2) if c == 1 else tile
            y, x = pad + row * (h + pad), pad + col * (w + pad)
            grid[y:y + h, x:x + w] = tile
    return grid


def png_bytes(grid: np.ndarray, long_side: int = 512) -> bytes:
    """PNG of the grid, upscaled (nearest) towards `long_side` so that small images stay visible."""
    image = Image.fromarray(grid)
    scale = max(1, long_side // max(image.size))
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def shown_sets(run: RunFolder, shown: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images, labels) of the shown units of each set the run folder has, by set name."""
    sets = {}
    for name, folder in shown["folders"].items():
        urls = [run.unit_shard(u, folder) for u in range(shown["units"])]
        urls = [u for u in urls if fsio.exists(u)]
        if urls:
            samples = list(iter_samples(urls))
            sets[name] = (torch.stack([s[1] for s in samples]), torch.tensor([s[2] for s in samples]))
    return sets


def class_strip(images: torch.Tensor, labels: torch.Tensor, cls: int, per_class: int) -> str:
    """An <img> of one class's images in one row, upscaled to at least `TILE_PX` tall ('' if none)."""
    mine = labels == cls
    if not bool(mine.any()):
        return ""
    grid = preview_grid(images[mine], labels[mine], max_per_class=per_class, max_classes=1)
    scale = max(1, -(-TILE_PX // images.shape[-1]))
    return (f'<img alt="class {cls}" src="{_data_uri(png_bytes(grid, long_side=scale * max(grid.shape[:2])))}" '
            'style="image-rendering: pixelated">')


def curves_png(evaluation: list[dict]) -> bytes | None:
    """Top-1 against epoch (mean over the seeds that share epochs) per (set, student); None without curves."""
    import matplotlib

    matplotlib.use("Agg")  # no display; also safe in Ray workers and CI
    from matplotlib import pyplot as plt

    lines = []
    for row in evaluation:
        curves = [seed.get("curve") for seed in row["per_seed"]]
        if not curves or not all(curves) or len({tuple(e for e, _ in c) for c in curves}) != 1:
            continue
        epochs = [e for e, _ in curves[0]]
        mean = np.mean([[t for _, t in c] for c in curves], axis=0)
        lines.append((f"{row['set']} / {row['student']}", epochs, mean))
    if not lines:
        return None
    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    for label, epochs, mean in lines:
        axes.plot(epochs, mean, marker="o", label=label)
    axes.set_xlabel("epoch")
    axes.set_ylabel("top-1 (%), mean over seeds")
    axes.grid(alpha=0.3)
    axes.legend()
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def _table(header: list[str], rows: list[list[str]], table_id: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def accuracy_rows(report: dict) -> list[list[str]]:
    """The accuracy table's rows, as report.md shows them."""
    return [[row["student"], row["set"], str(row["images"]), str(row["epochs"]), str(len(row["per_seed"])),
             f"{row['final_top1']:.2f} ± {row['final_top1_std']:.2f}", f"{row['best_top1']:.2f}"]
            for row in report["evaluation"]]


def html_page(report: dict, sets: dict[str, tuple[torch.Tensor, torch.Tensor]], config_text: str) -> str:
    """The whole page as text."""
    title = f"edc-ray report: {report['dataset']} / {report['method']} / IPC {report['ipc']}"
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p>run <code>{html.escape(report['run_dir'])}</code>, protocol {html.escape(report['protocol'])}, "
             f"config hash <code>{report['config_hash']}</code></p>",
             "<h2>Accuracy (top-1 %, real test set, EMA student)</h2>",
             _table(["student", "set", "images", "epochs", "seeds", "final (mean ± std)", "best (mean)"],
                    accuracy_rows(report), "accuracy")]
    curves = curves_png(report["evaluation"])
    if curves is not None:
        parts += ["<h2>Learning curves</h2>", f'<img id="curves" alt="learning curves" src="{_data_uri(curves)}">']
    order = [name for name in SET_TITLES if name in sets]
    names = report["shown"]["classes"]
    parts += ["<h2>Images per class</h2>", '<table id="images"><thead><tr><th>class</th>' +
              "".join(f"<th>{SET_TITLES[n]}</th>" for n in order) + "</tr></thead><tbody>"]
    for cls, name in enumerate(names):
        cells = "".join(f"<td>{class_strip(*sets[n], cls, report['ipc'])}</td>" for n in order)
        parts.append(f"<tr><th>{html.escape(name)}</th>{cells}</tr>")
    parts.append("</tbody></table>")
    parts += ["<h2>Observers (full-data test top-1 %)</h2>",
              _table(["observer", "arch", "test top-1"],
                     [[o["name"], o["arch"], "-" if o.get("top1") is None else f"{o['top1']:.2f}"]
                      for o in report["observers"]], "observers"),
              "<h2>Stage wall time (s)</h2>",
              _table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in report["stage_seconds"].items()], "stages"),
              "<h2>Resolved config</h2>", f"<pre>{html.escape(config_text)}</pre>"]
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>\n")


def write_html_report(run: RunFolder, report: dict) -> str:
    """Write report.html into the run folder from report.json's content and its shards; returns its URL."""
    config_text = fsio.read_bytes(run.path("config.yaml")).decode() if run.exists("config.yaml") else ""
    page = html_page(report, shown_sets(run, report["shown"]), config_text)
    run.write_text(page, "report.html")
    return run.path("report.html")


def markdown_to_html(text: str) -> str:
    """The grid's markdown (pipe tables and paragraphs, `**bold**`, `code`) as HTML."""
    def inline(cell: str) -> str:
        out = html.escape(cell.strip())
        out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
        return re.sub(r"`(.+?)`", r"<code>\1</code>", out)

    parts, table = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cells = line.strip().strip("|").split("|")
            if not all(set(c.strip()) <= {"-", ":"} for c in cells):  # (the header's separator row)
                table.append(cells)
            continue
        if table:
            head, *body = table
            parts.append("<table><thead><tr>" + "".join(f"<th>{inline(c)}</th>" for c in head) + "</tr></thead>"
                         "<tbody>" + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row) + "</tr>"
                                            for row in body) + "</tbody></table>")
            table = []
        if line.strip():
            parts.append(f"<p>{inline(line)}</p>")
    return "".join(parts)


def grid_page(title: str, tables_markdown: str, rows: list[dict]) -> str:
    """A grid's page: its tables, then every finished cell's distilled images (its preview.png)."""
    gallery = []
    for r in rows:
        preview = fsio.join(r["run_dir"], "preview.png")
        if fsio.exists(preview):
            caption = html.escape(f"{r['dataset']} / {r['method']} / IPC {r['ipc']}"
                                  + (f" / {r['variant']}" if r["variant"] else ""))
            gallery.append(f'<figure><img alt="{caption}" src="{_data_uri(fsio.read_bytes(preview))}" '
                           f'style="image-rendering: pixelated"><figcaption>{caption}</figcaption></figure>')
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE} figure{{display:inline-block;margin:1em}}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>{markdown_to_html(tables_markdown)}"
            f"<h2>Distilled images per cell</h2>{''.join(gallery)}</body></html>\n")
