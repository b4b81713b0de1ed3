"""The config's schema: one dataclass per section, each field's default beside it and each section's
value checks in its `check()` (cross-section checks in `Config.check()`). Every check raises
`ConfigError` naming the dotted key, the value and what is allowed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from edc_ray.errors import ConfigError
from edc_ray.storage.images import CROPS


def _check(ok: bool, path: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{path}: {value!r} is not allowed; {allowed}")


def _check_scale(scale: list[float], path: str) -> None:
    _check(len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1, path, scale, "[min, max] with 0 < min <= max <= 1")


def _check_indices(indices: list[int] | None, path: str, count: int) -> None:
    """Observer indices: None (all of them) or a non-empty list indexing `count` observers."""
    _check(indices is None or len(indices) >= 1, path, indices, "give at least one observer index, or null for all")
    for k, index in enumerate(indices or []):
        _check(0 <= index < count, f"{path}[{k}]", index, f"must index observers.models (0..{count - 1})")


def _known_archs() -> str:
    from edc_ray.models import list_models

    return f"known architectures: {', '.join(list_models())}, or a 'timm:<name>' / 'torchvision:<name>'"


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

    def check(self) -> None:
        _check(bool(self.root.strip()), "data.root", self.root, "give a folder or s3:// prefix")
        _check(self.shard_size >= 1, "data.shard_size", self.shard_size, "must be >= 1 (samples per shard)")
        _check(self.image_size is None or self.image_size >= 1, "data.image_size", self.image_size,
               "must be >= 1 or null")
        _check(self.train_crop in CROPS, "data.train_crop", self.train_crop, f"one of {list(CROPS)}")
        _check_scale(self.train_crop_scale, "data.train_crop_scale")
        _check(self.val_resize_ratio >= 1, "data.val_resize_ratio", self.val_resize_ratio,
               "must be >= 1 (8/7: 256 -> 224)")


@dataclass
class ObserverSpec:
    """One observer: an architecture and where its weights come from."""

    arch: str = "convnet_w128"
    weights: str | None = None  # local path or s3:// URL; None: train it (or `pretrained`)
    # Library weights, named (torchvision: IMAGENET1K_V1; timm: a tag) or true for the library's default.
    # They bring their normalisation, validation resize ratio and classes; with `weights` set too, that
    # file holds them (offline). Without, they come from torch's hub cache (or the network).
    pretrained: bool | str = False

    def check(self, path: str) -> None:
        from edc_ray.models import is_model

        _check(is_model(self.arch), f"{path}.arch", self.arch, _known_archs())
        if self.pretrained:
            _check(":" in self.arch, f"{path}.pretrained", self.pretrained,
                   f"only timm: and torchvision: models have pretrained weights, not {self.arch!r}")
            from edc_ray.models.pretrained import preprocessing

            try:
                preprocessing(self.arch, self.pretrained)
            except (ValueError, RuntimeError) as exn:
                raise ConfigError(f"{path}.pretrained: {exn}") from None


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

    def check(self) -> None:
        _check(len(self.models) >= 1, "observers.models", self.models, "give at least one observer")
        for k, spec in enumerate(self.models):
            spec.check(f"observers.models[{k}]")
        _check(self.epochs >= 0, "observers.epochs", self.epochs, "must be >= 0")
        _check(self.batch_size >= 1, "observers.batch_size", self.batch_size, "must be >= 1")
        _check(self.lr > 0, "observers.lr", self.lr, "must be > 0")
        _check(0.0 <= self.momentum < 1.0, "observers.momentum", self.momentum, "must be in [0, 1)")
        _check(self.weight_decay >= 0, "observers.weight_decay", self.weight_decay, "must be >= 0")
        _check(self.crop_padding >= 0, "observers.crop_padding", self.crop_padding, "must be >= 0 (pixels)")


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

    def check(self) -> None:
        _check(self.patch_size >= 1, "statistics.patch_size", self.patch_size, "must be >= 1")
        _check(self.batch_size >= 1, "statistics.batch_size", self.batch_size, "must be >= 1")
        _check(self.loader_workers >= 0, "statistics.loader_workers", self.loader_workers, "must be >= 0")


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

    def check(self) -> None:
        _check(self.candidates_per_class >= 1, "init.candidates_per_class", self.candidates_per_class,
               "must be >= 1")
        _check_scale(self.crop_scale, "init.crop_scale")
        _check(0.0 <= self.pool_fraction <= 1.0, "init.pool_fraction", self.pool_fraction, "must be in [0, 1]")
        _check(self.factor >= 1, "init.factor", self.factor, "must be >= 1")
        _check(self.crops_per_image >= 1, "init.crops_per_image", self.crops_per_image, "must be >= 1")


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

    def check(self) -> None:
        _check(self.ipc >= 1, "synthesis.ipc", self.ipc, "ipc must be >= 1")
        _check(self.classes_per_unit >= 1, "synthesis.classes_per_unit", self.classes_per_unit, "must be >= 1")
        _check(self.iterations >= 0, "synthesis.iterations", self.iterations, "must be >= 0")
        _check(0.0 <= self.alpha <= 1.0, "synthesis.alpha", self.alpha, "alpha must be in [0, 1]")
        _check(0.0 <= self.stat_momentum < 1.0, "synthesis.stat_momentum", self.stat_momentum, "must be in [0, 1)")
        _check(0.0 <= self.flatness_beta < 1.0, "synthesis.flatness_beta", self.flatness_beta, "must be in [0, 1)")
        _check(0.0 < self.min_scale <= 1.0, "synthesis.min_scale", self.min_scale, "must be in (0, 1]")
        _check(self.jitter >= 0, "synthesis.jitter", self.jitter, "must be >= 0 (pixels)")
        _check(self.lr > 0, "synthesis.lr", self.lr, "must be > 0")
        _check(self.flatness_tau > 0, "synthesis.flatness_tau", self.flatness_tau, "must be > 0")
        for name in ("r", "ce_weight", "flatness_weight", "first_layer_weight"):
            value = getattr(self, name)
            _check(value >= 0, f"synthesis.{name}", value, "must be >= 0")
        _check(all(0 <= b < 1 for b in self.betas), "synthesis.betas", self.betas, "each beta must be in [0, 1)")


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

    def check(self) -> None:
        from edc_ray.models import is_model

        for k, student in enumerate(self.students):
            _check(is_model(student), f"evaluation.students[{k}]", student, _known_archs())
        _check(self.epochs >= 1, "evaluation.epochs", self.epochs, "must be >= 1")
        _check(self.batch_size >= 1, "evaluation.batch_size", self.batch_size, "must be >= 1")
        _check(len(self.seeds) >= 1, "evaluation.seeds", self.seeds, "give at least one seed")
        _check(all(seed >= 0 for seed in self.seeds), "evaluation.seeds", self.seeds, "every seed must be >= 0")
        _check(self.zeta >= 1.0, "evaluation.zeta", self.zeta, "zeta must be >= 1 (1 = plain cosine)")
        _check(0.0 <= self.ema_decay < 1.0, "evaluation.ema_decay", self.ema_decay, "must be in [0, 1)")
        _check(0.0 < self.min_scale <= 1.0, "evaluation.min_scale", self.min_scale, "must be in (0, 1]")
        _check(0.0 <= self.cutmix <= 1.0, "evaluation.cutmix", self.cutmix, "must be in [0, 1]")
        _check(self.temperature > 0, "evaluation.temperature", self.temperature, "must be > 0")
        _check(self.lr > 0, "evaluation.lr", self.lr, "must be > 0")
        _check(self.weight_decay >= 0, "evaluation.weight_decay", self.weight_decay, "must be >= 0")
        _check(self.ce_weight >= 0, "evaluation.ce_weight", self.ce_weight, "must be >= 0")
        _check(self.gamma > 0, "evaluation.gamma", self.gamma, "must be > 0 (the multistep decay factor)")
        _check(self.val_batch_size >= 1, "evaluation.val_batch_size", self.val_batch_size, "must be >= 1")
        _check(self.eval_every >= 0, "evaluation.eval_every", self.eval_every,
               "must be >= 0 (0: only after the last epoch)")
        _check(all(m >= 1 for m in self.milestones) and list(self.milestones) == sorted(set(self.milestones)),
               "evaluation.milestones", self.milestones, "must be increasing epochs >= 1")


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

    def check(self) -> None:
        from edc_ray.config.checks import valid_address

        _check(self.synthesis_actors >= 1, "ray.synthesis_actors", self.synthesis_actors, "must be >= 1")
        _check(self.train_workers >= 1, "ray.train_workers", self.train_workers, "must be >= 1")
        _check(self.actor_cpus >= 0 and self.actor_gpus >= 0, "ray.actor_cpus/actor_gpus",
               (self.actor_cpus, self.actor_gpus), "must be >= 0")
        _check(self.stats_tasks >= 1, "ray.stats_tasks", self.stats_tasks, "must be >= 1")
        _check(self.stats_cpus >= 0 and self.stats_gpus >= 0, "ray.stats_cpus/stats_gpus",
               (self.stats_cpus, self.stats_gpus), "must be >= 0")
        _check(self.train_worker_cpus >= 0, "ray.train_worker_cpus", self.train_worker_cpus, "must be >= 0")
        _check(self.num_cpus is None or self.num_cpus >= 1, "ray.num_cpus", self.num_cpus,
               "must be >= 1 or null (all cores)")
        _check(self.placement_timeout_s > 0, "ray.placement_timeout_s", self.placement_timeout_s,
               "must be > 0 (seconds)")
        for k, path in enumerate(self.shared_paths):
            _check(path.startswith(("/", "~")), f"ray.shared_paths[{k}]", path,
                   "give an absolute local folder (a mount every node has at that path)")
        _check(valid_address(self.address), "ray.address", self.address,
               "use 'local' (a private instance), 'auto' (the cluster this machine is in), host:port or "
               "ray://host:port")


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

    def check(self) -> None:
        """Every section's checks, then those across sections; raises `ConfigError`."""
        from edc_ray.config.checks import run_dir_problem

        for section in (self.data, self.observers, self.statistics, self.init, self.synthesis, self.evaluation,
                        self.ray):
            section.check()
        _check(self.seed >= 0, "seed", self.seed, "must be >= 0")
        count = len(self.observers.models)
        _check_indices(self.synthesis.observers, "synthesis.observers", count)
        _check_indices(self.init.score_observers, "init.score_observers", count)
        for k, teacher in enumerate(self.evaluation.teachers or []):
            _check(0 <= teacher < count, f"evaluation.teachers[{k}]", teacher,
                   f"must index observers.models (0..{count - 1})")
        st = self.statistics
        accumulated = {"bn": st.bn, "conv": st.conv, "patch": st.patch and st.conv}
        for kind in self.synthesis.match:
            _check(accumulated[kind], "synthesis.match", self.synthesis.match,
                   f"{kind!r} statistics are not accumulated (statistics.{'conv' if kind == 'patch' else kind}"
                   f"{' and statistics.patch' if kind == 'patch' else ''} must be true)")
        problem = run_dir_problem(self.output.run_dir, self.data.root)
        _check(problem is None, "output.run_dir", self.output.run_dir, problem or "")
