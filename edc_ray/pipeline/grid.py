"""The benchmark grid: datasets x methods x IPC x variants, each cell a full pipeline run with one
evaluation protocol and budget, observers and statistics reused across the cells of a dataset.

    grid = load_grid("configs/benchmark/small.yaml")
    for cell in cells(grid): run_cell(grid, cell, cell_config(grid, cell))
    write_tables(grid)          # <output>/small.md + small.json from every finished cell of the grid

A grid may be run in parts (filters on `cells`); the tables are built from every finished cell found
under the output folder, so parts merge by themselves.
"""
from __future__ import annotations

import copy
import fnmatch
import hashlib
import math
import time
from dataclasses import dataclass, field

import yaml

from edc_ray.config import Config, ConfigError, from_dict, load_config, to_dict
from edc_ray.pipeline.report_page import grid_page
from edc_ray.pipeline.resume import changed_keys, stored_config
from edc_ray.storage import fsio
from edc_ray.storage.run_folder import STAGE_MARKERS, RunFolder

# What is shared per kind (a run-folder stage, whose markers say it is complete): its folders, and how
# many markers make it complete (None: one per observer). Statistic sums and candidates are shared
# separately: a method that matches no statistics leaves only candidates, which later cells reuse.
SHARED = {"observers": (("observers",), None), "statistics": (("stats", "stats/classes"), 1),
          "candidates": (("candidates",), 1)}


@dataclass
class Grid:
    """A benchmark grid (see configs/benchmark/*.yaml for the documented keys)."""

    output: str
    datasets: dict[str, str]  # dataset name -> base config (data, observers, budget)
    methods: list[str] = field(default_factory=lambda: ["edc", "random", "sre2l", "gvbsm", "rded"])
    ipc: list[int] = field(default_factory=lambda: [1, 10, 50])
    students: list[str] = field(default_factory=lambda: ["convnet"])
    seeds: dict[str, list[int]] = field(default_factory=lambda: {"default": [0]})  # method -> seeds
    set: list[str] = field(default_factory=list)  # overrides for every cell
    per_ipc: dict[int, list[str]] = field(default_factory=dict)  # the IPC-dependent part of the budget
    # each method's own overrides (its budget, e.g. synthesis.iterations, which random and RDED fix to 0)
    per_method: dict[str, list[str]] = field(default_factory=dict)
    variants: dict[str, list[str]] = field(default_factory=lambda: {"": []})  # name -> overrides
    published: dict[str, dict[int, float]] = field(default_factory=dict)  # dataset -> ipc -> top-1
    published_source: str = ""
    name: str = ""  # the tables are <output>/<name>.md and .json (default: the grid file's name)


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    dataset: str
    method: str
    ipc: int
    variant: str = ""

    @property
    def name(self) -> str:
        """The cell's folder name under `<output>/<dataset>/`."""
        return f"{self.method}-ipc{self.ipc}" + (f"-{self.variant}" if self.variant else "")


def load_grid(path: str) -> Grid:
    """Read a grid YAML (unknown keys rejected, like the run config)."""
    data = yaml.safe_load(fsio.read_bytes(path)) or {}
    grid = from_dict(Grid, data)
    grid.name = grid.name or fsio.basename(path).rsplit(".", 1)[0]
    for method in grid.per_method:
        if method not in grid.methods:
            raise ConfigError(f"per_method: {method!r} is not one of the grid's methods ({', '.join(grid.methods)})")
    for name, base in grid.datasets.items():
        if not fsio.exists(base):
            raise ConfigError(f"datasets.{name}: base config {base!r} does not exist")
    return grid


def cells(grid: Grid, datasets=None, methods=None, ipcs=None, variants=None) -> list[Cell]:
    """The grid's cells, optionally restricted (None: all); cheap cells first within a dataset."""
    return [Cell(d, m, k, v) for d in grid.datasets for k in grid.ipc for v in grid.variants
            for m in grid.methods
            if (datasets is None or d in datasets) and (methods is None or m in methods)
            and (ipcs is None or k in ipcs) and (variants is None or v in variants)]


def cell_config(grid: Grid, cell: Cell) -> Config:
    """The cell's resolved config: base config, method and its overrides, IPC budget, variant, seeds, run
    folder."""
    seeds = grid.seeds.get(cell.method, grid.seeds.get("default", [0]))
    overrides = [f"method={cell.method}", f"synthesis.ipc={cell.ipc}", f"evaluation.seeds={seeds}",
                 f"evaluation.students={grid.students}", "evaluation.random_baseline=false",
                 f"output.run_dir={fsio.join(grid.output, cell.dataset, cell.name)}"]
    overrides += (grid.set + grid.per_method.get(cell.method, []) + grid.per_ipc.get(cell.ipc, [])
                  + grid.variants[cell.variant])
    return load_config(grid.datasets[cell.dataset], overrides)


def _digest(*parts: object) -> str:
    return hashlib.sha256(yaml.safe_dump([to_dict(p) if hasattr(p, "__dataclass_fields__") else p
                                          for p in parts]).encode()).hexdigest()[:10]


def shared_folders(grid: Grid, cfg: Config, dataset: str) -> dict[str, str]:
    """Where a dataset's observers and statistics are kept for reuse, keyed by what they depend on."""
    observers = _digest(cfg.data, cfg.observers, cfg.seed)
    every = list(range(len(cfg.observers.models)))
    score = cfg.init.score_observers
    scoring = [] if score is None or sorted(set(score)) == every else [score]  # all of them: the default's name
    statistics = _digest(observers, cfg.statistics, cfg.init.candidates_per_class, *scoring)
    root = fsio.join(grid.output, dataset, "shared")
    statistics_folder = fsio.join(root, f"statistics-{statistics}")
    return {"observers": fsio.join(root, f"observers-{observers}"), "statistics": statistics_folder,
            "candidates": statistics_folder}


def _copy_files(src: str, dst: str, last: str) -> None:
    """Copy the files directly in `src` into `dst` that `dst` lacks (atomic per file); the markers, the
    files matching the glob `last`, last."""
    names = sorted(fsio.list_files(src), key=lambda url: fnmatch.fnmatch(fsio.basename(url), last))
    for name in names:
        target = fsio.join(dst, fsio.basename(name))
        if not fsio.exists(target):
            fsio.atomic_write_bytes(target, fsio.read_bytes(name))


def share(folders: dict[str, str], run_dir: str, observers: int, direction: str) -> None:
    """`direction` "in": seed the run folder from the shared `folders`; "out": the reverse.

    The pipeline skips stages whose outputs exist, so a seeded cell reuses observers and statistics.
    Only complete stages are shared: observers when all `observers` json files exist, statistics and
    candidates when their `_complete.json` markers exist (copied last, so a torn copy is not complete).
    """
    for kind, (subdirs, needed) in SHARED.items():
        src_root, dst_root = (folders[kind], run_dir) if direction == "in" else (run_dir, folders[kind])
        if len(RunFolder(src_root).markers(kind)) < (needed or observers):
            continue
        pattern = STAGE_MARKERS[kind][1]
        for folder in reversed(subdirs):  # the folder holding the marker last
            _copy_files(fsio.join(src_root, folder), fsio.join(dst_root, folder), last=pattern)


def check_not_stale(cfg: Config, cell: Cell) -> None:
    """Refuse a cell folder that holds a run of another config (a changed preset, grid or budget).

    Configs compare as values, so keys added since with their defaults do not count as a change, nor
    do synthesis settings of cells that do not optimise (a changed `synthesis.flip` keeps random's cells).
    """
    from edc_ray.pipeline.run import absolute_paths

    previous = stored_config(RunFolder(cfg.output.run_dir))
    if previous is None:
        return
    resolved = copy.deepcopy(cfg)
    absolute_paths(resolved)  # as the pipeline writes config.yaml
    changed = changed_keys(previous, resolved)
    if changed:
        raise ConfigError(f"cell {cell.dataset}/{cell.name}: {cfg.output.run_dir} holds a run of another "
                          f"config (changed: {', '.join(changed)}); move that folder away to run it again")


def run_cell(grid: Grid, cell: Cell, cfg: Config) -> None:
    """Run one cell with its config `cell_config(grid, cell)`, unless its report exists already.

    A cell folder left by another config is refused (`check_not_stale`), never silently reused.
    """
    from edc_ray.pipeline.run import run_pipeline

    check_not_stale(cfg, cell)
    report_url = fsio.join(cfg.output.run_dir, "report.json")
    if fsio.exists(report_url):
        return
    folders, run_dir = shared_folders(grid, cfg, cell.dataset), cfg.output.run_dir
    share(folders, run_dir, len(cfg.observers.models), "in")
    start = time.perf_counter()
    report = run_pipeline(cfg)
    report["cell_seconds"] = time.perf_counter() - start
    fsio.atomic_write_json(report_url, report)
    share(folders, run_dir, len(cfg.observers.models), "out")


def result_row(cell: Cell, report: dict) -> dict:
    """The figures of one finished cell."""
    return {"dataset": cell.dataset, "method": cell.method, "ipc": cell.ipc, "variant": cell.variant,
            "students": {row["student"]: {k: row[k] for k in ("final_top1", "final_top1_std", "best_top1",
                                                             "epochs", "per_seed")}
                         for row in report["evaluation"] if row["set"] == "distilled"},
            "observers": {o["name"]: o.get("top1") for o in report["observers"]},
            "stage_seconds": report["stage_seconds"], "cell_seconds": report.get("cell_seconds"),
            "run_dir": report["run_dir"]}


def finished_rows(grid: Grid) -> list[dict]:
    """Result rows of every cell of the grid that has a report (whichever part ran it)."""
    rows = []
    for cell in cells(grid):
        url = fsio.join(grid.output, cell.dataset, cell.name, "report.json")
        if fsio.exists(url):
            rows.append(result_row(cell, fsio.read_json(url)))
    return rows


def _fmt(entry: dict | None) -> str:
    if entry is None:
        return "-"
    n = len(entry["per_seed"])
    return f"{entry['final_top1']:.2f} ± {entry['final_top1_std']:.2f} ({n})" if n > 1 else \
        f"{entry['final_top1']:.2f} (1)"


def markdown_tables(grid: Grid, rows: list[dict]) -> str:
    """Accuracy table (mean ± std over seeds, n seeds) with the published numbers, and wall times."""
    index = {(r["dataset"], r["ipc"], r["variant"], r["method"]): r for r in rows}
    budget = {k: " ".join(v) for k, v in grid.per_ipc.items()}
    lines = ["| dataset | IPC | variant | student | " + " | ".join(grid.methods) +
             " | published | EDC best of ours | EDC - published |",
             "|---|---|---|---|" + "---|" * (len(grid.methods) + 3)]
    for d in grid.datasets:
        for k in grid.ipc:
            for v in grid.variants:
                for s in grid.students:
                    entries = {m: index.get((d, k, v, m), {}).get("students", {}).get(s)
                               for m in grid.methods}
                    if not any(entries.values()):
                        continue
                    pub = grid.published.get(d, {}).get(k)
                    edc = entries.get("edc")
                    others = [e["final_top1"] for m, e in entries.items() if m != "edc" and e]
                    best = "-" if not edc or not others else (
                        "yes" if edc["final_top1"] > max(others) else "**no**")
                    gap = "-" if not edc or pub is None else f"{edc['final_top1'] - pub:+.2f}"
                    lines.append(f"| {d} | {k} | {v or '-'} | {s} | " +
                                 " | ".join(_fmt(entries[m]) for m in grid.methods) +
                                 f" | {pub if pub is not None else '-'} | {best} | {gap} |")
    lines += ["", "Wall time per cell (s: whole pipeline; observers/statistics are 0 where reused):", "",
              "| dataset | IPC | variant | method | observers | statistics | synthesis | evaluation | total |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        st = r["stage_seconds"]
        lines.append(f"| {r['dataset']} | {r['ipc']} | {r['variant'] or '-'} | {r['method']} | "
                     f"{st.get('observers', 0):.0f} | {st.get('statistics', 0):.0f} | "
                     f"{st.get('synthesis', 0):.0f} | {st.get('evaluation', 0):.0f} | "
                     f"{(r['cell_seconds'] or math.nan):.0f} |")
    full = {r["dataset"]: r["observers"] for r in rows}
    lines += ["", "Full data (the observers' test top-1, trained on the whole train split): " + "; ".join(
        f"{d}: " + ", ".join(f"{n} {t:.2f}" for n, t in obs.items() if t is not None)
        for d, obs in full.items())]
    if budget:
        lines += ["", "Per-IPC budget: " + "; ".join(f"IPC {k}: `{v}`" for k, v in budget.items())]
    if grid.published_source:
        lines += ["", f"Published: {grid.published_source}"]
    return "\n".join(lines) + "\n"


def write_tables(grid: Grid) -> tuple[str, str]:
    """Write `<output>/<name>.md`, `.html` (with every cell's images) and `.json` from every finished cell;
    returns the URLs of the markdown and the JSON."""
    rows = finished_rows(grid)
    md, page, js = (fsio.join(grid.output, f"{grid.name}.{ext}") for ext in ("md", "html", "json"))
    tables = markdown_tables(grid, rows)
    fsio.atomic_write_bytes(md, tables.encode())
    fsio.atomic_write_bytes(page, grid_page(f"edc-ray benchmark grid: {grid.name}", tables, rows).encode())
    fsio.atomic_write_json(js, {"grid": to_dict(grid), "cells": rows})
    return md, js

