"""What the job scripts share: the `--config` / `--set` arguments and loading them with clear errors."""
from __future__ import annotations

import argparse
import os
import sys

from edc_ray.config import Config, ConfigError, load_config

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.yaml")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """`--config` (default: configs/demo.yaml) and repeatable `--set KEY=VALUE` overrides."""
    parser.add_argument("--config", default=DEMO_CONFIG, help="YAML config (default: configs/demo.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set synthesis.iterations=200 (repeatable)")


def config_from_arguments(args: argparse.Namespace) -> Config | None:
    """The validated config, or None after printing the error (the job then exits with status 2)."""
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return None
