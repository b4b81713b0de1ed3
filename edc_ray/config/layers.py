"""Where a config's values come from, lowest layer first:

1. the dataclass defaults (`schema.py`);
2. the method preset's `defaults` (`edc_ray/presets/method/<method>.yaml`);
3. the evaluation protocol preset (`edc_ray/presets/protocol/<protocol>.yaml`);
4. the YAML file, over the files it names with `base:` (a path relative to the including file);
5. the `--set section.key=value` overrides.

A method preset's `fixed` keys are the choices that define the method (RDED does not optimise, SRe2L
matches BN statistics globally): they are applied last, and a file or override that sets one of them to
another value is refused with a `ConfigError` naming the key, the method and the fixed value.
"""
from __future__ import annotations

import hashlib
import json
import os
from importlib import resources
from typing import Any

import yaml

from edc_ray.config.schema import Config
from edc_ray.config.typed import flatten, from_dict, to_dict
from edc_ray.errors import ConfigError


class _StrictLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a key given twice in one mapping (YAML would keep the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def parse_yaml(text: bytes | str, origin: str) -> Any:
    """YAML `text` as plain data (safe: no Python tags), refusing duplicate keys.

    Errors become `ConfigError` naming `origin` with the line and column, never the text itself (a
    file given by mistake may hold something secret).
    """
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{origin}: not valid YAML{where}: {err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{origin}: not valid YAML ({type(err).__name__})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{origin}: not a text file (it is not UTF-8)") from None


def preset(kind: str, name: str) -> dict:
    """The preset YAML `edc_ray/presets/<kind>/<name>.yaml` as a mapping."""
    text = resources.files("edc_ray").joinpath("presets", kind, f"{name}.yaml").read_text()
    return parse_yaml(text, f"preset {kind}/{name}") or {}


def deep_merge(base: dict, top: dict) -> dict:
    """`base` updated by `top`, recursively for nested mappings (neither is modified)."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def with_presets(data: dict) -> dict:
    """`data` (the files and overrides) layered over its method and protocol presets, with the method's
    fixed keys last; a fixed key that `data` sets to another value is a `ConfigError`."""
    from edc_ray.config import METHODS, PROTOCOLS

    method = data.get("method", "edc")
    evaluation = data.get("evaluation") if isinstance(data.get("evaluation"), dict) else {}
    protocol = evaluation.get("protocol", "edc")
    if method not in METHODS:
        raise ConfigError(f"method: {method!r} is not allowed; choose one of {', '.join(METHODS)}")
    if protocol not in PROTOCOLS:
        raise ConfigError(f"evaluation.protocol: {protocol!r} is not allowed; choose one of {', '.join(PROTOCOLS)}")
    method_preset = preset("method", method)
    fixed = method_preset.get("fixed", {})
    given = flatten(data)
    for key, value in flatten(fixed).items():
        if key in given and given[key] != value:
            raise ConfigError(f"{key}: {given[key]!r} conflicts with method {method!r}, which fixes it to "
                              f"{value!r}; leave the key out or choose another method")
    merged = deep_merge(deep_merge(method_preset.get("defaults", {}), preset("protocol", protocol)), data)
    return deep_merge(merged, fixed)


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `a.b.c=value` override (value parsed as YAML) to the nested mapping `data`."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like section.key=value")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {assignment!r}: {key!r} is not a section")
    node[keys[-1]] = parse_yaml(raw, f"override {dotted.strip()!r}")


def _beside(path: str, name: str) -> str:
    """`name` resolved against the folder holding the file `path` (absolute paths and URLs as given)."""
    if "://" in name or os.path.isabs(name):
        return name
    folder = path.rsplit("/", 1)[0] if "://" in path else os.path.dirname(path)
    return f"{folder}/{name}" if "://" in path else os.path.normpath(os.path.join(folder, name))


def read_config_file(path: str, including: tuple[str, ...] = ()) -> dict:
    """The mapping a config file gives: its keys over those of the file named by its `base:` key (and so
    on); errors name the file."""
    from edc_ray.storage import fsio

    origin = f"config file {path!r}" + (f" (the base of {including[-1]!r})" if including else "")
    if path in including:  # (local paths are normalised by `_beside`, so each file has one name)
        raise ConfigError(f"{origin}: `base:` files include each other ({' -> '.join(including + (path,))})")
    try:
        raw = fsio.read_bytes(path)
    except FileNotFoundError:
        raise ConfigError(f"{origin} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{origin} is a directory; give a YAML file") from None
    except PermissionError:
        raise ConfigError(f"{origin} cannot be read (permission denied)") from None
    data = parse_yaml(raw, origin)
    if data is None:
        raise ConfigError(f"{origin} is empty; give at least one key (e.g. `method: edc`), "
                          "or leave out --config for the demo")
    if not isinstance(data, dict):
        raise ConfigError(f"{origin} must hold a mapping of keys at the top level, not a {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{origin}: base: {base!r} is not allowed; give the path of a config file")
    return deep_merge(read_config_file(_beside(path, base), including + (path,)), data)


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (or the defaults), apply `key=value` overrides, check, and return it."""
    data = read_config_file(path) if path is not None else {}
    for assignment in overrides:
        apply_override(data, assignment)
    cfg = from_dict(Config, with_presets(data))
    cfg.check()
    return cfg


def settings_key(settings: dict) -> str:
    """A short, stable hash of plain `settings` (names storage made under exactly these settings)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML text (written into the run folder)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
