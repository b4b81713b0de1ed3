"""What the job scripts share: the `--config` / `--set` arguments and loading them with clear errors."""
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

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.yaml")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """`--config` (default: configs/demo.yaml) and repeatable `--set KEY=VALUE` overrides."""
    parser.add_argument("--config", default=DEMO_CONFIG, help="YAML config (default: configs/demo.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set synthesis.iterations=200 (repeatable)")
    parser.add_argument("--break-lease", action="store_true",
                        help="take over the run folder from a driver that is gone (see its lease message)")


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
