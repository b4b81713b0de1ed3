"""Stage "report": report.json, report.md and preview.png in the run folder."""
from __future__ import annotations

import hashlib
import io

import numpy as np
import torch
from PIL import Image

from edc_ray.config import Config, dump_config
from edc_ray.storage import fsio
from edc_ray.storage.run_folder import RunFolder


PREVIEW_CLASSES = 20  # rows of preview.png


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


def config_hash(cfg: Config) -> str:
    """A short hash of the resolved config."""
    return hashlib.sha256(dump_config(cfg).encode()).hexdigest()[:12]


def markdown(report: dict) -> str:
    """A human-readable summary of `report.json`."""
    lines = [f"# edc-ray report: {report['dataset']} / {report['method']} / IPC {report['ipc']}", "",
             f"run `{report['run_dir']}`, config hash `{report['config_hash']}`", "",
             "## Evaluation (top-1 %, real test set, EMA student)", "",
             "| student | set | images | epochs | seeds | final (mean +- std) | best (mean) |",
             "|---|---|---|---|---|---|---|"]
    for row in report["evaluation"]:
        lines.append(f"| {row['student']} | {row['set']} | {row['images']} | {row['epochs']} | "
                     f"{len(row['per_seed'])} | {row['final_top1']:.2f} +- {row['final_top1_std']:.2f} | "
                     f"{row['best_top1']:.2f} |")
    lines += ["", "## Observers (full-data baseline)", "", "| observer | arch | test top-1 |", "|---|---|---|"]
    for obs in report["observers"]:
        top1 = "-" if obs.get("top1") is None else f"{obs['top1']:.2f}"
        lines.append(f"| {obs['name']} | {obs['arch']} | {top1} |")
    lines += ["", "## Stage wall time (s)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in report["stage_seconds"].items()]
    synth = report["synthesis"]
    lines += ["", f"Synthesis: {synth['images']} images in {synth['seconds']:.1f} s "
              f"({synth['images_per_s']:.2f} images/s) on {len(synth['workers'])} actors "
              f"({', '.join(w['name'] for w in synth['workers'])}).", ""]
    return "\n".join(lines)


def write_report(run: RunFolder, report: dict, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Write the three report files (preview first; report.json last, as the completion marker)."""
    fsio.atomic_write_bytes(run.path("preview.png"), png_bytes(preview_grid(images, labels)))
    run.write_text(markdown(report), "report.md")
    run.write_json(report, "report.json")
