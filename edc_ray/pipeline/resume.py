"""Resuming a run folder: which keys of a stored config differ from the current one, and which of
those the finished stages depended on (a re-run skips those stages, so such a change would be lost).
"""
from __future__ import annotations

from typing import Any

from edc_ray.config import Config, ConfigError, flat_config, from_dict, parse_yaml
from edc_ray.storage import fsio
from edc_ray.storage.run_folder import RunFolder

# Settings of the pixel optimisation: with `synthesis.iterations` 0 (random, RDED) they cannot change a
# run's result. (`ipc`, units and the init keys still count.)
OPTIMISATION_KEYS = ("lr", "betas", "min_scale", "jitter", "flip", "ce_weight", "r", "alpha", "stat_momentum",
                     "first_layer_weight", "flatness_weight", "flatness_beta", "flatness_tau", "match",
                     "observers")


def _inert_keys(flat: dict[str, Any]) -> set[str]:
    """Keys of a flattened config that cannot affect its result."""
    if flat.get("synthesis.iterations") != 0:
        return set()
    return {f"synthesis.{key}" for key in OPTIMISATION_KEYS}


def changed_keys(previous: Config, current: Config) -> list[str]:
    """Dotted keys whose values differ, sorted; synthesis settings of runs that do not optimise excluded.

    Configs compare as values, so a key added since, at its default, is not a change.
    """
    old, new = flat_config(previous), flat_config(current)
    inert = _inert_keys(old) & _inert_keys(new)
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k not in inert)


# Each stage, the run-folder stages whose markers show its outputs, and the keys those depend on
# (besides those of the stages before it). `evaluation.students` and `random_baseline` only pick which
# sets and students are evaluated, each cached under its own name, so they may change between runs.
STAGE_INPUTS = (("observers", ("observers",), ("seed", "data.", "observers.")),
                ("statistics", ("candidates", "statistics"), ("statistics.", "init.candidates_per_class")),
                ("synthesis", ("synthesis",), ("method", "init.", "synthesis.")),
                ("evaluation", ("evaluation",), ("evaluation.",)))
FREE_KEYS = ("evaluation.students", "evaluation.random_baseline")


def stored_config(run: RunFolder) -> Config | None:
    """The resolved config a run folder was last run with (None: no run yet)."""
    if not run.exists("config.yaml"):
        return None
    return from_dict(Config, parse_yaml(fsio.read_bytes(run.path("config.yaml")), run.path("config.yaml")) or {})


def check_run_folder(run: RunFolder, cfg: Config) -> None:
    """Refuse to resume a run folder whose finished stages were computed under another config.

    A re-run skips every stage whose outputs exist, so a changed key those outputs depend on would be
    silently ignored; resource settings (`ray`, `device`) and which students run may change freely.
    """
    previous = stored_config(run)
    if previous is None:
        return
    changed = [k for k in changed_keys(previous, cfg) if k not in FREE_KEYS]
    inputs: tuple[str, ...] = ()
    for name, marked_by, keys in STAGE_INPUTS:
        inputs += keys
        if not any(run.markers(stage) for stage in marked_by):
            continue
        stale = [k for k in changed if k.startswith(inputs)]
        if stale:
            raise ConfigError(f"run folder {run.root}: its finished {name} stage was computed under another "
                              f"config (changed: {', '.join(stale)}); choose a new output.run_dir, or remove "
                              "the folder to start over")
