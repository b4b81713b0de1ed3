"""Stage "report": report.json, report.md, report.html and preview.png in the run folder."""
from __future__ import annotations

import hashlib

import torch

from edc_ray.config import Config, dump_config
from edc_ray.pipeline.report_page import png_bytes, preview_grid, write_html_report
from edc_ray.storage import fsio
from edc_ray.storage.run_folder import RunFolder


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
    """Write the report files (preview, report.md, report.html; report.json last, as the completion marker)."""
    fsio.atomic_write_bytes(run.path("preview.png"), png_bytes(preview_grid(images, labels)))
    run.write_text(markdown(report), "report.md")
    write_html_report(run, report)
    run.write_json(report, "report.json")
