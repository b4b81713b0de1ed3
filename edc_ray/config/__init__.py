"""One typed config for the whole pipeline: dataclasses loaded from YAML, CLI overrides on top.

    cfg = load_config("configs/fashion-mnist/edc_ipc10.yaml", overrides=["synthesis.iterations=200"])

Unknown keys, wrong types and out-of-range values raise `ConfigError` before any work starts; the
message names the dotted path, the bad value and what is allowed.

- `schema.py`: the sections (dataclasses), their defaults and their value checks;
- `typed.py`: plain data to dataclasses and back, with type checks;
- `layers.py`: the layers (defaults, presets, files with `base:`, overrides) and the method's fixed keys;
- `checks.py`: checks against the machine and the filesystem (resources, addresses, run folders).
"""
import typing

from edc_ray.config.checks import check_local_resources, run_dir_problem, valid_address
from edc_ray.config.layers import (apply_override, deep_merge, dump_config, load_config, parse_yaml, preset,
                                   read_config_file, settings_key, with_presets)
from edc_ray.config.schema import (Config, DataConfig, EvaluationConfig, InitConfig, ObserverSpec, ObserversConfig,
                                   OutputConfig, RayConfig, StatisticsConfig, SynthesisConfig)
from edc_ray.config.typed import flat_config, from_dict, to_dict
from edc_ray.errors import ConfigError

METHODS = typing.get_args(typing.get_type_hints(Config)["method"])
PROTOCOLS = typing.get_args(typing.get_type_hints(EvaluationConfig)["protocol"])

__all__ = ["METHODS", "PROTOCOLS", "Config", "ConfigError", "DataConfig", "EvaluationConfig", "InitConfig",
           "ObserverSpec", "ObserversConfig", "OutputConfig", "RayConfig", "StatisticsConfig", "SynthesisConfig",
           "apply_override", "check_local_resources", "deep_merge", "dump_config", "flat_config", "from_dict",
           "load_config", "parse_yaml", "preset", "read_config_file", "run_dir_problem", "settings_key",
           "to_dict", "valid_address", "with_presets"]
