"""`edc-ray benchmark`: run a benchmark grid (datasets x methods x IPC x variants, students and seeds per cell) and write
the results table: `<output>/<grid name>.md` and `.json`, with the published numbers beside ours.

    edc-ray benchmark --grid configs/benchmark/small.yaml                      # the whole grid
    edc-ray benchmark --grid configs/benchmark/small.yaml --datasets mnist     # a part
    edc-ray benchmark --grid configs/benchmark/small.yaml --table-only         # merge the parts

Cells already finished (their report.json exists) are skipped, so an interrupted grid resumes, and
parts run in separate processes merge into one table. Observers and statistics are computed once per
dataset and reused by every cell.
"""
from __future__ import annotations

import sys

from edc_ray.pipeline.grid import cell_config, cells, check_not_stale, load_grid, run_cell, write_tables
from edc_ray.cli import add_verbose_argument, command_parser
from edc_ray.config import ConfigError
from edc_ray.pipeline.run import start_ray
from edc_ray.storage import fsio


def main(argv: list[str] | None = None) -> int:
    """Run the cells of `--grid` not finished yet, then print its table; returns the exit status."""
    parser = command_parser("edc-ray benchmark", "Run a dataset-condensation benchmark grid. A grid's `set`, "
                            "`per_ipc` and `variants` take the config keys below.")
    parser.add_argument("--grid", required=True, help="grid YAML, e.g. configs/benchmark/small.yaml")
    parser.add_argument("--datasets", nargs="*", help="only these datasets of the grid")
    parser.add_argument("--methods", nargs="*", help="only these methods")
    parser.add_argument("--ipc", nargs="*", type=int, help="only these IPC values")
    parser.add_argument("--variants", nargs="*", help="only these variants")
    parser.add_argument("--table-only", action="store_true", help="only rebuild the tables")
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    try:
        grid = load_grid(args.grid)
        todo = [] if args.table_only else cells(grid, args.datasets, args.methods, args.ipc, args.variants)
        configs = [cell_config(grid, cell) for cell in todo]  # every cell's config is valid before work
        for cell, cfg in zip(todo, configs):
            check_not_stale(cfg, cell)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if todo:
        start_ray(configs[0], args.verbose)  # one Ray instance for every cell
    for n, (cell, cfg) in enumerate(zip(todo, configs), 1):
        print(f"[benchmark] cell {n}/{len(todo)}: {cell.dataset} {cell.name}", flush=True)
        run_cell(grid, cell, cfg)
        write_tables(grid)  # the table grows as cells finish
    md, _ = write_tables(grid)
    print(fsio.read_bytes(md).decode())
    return 0

