"""What the commands share: the `--config` / `--set` arguments, the config keys for `--help`, and
loading the config with clear errors."""
from __future__ import annotations

import argparse
import os
import pickle
import sys
from typing import Callable, TypeVar

from botocore.exceptions import BotoCoreError

from edc_ray.config import Config, ConfigError, load_config
from edc_ray.errors import ClusterError, DataError
from edc_ray.models.external import PretrainedWeightsError
from edc_ray.storage.lease import RunFolderBusy
from edc_ray.storage.shards import ShardReadError

T = TypeVar("T")
# Wrong input, not a bug: printed as one line (no traceback) and the job exits 2.
USER_ERRORS = (ConfigError, DataError, ClusterError, RunFolderBusy, ShardReadError, PretrainedWeightsError,
               pickle.UnpicklingError, FileNotFoundError, PermissionError)

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "presets", "demo.yaml")  # installed with it


def config_keys_help() -> str:
    """Every config key `--set` takes, with its default (the method's preset may change it), by section."""
    from edc_ray.config import Config, flat_config

    lines = ["config keys (--set KEY=VALUE; the value is YAML; defaults before the method's preset):"]
    current = ""
    for key, value in flat_config(Config()).items():
        section = key.rpartition(".")[0]
        if section and section != current:
            lines.append(f"  {section}:")
            current = section
        lines.append(f"{'    ' if section else '  '}{key} = {value!r}")
    return "\n".join(lines)


def command_parser(prog: str, description: str, config_keys: bool = True) -> argparse.ArgumentParser:
    """An `edc-ray <command>` parser; with `config_keys` its --help ends with every config key."""
    return argparse.ArgumentParser(prog=prog, description=description,
                                   epilog=config_keys_help() if config_keys else None,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """`--config` (default: the embedded demo) and repeatable `--set KEY=VALUE` overrides."""
    parser.add_argument("--config", default=DEMO_CONFIG,
                        help="YAML config (default: the embedded demo, edc_ray/presets/demo.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set synthesis.iterations=200 (repeatable)")
    parser.add_argument("--break-lease", action="store_true",
                        help="take over the run folder from a driver that is gone (see its lease message)")
    add_verbose_argument(parser)


def add_verbose_argument(parser: argparse.ArgumentParser) -> None:
    """`--verbose`: Ray's own log lines (workers' output, Ray Train's) in the terminal too."""
    parser.add_argument("--verbose", action="store_true",
                        help="also show Ray's own log lines (by default they stay in Ray's log files)")


def config_from_arguments(args: argparse.Namespace) -> Config | None:
    """The validated config, or None after printing the error (the job then exits with status 2)."""
    return run_job(lambda: load_config(args.config, args.overrides))


def run_job(work: Callable[[], T]) -> T | None:
    """`work()`, or None after printing a user error (`USER_ERRORS`) as `error: ...`."""
    try:
        return work()
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
    except BotoCoreError as err:  # no S3 endpoint, no credentials: the environment, not the code
        print(f"error: S3 is not reachable with this environment's AWS settings: {err}", file=sys.stderr)
    return None
