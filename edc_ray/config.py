"""One typed config for the whole pipeline: dataclasses loaded from YAML, CLI overrides on top.

    cfg = load_config("configs/fashion-mnist/edc_ipc10.yaml", overrides=["synthesis.iterations=200"])

Unknown keys, wrong types and out-of-range values raise `ConfigError` before any work starts; the
message names the dotted path, the bad value and what is allowed.

Layers, lowest first: the dataclass defaults; the method preset's `defaults`
(`edc_ray/presets/method/<method>.yaml`); the evaluation protocol preset
(`edc_ray/presets/protocol/<protocol>.yaml`); the YAML file; the `--set` overrides; and last the method
preset's `fixed` keys, the choices that define the method (e.g. RDED does not optimise), which always win.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from edc_ray.storage.images import CROPS


class ConfigError(ValueError):
    """A configuration value or key that cannot be used; the message says what is allowed."""


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


@dataclass
class DataConfig:
    """Where the prepared WebDataset shards live, and how to prepare them on first use."""

    root: str = "data/digits"  # local path or s3://bucket/prefix holding _info.json
    source: str | None = None  # prepare from this source on first use (None: must be prepared)
    src: str | None = None  # source files for `source` (idx folder, CIFAR folder, ImageFolder)
    train_split: str = "train"
    val_split: str = "test"
    image_size: int | None = None  # fixed-size datasets: must equal theirs; images of any size: required
    shard_size: int = 5000  # samples per shard when preparing on first use
    classes: str | None = None  # a text file of class names (one per line) for infos that name none, or
    # "imagenet-1k" (its 1000 sorted wnids: the class order of torchvision's and timm's pretrained models)
    # Datasets whose images have any size (JPEG shards read in place) are fitted to image_size as they
    # are decoded: train views by a random-resized crop (or "center"), validation views (and candidates)
    # by resizing the shorter side to image_size * val_resize_ratio and a centre crop.
    train_crop: str = "random_resized"
    train_crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    val_resize_ratio: float = 8 / 7


@dataclass
class ObserverSpec:
    """One observer: an architecture and where its weights come from."""

    arch: str = "convnet_w128"
    weights: str | None = None  # local path or s3:// URL; None: train it (or `pretrained`)
    # Library weights, named (torchvision: IMAGENET1K_V1; timm: a tag) or true for the library's default.
    # They bring their normalisation, validation resize ratio and classes; with `weights` set too, that
    # file holds them (offline). Without, they come from torch's hub cache (or the network).
    pretrained: bool | str = False


@dataclass
class ObserversConfig:
    """Observers (teachers): trained briefly from scratch on small images, or loaded."""

    models: list[ObserverSpec] = field(default_factory=lambda: [ObserverSpec()])
    epochs: int = 10
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    crop_padding: int = 4  # random-crop(pad) + flip while training observers
    flip: bool = True


@dataclass
class StatisticsConfig:
    """Which layer inputs are matched and how patch statistics are taken (METHOD.md 1.2)."""

    bn: bool = True
    conv: bool = True
    patch: bool = True
    patch_size: int = 4  # P: 4 for <= 64 px images, 16 for 224 px
    batch_size: int = 256
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    loader_workers: int = 2  # background processes decoding the next batches while the observers run


@dataclass
class InitConfig:
    """How synthetic images start (METHOD.md 1.3)."""

    # real: low-loss real images; mosaic: f x f stitches of low-loss crops; noise: Gaussian noise;
    # random: the ipc lowest-priority candidates, i.e. a uniform random real subset (the baseline)
    mode: Literal["real", "mosaic", "noise", "random"] = "real"
    candidates_per_class: int = 300
    # real init samples each class's ipc images, distinct, from the lowest-loss `pool_fraction` of its
    # scored candidates (never fewer than ipc); 0 keeps exactly the ipc lowest-loss ones (METHOD.md
    # 1.3), 1 samples from all of them (EDC's preset: measured better on MNIST / Fashion-MNIST).
    pool_fraction: float = 1.0
    factor: int = 2  # f: mosaics are f x f crops
    crops_per_image: int = 4
    # the mosaic's candidate crops: RandomResizedCrop area fraction and a random flip (EDC's init:
    # (0.08, 1) and flip); one_crop_per_image keeps only each image's lowest-loss crop (RDED's selection)
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    crop_flip: bool = True
    one_crop_per_image: bool = False
    shuffle_patches: bool = False
    # observer indices whose mean logits score the candidates and the mosaic crops (None: all); EDC's
    # ImageNet recipe scores with its four relabelling models, RDED with its one observer
    score_observers: list[int] | None = None


@dataclass
class SynthesisConfig:
    """The per-unit pixel optimisation (METHOD.md 1.4)."""

    ipc: int = 10
    classes_per_unit: int = 10  # a unit holds ipc * classes_per_unit images (aim ~100)
    iterations: int = 200
    lr: float = 0.05
    betas: tuple[float, float] = (0.5, 0.9)
    min_scale: float = 0.5  # RandomResizedCrop scale lower bound
    jitter: int = 0  # SRe2L: shift each image circularly by up to this many pixels before the crop
    flip: bool = True
    ce_weight: float = 1.0
    r: float = 0.01  # matching weight
    alpha: float = 0.5  # 1 = global matching only (SRe2L / G-VBSM)
    stat_momentum: float = 0.8
    first_layer_weight: float = 10.0
    flatness_weight: float = 0.25
    flatness_beta: float = 0.99
    flatness_tau: float = 4.0
    observers: list[int] | None = None  # observer indices synthesis optimises against (None: all)
    match: list[Literal["bn", "conv", "patch"]] = field(default_factory=lambda: ["bn", "conv", "patch"])
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False  # run each observer's step under torch.compile


@dataclass
class EvaluationConfig:
    """Student post-training on the distilled set (METHOD.md 1.6)."""

    protocol: Literal["edc", "sre2l", "rded"] = "edc"  # preset of the fields below (presets/protocol)
    students: list[str] = field(default_factory=lambda: ["convnet"])
    teachers: list[int] | None = None  # observer indices used as soft-label teachers (None: all)
    epochs: int = 300
    batch_size: int = 50
    lr: float = 1e-3
    weight_decay: float = 0.01
    loss: Literal["mse_ce", "kl"] = "mse_ce"
    ce_weight: float = 0.025
    temperature: float = 20.0
    schedule: Literal["smooth", "multistep", "ssrs"] = "smooth"
    zeta: float = 2.0  # 1 = plain cosine
    milestones: list[int] = field(default_factory=lambda: [800, 900, 950])
    gamma: float = 0.5
    ema_decay: float = 0.99
    min_scale: float = 0.5
    randaugment: bool = True
    cutmix: float = 1.0  # probability of CutMix per batch
    random_baseline: bool = True  # also evaluate IPC random real images per class
    val_batch_size: int = 500
    eval_every: int = 50  # validate (and checkpoint) every N epochs, and after the last
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    seeds: list[int] = field(default_factory=lambda: [0])  # one student per seed; mean and std reported


@dataclass
class RayConfig:
    """Where and how the stages are distributed."""

    address: str = "local"  # "local" starts a private instance; "auto" joins a cluster
    num_cpus: int | None = None  # for a local instance
    synthesis_actors: int = 2
    actor_cpus: float = 1.0
    actor_gpus: float = 0.0
    train_workers: int = 1
    train_use_gpu: bool = False
    train_worker_cpus: float = 1.0
    stats_tasks: int = 2
    stats_cpus: float = 1.0  # per statistics (and merge) task
    stats_gpus: float = 0.0  # per statistics (and merge) task; fractional allowed
    dashboard: bool = True  # start the dashboard with a local instance (Ray Train's state API needs it)
    # How long a stage waits for the cluster to offer the resources it asks for (nodes to start, the
    # autoscaler to add them) before it fails naming what it asked for and what the cluster has.
    placement_timeout_s: float = 600.0
    # Local folders every node mounts at the same path (NFS, EFS, FSx): data.root, output.run_dir and
    # weights files under them are allowed on a multi-node cluster (other local paths are refused there).
    shared_paths: list[str] = field(default_factory=list)


@dataclass
class OutputConfig:
    """The run folder (local path or s3://bucket/prefix)."""

    run_dir: str = "runs/demo"


@dataclass
class Config:
    """The whole pipeline's configuration."""

    method: Literal["edc", "gvbsm", "sre2l", "rded", "random"] = "edc"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    observers: ObserversConfig = field(default_factory=ObserversConfig)
    statistics: StatisticsConfig = field(default_factory=StatisticsConfig)
    init: InitConfig = field(default_factory=InitConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


# ---------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with type checks that name the dotted path.


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the annotation `tp` and convert it (dicts become dataclasses)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, path)
            except ConfigError:
                pass
        raise ConfigError(f"{path}: {value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{path}: {value!r} is not allowed; choose one of {allowed}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, path)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        key_type, value_type = args or (Any, Any)
        return {_convert(k, key_type, f"{path} key {k!r}"): _convert(v, value_type, f"{path}.{k}")
                for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{path}: expected {len(args)} values, got {value!r}")
            return tuple(_convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp in (bool, str):
        if not isinstance(value, tp):
            raise ConfigError(f"{path}: expected {tp.__name__}, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported type {_type_name(tp)}")


def from_dict(cls: type, data: dict, path: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys by name and dotted path."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in names:
            raise ConfigError(f"unknown key {key!r} at {dotted!r}; allowed keys: {', '.join(names)}")
        kwargs[key] = _convert(value, hints[key], dotted)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """The config as plain YAML-safe data (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


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


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (or the defaults), apply `key=value` overrides, validate, and return it."""
    data: dict = {}
    if path is not None:
        from edc_ray.storage import fsio

        try:
            raw = fsio.read_bytes(path)
        except FileNotFoundError:
            raise ConfigError(f"config file {path!r} does not exist") from None
        except IsADirectoryError:
            raise ConfigError(f"config file {path!r} is a directory; give a YAML file") from None
        except PermissionError:
            raise ConfigError(f"config file {path!r} cannot be read (permission denied)") from None
        data = parse_yaml(raw, f"config file {path!r}")
        if data is None:
            raise ConfigError(f"config file {path!r} is empty; give at least one key (e.g. `method: edc`), "
                              "or leave out --config for the demo")
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path!r} must hold a mapping of keys at the top level, "
                              f"not a {type(data).__name__}")
    for assignment in overrides:
        apply_override(data, assignment)
    cfg = from_dict(Config, with_presets(data))
    validate(cfg)
    return cfg


METHODS = typing.get_args(typing.get_type_hints(Config)["method"])
PROTOCOLS = typing.get_args(typing.get_type_hints(EvaluationConfig)["protocol"])


def preset(kind: str, name: str) -> dict:
    """The preset YAML `edc_ray/presets/<kind>/<name>.yaml` as a mapping."""
    from importlib import resources

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
    """`data` (YAML + overrides) layered over its method and protocol presets (see the module doc)."""
    method = data.get("method", "edc")
    evaluation = data.get("evaluation") if isinstance(data.get("evaluation"), dict) else {}
    protocol = evaluation.get("protocol", "edc")
    _check(method in METHODS, "method", method, f"choose one of {', '.join(METHODS)}")
    _check(protocol in PROTOCOLS, "evaluation.protocol", protocol, f"choose one of {', '.join(PROTOCOLS)}")
    method_preset = preset("method", method)
    merged = deep_merge(deep_merge(method_preset.get("defaults", {}), preset("protocol", protocol)), data)
    return deep_merge(merged, method_preset.get("fixed", {}))


def flat_config(cfg: Config) -> dict[str, Any]:
    """The config as {"section.key": value} (nested sections joined by dots)."""
    def walk(data: dict, prefix: str) -> dict:
        flat: dict = {}
        for key, value in data.items():
            name = f"{prefix}{key}"
            flat.update(walk(value, f"{name}.") if isinstance(value, dict) else {name: value})
        return flat
    return walk(to_dict(cfg), "")


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


def settings_key(settings: dict) -> str:
    """A short, stable hash of plain `settings` (names storage made under exactly these settings)."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML text (written into the run folder)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Value checks that need more than a type.


def _check(ok: bool, path: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{path}: {value!r} is not allowed; {allowed}")


def validate(cfg: Config) -> None:
    """Range and cross-field checks; raises `ConfigError` naming the value and what is allowed."""
    from edc_ray.models import is_model

    s, e, o, i, st, r = cfg.synthesis, cfg.evaluation, cfg.observers, cfg.init, cfg.statistics, cfg.ray
    _check(s.ipc >= 1, "synthesis.ipc", s.ipc, "ipc must be >= 1")
    _check(s.classes_per_unit >= 1, "synthesis.classes_per_unit", s.classes_per_unit, "must be >= 1")
    _check(s.iterations >= 0, "synthesis.iterations", s.iterations, "must be >= 0")
    _check(0.0 <= s.alpha <= 1.0, "synthesis.alpha", s.alpha, "alpha must be in [0, 1]")
    _check(0.0 <= s.stat_momentum < 1.0, "synthesis.stat_momentum", s.stat_momentum, "must be in [0, 1)")
    _check(0.0 <= s.flatness_beta < 1.0, "synthesis.flatness_beta", s.flatness_beta, "must be in [0, 1)")
    _check(0.0 < s.min_scale <= 1.0, "synthesis.min_scale", s.min_scale, "must be in (0, 1]")
    _check(s.jitter >= 0, "synthesis.jitter", s.jitter, "must be >= 0 (pixels)")
    _check(s.lr > 0, "synthesis.lr", s.lr, "must be > 0")
    _check(s.flatness_tau > 0, "synthesis.flatness_tau", s.flatness_tau, "must be > 0")
    for name in ("r", "ce_weight", "flatness_weight", "first_layer_weight"):
        value = getattr(s, name)
        _check(value >= 0, f"synthesis.{name}", value, "must be >= 0")
    _check(all(0 <= b < 1 for b in s.betas), "synthesis.betas", s.betas, "each beta must be in [0, 1)")
    _check(len(o.models) >= 1, "observers.models", o.models, "give at least one observer")
    for k, index in enumerate(s.observers or []):
        _check(0 <= index < len(o.models), f"synthesis.observers[{k}]", index,
               f"must index observers.models (0..{len(o.models) - 1})")
    _check(s.observers is None or len(s.observers) >= 1, "synthesis.observers", s.observers,
           "give at least one observer index, or null for all")
    for k, index in enumerate(i.score_observers or []):
        _check(0 <= index < len(o.models), f"init.score_observers[{k}]", index,
               f"must index observers.models (0..{len(o.models) - 1})")
    _check(i.score_observers is None or len(i.score_observers) >= 1, "init.score_observers", i.score_observers,
           "give at least one observer index, or null for all")
    accumulated = {"bn": st.bn, "conv": st.conv, "patch": st.patch and st.conv}
    for kind in s.match:
        _check(accumulated[kind], "synthesis.match", s.match,
               f"{kind!r} statistics are not accumulated (statistics.{'conv' if kind == 'patch' else kind}"
               f"{' and statistics.patch' if kind == 'patch' else ''} must be true)")
    for k, spec in enumerate(o.models):
        _check(is_model(spec.arch), f"observers.models[{k}].arch", spec.arch, _known_archs())
        if spec.pretrained:
            _check(":" in spec.arch, f"observers.models[{k}].pretrained", spec.pretrained,
                   f"only timm: and torchvision: models have pretrained weights, not {spec.arch!r}")
            try:
                from edc_ray.models.pretrained import preprocessing

                preprocessing(spec.arch, spec.pretrained)
            except (ValueError, RuntimeError) as exn:
                raise ConfigError(f"observers.models[{k}].pretrained: {exn}") from None
    for k, student in enumerate(e.students):
        _check(is_model(student), f"evaluation.students[{k}]", student, _known_archs())
    for k, t in enumerate(e.teachers or []):
        _check(0 <= t < len(o.models), f"evaluation.teachers[{k}]", t,
               f"must index observers.models (0..{len(o.models) - 1})")
    _check(o.epochs >= 0, "observers.epochs", o.epochs, "must be >= 0")
    _check(o.batch_size >= 1, "observers.batch_size", o.batch_size, "must be >= 1")
    _check(st.patch_size >= 1, "statistics.patch_size", st.patch_size, "must be >= 1")
    _check(i.candidates_per_class >= 1, "init.candidates_per_class", i.candidates_per_class, "must be >= 1")
    _check(len(i.crop_scale) == 2 and 0 < i.crop_scale[0] <= i.crop_scale[1] <= 1, "init.crop_scale",
           i.crop_scale, "[min, max] with 0 < min <= max <= 1")
    _check(0.0 <= i.pool_fraction <= 1.0, "init.pool_fraction", i.pool_fraction, "must be in [0, 1]")
    _check(i.factor >= 1, "init.factor", i.factor, "must be >= 1")
    _check(i.crops_per_image >= 1, "init.crops_per_image", i.crops_per_image, "must be >= 1")
    _check(e.epochs >= 1, "evaluation.epochs", e.epochs, "must be >= 1")
    _check(e.batch_size >= 1, "evaluation.batch_size", e.batch_size, "must be >= 1")
    _check(len(e.seeds) >= 1, "evaluation.seeds", e.seeds, "give at least one seed")
    _check(e.zeta >= 1.0, "evaluation.zeta", e.zeta, "zeta must be >= 1 (1 = plain cosine)")
    _check(0.0 <= e.ema_decay < 1.0, "evaluation.ema_decay", e.ema_decay, "must be in [0, 1)")
    _check(0.0 < e.min_scale <= 1.0, "evaluation.min_scale", e.min_scale, "must be in (0, 1]")
    _check(0.0 <= e.cutmix <= 1.0, "evaluation.cutmix", e.cutmix, "must be in [0, 1]")
    _check(e.temperature > 0, "evaluation.temperature", e.temperature, "must be > 0")
    _check(r.synthesis_actors >= 1, "ray.synthesis_actors", r.synthesis_actors, "must be >= 1")
    _check(r.train_workers >= 1, "ray.train_workers", r.train_workers, "must be >= 1")
    _check(r.actor_cpus >= 0 and r.actor_gpus >= 0, "ray.actor_cpus/actor_gpus",
           (r.actor_cpus, r.actor_gpus), "must be >= 0")
    _check(r.stats_tasks >= 1, "ray.stats_tasks", r.stats_tasks, "must be >= 1")
    _check(r.stats_cpus >= 0 and r.stats_gpus >= 0, "ray.stats_cpus/stats_gpus", (r.stats_cpus, r.stats_gpus),
           "must be >= 0")
    _check(st.batch_size >= 1, "statistics.batch_size", st.batch_size, "must be >= 1")
    _check(st.loader_workers >= 0, "statistics.loader_workers", st.loader_workers, "must be >= 0")
    _check(cfg.seed >= 0, "seed", cfg.seed, "must be >= 0")
    _check(all(seed >= 0 for seed in e.seeds), "evaluation.seeds", e.seeds, "every seed must be >= 0")
    d = cfg.data
    _check(bool(d.root.strip()), "data.root", d.root, "give a folder or s3:// prefix")
    _check(d.shard_size >= 1, "data.shard_size", d.shard_size, "must be >= 1 (samples per shard)")
    _check(d.image_size is None or d.image_size >= 1, "data.image_size", d.image_size, "must be >= 1 or null")
    _check(d.train_crop in CROPS, "data.train_crop", d.train_crop, f"one of {list(CROPS)}")
    _check(len(d.train_crop_scale) == 2 and 0 < d.train_crop_scale[0] <= d.train_crop_scale[1] <= 1,
           "data.train_crop_scale", d.train_crop_scale, "[min, max] with 0 < min <= max <= 1")
    _check(d.val_resize_ratio >= 1, "data.val_resize_ratio", d.val_resize_ratio, "must be >= 1 (8/7: 256 -> 224)")
    _check(o.lr > 0, "observers.lr", o.lr, "must be > 0")
    _check(0.0 <= o.momentum < 1.0, "observers.momentum", o.momentum, "must be in [0, 1)")
    _check(o.weight_decay >= 0, "observers.weight_decay", o.weight_decay, "must be >= 0")
    _check(o.crop_padding >= 0, "observers.crop_padding", o.crop_padding, "must be >= 0 (pixels)")
    _check(e.lr > 0, "evaluation.lr", e.lr, "must be > 0")
    _check(e.weight_decay >= 0, "evaluation.weight_decay", e.weight_decay, "must be >= 0")
    _check(e.ce_weight >= 0, "evaluation.ce_weight", e.ce_weight, "must be >= 0")
    _check(e.gamma > 0, "evaluation.gamma", e.gamma, "must be > 0 (the multistep decay factor)")
    _check(e.val_batch_size >= 1, "evaluation.val_batch_size", e.val_batch_size, "must be >= 1")
    _check(e.eval_every >= 0, "evaluation.eval_every", e.eval_every, "must be >= 0 (0: only after the last epoch)")
    _check(all(m >= 1 for m in e.milestones) and list(e.milestones) == sorted(set(e.milestones)),
           "evaluation.milestones", e.milestones, "must be increasing epochs >= 1")
    _check(r.num_cpus is None or r.num_cpus >= 1, "ray.num_cpus", r.num_cpus, "must be >= 1 or null (all cores)")
    _check(r.placement_timeout_s > 0, "ray.placement_timeout_s", r.placement_timeout_s, "must be > 0 (seconds)")
    for k, path in enumerate(r.shared_paths):
        _check(path.startswith(("/", "~")), f"ray.shared_paths[{k}]", path,
               "give an absolute local folder (a mount every node has at that path)")
    _check(r.train_worker_cpus >= 0, "ray.train_worker_cpus", r.train_worker_cpus, "must be >= 0")
    _check(valid_address(r.address), "ray.address", r.address,
           "use 'local' (a private instance), 'auto' (the cluster this machine is in), host:port or "
           "ray://host:port")
    problem = run_dir_problem(cfg.output.run_dir, d.root)
    _check(problem is None, "output.run_dir", cfg.output.run_dir, problem or "")


def check_local_resources(cfg: Config, cpus: int, gpus: int) -> None:
    """Refuse per-task requests that a local instance of `cpus` CPUs and `gpus` GPUs can never place
    (Ray would wait for them forever); raises `ConfigError`."""
    r = cfg.ray
    where = f"the local Ray instance has {cpus} CPUs (ray.num_cpus, or all cores) and {gpus} GPUs"
    for key, value in (("actor_cpus", r.actor_cpus), ("stats_cpus", r.stats_cpus)):
        _check(value <= cpus, f"ray.{key}", value, f"{where}; a task asking for more never starts")
    for key, value in (("actor_gpus", r.actor_gpus), ("stats_gpus", r.stats_gpus)):
        _check(value <= gpus, f"ray.{key}", value, f"{where}; a task asking for more never starts")
    _check(r.train_workers * r.train_worker_cpus <= cpus, "ray.train_workers x ray.train_worker_cpus",
           (r.train_workers, r.train_worker_cpus), f"{where}; one training run needs all its workers at once")
    _check(not r.train_use_gpu or r.train_workers <= gpus, "ray.train_use_gpu", r.train_use_gpu,
           f"{where}; each of the {r.train_workers} training workers needs a GPU")


def valid_address(address: str) -> bool:
    """Whether `address` is a Ray address: local, auto, host:port or ray://host:port."""
    if address in ("local", "auto"):
        return True
    host, _, port = address.removeprefix("ray://").rpartition(":")
    return bool(host) and "/" not in host and port.isdigit() and 1 <= int(port) <= 65535


def run_dir_problem(run_dir: str, data_root: str) -> str | None:
    """Why `run_dir` cannot be a run folder (a filesystem or bucket root, the home or current folder,
    the dataset), or None."""
    import os

    path = run_dir.strip()
    if path.startswith("s3://"):
        if "/" not in path[len("s3://"):].strip("/"):
            return "it is a bucket root; give a prefix inside it (s3://bucket/runs/name)"
        return None if path.rstrip("/") != data_root.rstrip("/") else "it is the dataset's folder (data.root)"
    if not path:
        return "give a folder"
    resolved = os.path.realpath(os.path.expanduser(path))
    if resolved == os.path.realpath(os.sep):
        return "it is the filesystem root; give a folder of its own (e.g. runs/name)"
    if resolved in (os.path.realpath(os.path.expanduser("~")), os.path.realpath(os.getcwd())):
        return "it is the home or the current folder; give a folder of its own (e.g. runs/name)"
    if not data_root.startswith("s3://") and resolved == os.path.realpath(os.path.expanduser(data_root)):
        return "it is the dataset's folder (data.root)"
    return None


def _known_archs() -> str:
    from edc_ray.models import list_models

    return f"known architectures: {', '.join(list_models())}, or a 'timm:<name>' / 'torchvision:<name>'"
