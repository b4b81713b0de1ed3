"""The `edc-ray` command (installed by `pip install`): one subcommand per job.

    edc-ray condense                     # the embedded demo
    edc-ray condense --config configs/fashion-mnist/edc_ipc10.yaml --set synthesis.iterations=200
    edc-ray prepare --source idx --src ../shared/data/fashion-mnist --out data/fashion-mnist
    edc-ray evaluate --images runs/demo/export/images
    edc-ray benchmark --grid configs/benchmark/small.yaml
    edc-ray report runs/demo

`edc-ray <command> --help` lists its options (and the config keys it takes). `jobs/<command>.py` runs
the same code, for `ray job submit -- python jobs/condense.py ...`.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {  # name -> what it does (its module is edc_ray.commands.<name>)
    "condense": "condense a dataset: observers, statistics, synthesis, evaluation, report",
    "prepare": "convert an image source into WebDataset shards + _info.json",
    "evaluate": "evaluate a distilled ImageFolder made by any tool with edc-ray's protocol",
    "benchmark": "run a benchmark grid and write its results tables",
    "report": "show (and rewrite) the report of a finished run folder",
}


def usage() -> str:
    """The top-level help: the commands."""
    width = max(map(len, COMMANDS))
    return "usage: edc-ray <command> [options]\n\ncommands:\n" + "\n".join(
        f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()) + \
        "\n\n`edc-ray <command> --help` lists a command's options."


def main(argv: list[str] | None = None) -> int:
    """Run `edc-ray <command> ...`; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"edc-ray: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return importlib.import_module(f"edc_ray.commands.{argv[0]}").main(argv[1:])
