"""Statistics of the inputs of every BatchNorm2d and Conv2d of an observer (METHOD.md 1.2).

Two views of the same layer input `h` (B x C x H x W):
- batch statistics (synthesis): channel mean/var over (B, H, W) and, per P x P patch position, the
  mean/var over (B, C, P, P);
- per-image statistics (the statistics pass): the same with the batch axis kept.

The statistics pass accumulates per-image statistics per class as **fixed-point int64 sums**: integer
addition is associative, so sums computed shard by shard and reduced on the driver are bit-identical to
a single pass. Global targets are derived from the per-class sums (every image of a layer has the same
H x W, so the mean of per-image means is the pixel mean).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

FIXED_POINT_BITS = 24  # resolution 6e-8; int64 then holds sums up to ~5e11
_MAX_ABS = 2.0**38  # per-image value bound: 2**24 images of it still fit in int64

CHANNEL_STATS = ("mean", "var")
PATCH_STATS = ("patch_mean", "patch_var")


def patch_resize(h: torch.Tensor, patch: int) -> torch.Tensor:
    """Resize `h` bilinearly so that its height and width are multiples of `patch` (unchanged if so)."""
    height, width = h.shape[-2:]
    th, tw = -(-height // patch) * patch, -(-width // patch) * patch
    if (th, tw) != (height, width):
        h = F.interpolate(h, size=(th, tw), mode="bilinear", align_corners=False)
    return h


def _moments(h: torch.Tensor, patch: int | None, keep_batch: bool) -> dict[str, torch.Tensor]:
    """Means and mean squares of `h`: per channel over (H, W) and per patch over (C, P, P).

    Computed as plain means of x and x^2 (the variance follows as E[x^2] - E[x]^2), averaged over the
    batch too unless `keep_batch`. Patch means average over channels first and pool afterwards: both
    are linear, so the result is the same at a fraction of the cost.
    """
    square = h * h
    dims = (2, 3) if keep_batch else (0, 2, 3)
    out = {"mean": h.mean(dims), "sq": square.mean(dims)}
    if patch:
        resized = patch_resize(h, patch)
        squared = square if resized is h else resized * resized
        pmean = F.avg_pool2d(resized.mean(1, keepdim=True), patch)[:, 0]  # (B, nH, nW)
        psq = F.avg_pool2d(squared.mean(1, keepdim=True), patch)[:, 0]
        out.update(patch_mean=pmean if keep_batch else pmean.mean(0),
                   patch_sq=psq if keep_batch else psq.mean(0))
    return out


def batch_statistics(h: torch.Tensor, patch: int | None) -> dict[str, torch.Tensor]:
    """Channel (and patch) mean/var of a batch: shapes (C,) and (nH, nW)."""
    m = _moments(h, patch, keep_batch=False)
    out = {"mean": m["mean"], "var": (m["sq"] - m["mean"] ** 2).clamp(min=0)}
    if patch:
        out.update(patch_mean=m["patch_mean"], patch_var=(m["patch_sq"] - m["patch_mean"] ** 2).clamp(min=0))
    return out


def image_statistics(h: torch.Tensor, patch: int | None) -> dict[str, torch.Tensor]:
    """Per-image spatial mean/var, mean of squares, and patch versions: shapes (B, C), (B, nH, nW)."""
    out = _moments(h, patch, keep_batch=True)
    out["var"] = (out["sq"] - out["mean"] ** 2).clamp(min=0)
    if patch:
        out["patch_var"] = (out["patch_sq"] - out["patch_mean"] ** 2).clamp(min=0)
    return out


@dataclass
class HookedLayer:
    """A layer whose input is matched: its name, kind ("bn" | "conv"), patch size or None."""

    name: str
    module: nn.Module
    kind: str
    patch: int | None


def hooked_layers(model: nn.Module, bn: bool = True, conv: bool = True,
                  patch: int | None = 4) -> list[HookedLayer]:
    """Every BatchNorm2d (channel stats) and Conv2d (channel + patch stats) input, in module order."""
    layers = []
    for name, module in model.named_modules():
        if bn and isinstance(module, nn.BatchNorm2d):
            layers.append(HookedLayer(name, module, "bn", None))
        elif conv and isinstance(module, nn.Conv2d):
            layers.append(HookedLayer(name, module, "conv", patch))
    return layers


class StatisticHooks:
    """Forward pre-hooks that record the statistics of each hooked layer's input.

    `mode="batch"` records `batch_statistics` (with gradients, for synthesis); `mode="image"` records
    `image_statistics` (for the statistics pass). Recording happens only inside `capture()`, so the
    same observer can run hook-free forwards (e.g. the flatness term's EMA images).
    """

    def __init__(self, layers: list[HookedLayer], mode: str = "batch"):
        if mode not in ("batch", "image"):
            raise ValueError(f"mode {mode!r} is not allowed; choose 'batch' or 'image'")
        self.layers = layers
        self.mode = mode
        self.records: list[dict[str, torch.Tensor] | None] = [None] * len(layers)
        self._active = False
        self._handles = [layer.module.register_forward_pre_hook(self._hook(i))
                         for i, layer in enumerate(layers)]

    def _hook(self, index: int):
        stat_fn = batch_statistics if self.mode == "batch" else image_statistics
        patch = self.layers[index].patch

        def hook(module: nn.Module, inputs: tuple) -> None:
            if self._active:
                self.records[index] = stat_fn(inputs[0], patch)
        return hook

    @contextlib.contextmanager
    def capture(self) -> Iterator[list]:
        """Record statistics of the forwards run inside this block; yields the record list."""
        self.records = [None] * len(self.layers)
        self._active = True
        try:
            yield self.records
        finally:
            self._active = False

    def remove(self) -> None:
        """Detach the hooks from the model."""
        for handle in self._handles:
            handle.remove()


def quantize(values: torch.Tensor) -> torch.Tensor:
    """Per-image values to fixed-point int64 (exact, associative sums)."""
    values = values.detach().double()
    if not torch.isfinite(values).all() or values.abs().max() > _MAX_ABS:
        raise OverflowError("activation statistics are not finite or exceed the fixed-point range; "
                            "check the observer and the input normalisation")
    return torch.round(values * 2.0**FIXED_POINT_BITS).long()


@dataclass
class ClassStatSums:
    """Additive per-class sums of per-image statistics for every hooked layer of one observer.

    `sums[layer][stat]` has shape (num_classes, ...) and `counts` (num_classes,), all int64.
    `merge` is exact, so shards of the training set can be summed in any grouping.
    """

    num_classes: int
    counts: torch.Tensor = None
    sums: list[dict[str, torch.Tensor]] = field(default_factory=list)

    def __post_init__(self):
        if self.counts is None:
            self.counts = torch.zeros(self.num_classes, dtype=torch.long)

    def add(self, records: list[dict[str, torch.Tensor]], labels: torch.Tensor) -> None:
        """Add one batch: `records` from `StatisticHooks(mode="image")`, `labels` (B,)."""
        labels = labels.cpu().long()
        self.counts += torch.bincount(labels, minlength=self.num_classes)
        if not self.sums:
            self.sums = [{k: torch.zeros((self.num_classes, *v.shape[1:]), dtype=torch.long)
                          for k, v in rec.items()} for rec in records]
        for layer_sums, rec in zip(self.sums, records):
            for key, values in rec.items():
                layer_sums[key].index_add_(0, labels, quantize(values.cpu()))

    def merge(self, other: "ClassStatSums") -> "ClassStatSums":
        """Exact sum of two accumulators (either may be empty)."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge sums over {other.num_classes} and {self.num_classes} classes")
        out = ClassStatSums(self.num_classes, self.counts + other.counts)
        if not self.sums or not other.sums:
            out.sums = [{k: v.clone() for k, v in d.items()} for d in (self.sums or other.sums)]
        else:
            out.sums = [{k: a[k] + b[k] for k in a} for a, b in zip(self.sums, other.sums)]
        return out

    def state_dict(self) -> dict:
        """Plain tensors, for `torch.save` / the object store."""
        return {"num_classes": self.num_classes, "counts": self.counts, "sums": self.sums}

    @classmethod
    def from_state_dict(cls, state: dict) -> "ClassStatSums":
        """Inverse of `state_dict`."""
        return cls(int(state["num_classes"]), state["counts"], list(state["sums"]))


@dataclass
class LayerTargets:
    """Matching targets of one hooked layer: `global_[stat]` (...) and `per_class[stat]` (K, ...)."""

    kind: str
    global_: dict[str, torch.Tensor]
    per_class: dict[str, torch.Tensor]

    def to(self, device: torch.device | str) -> "LayerTargets":
        """A copy on `device`."""
        return LayerTargets(self.kind, {k: v.to(device) for k, v in self.global_.items()},
                            {k: v.to(device) for k, v in self.per_class.items()})


def compute_targets(sums: ClassStatSums, layers: list[HookedLayer]) -> list[LayerTargets]:
    """Turn per-class sums into global and per-class targets (float32), one entry per hooked layer.

    Per-class targets: average over the class's images of each image's spatial mean / variance.
    Global Conv targets: pixel mean and variance over the whole training set (from the sums of per-
    image means and mean squares). Global BN targets: the layer's own running statistics.
    A class without images falls back to the global target.
    """
    scale = 2.0**FIXED_POINT_BITS
    counts = sums.counts.double()
    total = counts.sum()
    targets = []
    for layer, layer_sums in zip(layers, sums.sums):
        def per_class(key: str) -> torch.Tensor:
            shape = (-1,) + (1,) * (layer_sums[key].dim() - 1)
            return layer_sums[key].double() / scale / counts.clamp(min=1).view(shape)

        def pixel_moments(prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
            mean = layer_sums[f"{prefix}mean"].double().sum(0) / scale / total
            sq = layer_sums[f"{prefix}sq"].double().sum(0) / scale / total
            return mean, (sq - mean**2).clamp(min=0)

        glob: dict[str, torch.Tensor] = {}
        if layer.kind == "bn":
            glob["mean"] = layer.module.running_mean.detach().double().cpu()
            glob["var"] = layer.module.running_var.detach().double().cpu()
        else:
            glob["mean"], glob["var"] = pixel_moments("")
        if "patch_mean" in layer_sums:
            glob["patch_mean"], glob["patch_var"] = pixel_moments("patch_")
        cls = {k: per_class(k) for k in glob}
        empty = counts == 0
        for k in cls:
            cls[k][empty] = glob[k]
        targets.append(LayerTargets(layer.kind, {k: v.float() for k, v in glob.items()},
                                    {k: v.float() for k, v in cls.items()}))
    return targets
