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
import functools
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

FIXED_POINT_BITS = 24  # resolution 6e-8; int64 then holds sums up to ~5e11
_MAX_ABS = 2.0**38  # per-image value bound: 2**24 images of it still fit in int64


def patch_resize(h: torch.Tensor, patch: int) -> torch.Tensor:
    """Resize `h` bilinearly so that its height and width are multiples of `patch` (unchanged if so)."""
    height, width = h.shape[-2:]
    th, tw = -(-height // patch) * patch, -(-width // patch) * patch
    if (th, tw) != (height, width):
        h = F.interpolate(h, size=(th, tw), mode="bilinear", align_corners=False)
    return h


def _image_moments(h: torch.Tensor, patch: int | None) -> dict[str, torch.Tensor]:
    """Per-image means and mean squares of `h`: per channel over (H, W) and per patch over (C, P, P).

    Plain means of x and x^2 (the variance follows as E[x^2] - E[x]^2). Patch means average over
    channels first and pool afterwards: both are linear, so the result is the same at a fraction of the
    cost.
    """
    square = h * h
    out = {"mean": h.mean((2, 3)), "sq": square.mean((2, 3))}
    if patch:
        resized = patch_resize(h, patch)
        squared = square if resized is h else resized * resized
        out["patch_mean"] = F.avg_pool2d(resized.mean(1, keepdim=True), patch)[:, 0]  # (B, nH, nW)
        out["patch_sq"] = F.avg_pool2d(squared.mean(1, keepdim=True), patch)[:, 0]
    return out


@functools.lru_cache(maxsize=64)
def _resize_matrix(size: int, target: int, device: str, transposed: bool = False) -> torch.Tensor:
    """M (size x target) with `v @ M` = bilinear (align_corners=False) resize of rows `v` to `target`
    (M^T, contiguous, with `transposed`)."""
    eye = torch.eye(size, device=device)[None]
    matrix = F.interpolate(eye, size=target, mode="linear", align_corners=False)[0]
    return matrix.t().contiguous() if transposed else matrix


def _patch_grid(b: int, c: int, height: int, width: int, patch: int) -> tuple[int, ...]:
    """The (B, C, nH, P, nW, P) view of a layer input resized to a multiple of `patch`."""
    th, tw = -(-height // patch) * patch, -(-width // patch) * patch
    return (b, c, th // patch, patch, tw // patch, patch)


def _resize_rows_cols(x: torch.Tensor, rows_t: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """`rows_t @ x @ cols` for every (B, C) plane of `x`: a bilinear resize (or its transpose) as one
    matrix product over all rows and one batched product over the planes."""
    b, c, height, width = x.shape
    planes = torch.mm(x.view(-1, width), cols).view(b * c, height, cols.shape[1])
    return torch.bmm(rows_t.expand(b * c, *rows_t.shape), planes).view(b, c, rows_t.shape[0], cols.shape[1])


def _as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


class _LayerSums(torch.autograd.Function):
    """A layer input's sums of h and h^2 as one flat block, with a hand-written backward.

    Block: [sum h per channel over (B, H, W) (C), sum h per patch over (B, C, P, P) (nH*nW),
    sum h^2 per channel (C), sum h^2 per patch (nH*nW)] (patch parts only with `patch`), the input
    resized bilinearly to a multiple of P first (as matrix products with the interpolation weights,
    which equal `F.interpolate` and run faster on CPU). Sums rather than moments keep the backward to one
    pass: d sum h / dh = 1 and d sum h^2 / dh = 2h, so the gradient is g_sum + 2 g_sq h with per-channel
    and per-patch coefficients (plus, for a resized input, the resize's transpose), instead of autograd's
    graph of reductions and interpolation backward. Means and variances follow for all layers at once
    (`block_moments`).
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, patch: int | None) -> torch.Tensor:
        x = _as_dtype(h, torch.float32).contiguous()  # views below need it (e.g. after a channel shuffle)
        b, c, height, width = x.shape
        square = x * x
        sum_c, sq_c = x.sum((0, 2, 3)), square.sum((0, 2, 3))
        resized = None
        if not patch:
            out = torch.cat([sum_c, sq_c])
        else:
            grid = _patch_grid(b, c, height, width, patch)
            source, source_sq = x, square
            if (grid[2] * patch, grid[4] * patch) != (height, width):
                resized = _resize_rows_cols(x, _resize_matrix(height, grid[2] * patch, str(x.device), True),
                                            _resize_matrix(width, grid[4] * patch, str(x.device)))
                source, source_sq = resized, resized * resized
            out = torch.cat([sum_c, source.view(grid).sum((0, 1, 3, 5)).view(-1),
                             sq_c, source_sq.view(grid).sum((0, 1, 3, 5)).view(-1)])
        ctx.patch, ctx.dtype = patch, h.dtype
        ctx.save_for_backward(x, resized)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, resized = ctx.saved_tensors
        b, c, height, width = x.shape
        if not ctx.patch:
            g = grad.view(2, c, 1, 1)
            return _as_dtype(torch.addcmul(g[0], g[1], x, value=2.0), ctx.dtype), None
        grid = _patch_grid(b, c, height, width, ctx.patch)
        n = grid[2] * grid[4]
        g_sum, g_sum_p, g_sq, g_sq_p = grad.split([c, n, c, n])
        g_sum_p, g_sq_p = g_sum_p.view(grid[2], 1, grid[4], 1), g_sq_p.view(grid[2], 1, grid[4], 1)
        if resized is None:  # both parts on the (B, C, nH, P, nW, P) view of x
            return _as_dtype(torch.addcmul(g_sum.view(c, 1, 1, 1, 1) + g_sum_p, g_sq.view(c, 1, 1, 1, 1) + g_sq_p,
                                           x.view(grid), value=2.0).view(x.shape), ctx.dtype), None
        # the resize's transpose takes the patch part, a (th, tw) map per plane, back to (height, width)
        pixels = torch.addcmul(g_sum_p, g_sq_p, resized.view(grid), value=2.0).view(resized.shape)
        back = _resize_rows_cols(pixels, _resize_matrix(height, resized.shape[2], str(x.device)),
                                 _resize_matrix(width, resized.shape[3], str(x.device), True))
        return _as_dtype(torch.addcmul(back.add_(g_sum.view(c, 1, 1)), g_sq.view(c, 1, 1), x, value=2.0),
                         ctx.dtype), None


def layer_sums(h: torch.Tensor, patch: int | None) -> torch.Tensor:
    """A batch's sums of one layer input (see `_LayerSums`) as one float32 vector; differentiable."""
    return _LayerSums.apply(h, patch)


def sums_spec(h: torch.Tensor, patch: int | None) -> tuple[int, int, int, int]:
    """(channels, patch cells, values per channel sum, values per patch sum) of `layer_sums(h, patch)`."""
    b, c, height, width = h.shape
    if not patch:
        return c, 0, b * height * width, 1
    grid = _patch_grid(b, c, height, width, patch)
    return c, grid[2] * grid[4], b * height * width, b * c * patch * patch


@functools.lru_cache(maxsize=256)
def _moment_layout(spec: tuple[tuple[int, int, int, int], ...], device: str
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For concatenated `layer_sums` blocks of layers `spec`: per element 1 / count, the index of the
    element's sum of h (itself for a sum of h), and 1.0 where the element is a sum of h^2."""
    inverse, pair, is_square, offset = [], [], [], 0
    for channels, cells, per_channel, per_cell in spec:
        counts = [per_channel] * channels + [per_cell] * cells
        inverse += [1.0 / n for n in counts] * 2
        own = list(range(offset, offset + channels + cells))
        pair += own + own
        is_square += [0.0] * len(own) + [1.0] * len(own)
        offset += 2 * len(own)
    return (torch.tensor(inverse, device=device), torch.tensor(pair, dtype=torch.long, device=device),
            torch.tensor(is_square, device=device))


def block_moments(flat: torch.Tensor, spec: tuple[tuple[int, int, int, int], ...]) -> torch.Tensor:
    """Concatenated `layer_sums` blocks to moments, layer by layer [mean (C), patch mean (nH*nW),
    var (C), patch var (nH*nW)]: a handful of kernels for all layers, var = E[h^2] - E[h]^2."""
    inverse, pair, is_square = _moment_layout(spec, str(flat.device))
    moments = flat * inverse
    means = moments[pair]
    return torch.addcmul(moments, means * is_square, means, value=-1.0)


def layer_moments(h: torch.Tensor, patch: int | None) -> torch.Tensor:
    """A batch's statistics of one layer input as one float32 vector: [mean (C), patch mean (nH*nW),
    var (C), patch var (nH*nW)] (the patch parts only with `patch`); differentiable."""
    return block_moments(layer_sums(h, patch), (sums_spec(h, patch),))


def split_moments(block: torch.Tensor, channels: int, patch: bool) -> dict[str, torch.Tensor]:
    """The named statistics of a `layer_moments` block (patch parts flattened)."""
    n = (len(block) - 2 * channels) // 2 if patch else 0
    mean, pmean, var, pvar = block.split([channels, n, channels, n])
    return {"mean": mean, "var": var, **({"patch_mean": pmean, "patch_var": pvar} if patch else {})}


def batch_statistics(h: torch.Tensor, patch: int | None) -> dict[str, torch.Tensor]:
    """Channel (and patch) mean/var of a batch, in float32: shapes (C,) and (nH, nW)."""
    stats = split_moments(layer_moments(h, patch), h.shape[1], bool(patch))
    if patch:
        grid = (-(-h.shape[2] // patch), -(-h.shape[3] // patch))
        stats["patch_mean"] = stats["patch_mean"].view(grid)
        stats["patch_var"] = stats["patch_var"].view(grid)
    return stats


def image_statistics(h: torch.Tensor, patch: int | None) -> dict[str, torch.Tensor]:
    """Per-image spatial mean/var, mean of squares, and patch versions (float32): shapes (B, C), (B, nH, nW)."""
    out = _image_moments(h.float(), patch)
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

    `mode="batch"` records `layer_sums` blocks (with gradients, for synthesis; `batch_moments` turns
    them into the flat moment vector the matching compares); `mode="image"` records
    `image_statistics` dicts (for the statistics pass). Recording happens only inside `capture()`, so
    the same observer can run hook-free forwards (e.g. the flatness term's EMA images).
    """

    def __init__(self, layers: list[HookedLayer], mode: str = "batch"):
        if mode not in ("batch", "image"):
            raise ValueError(f"mode {mode!r} is not allowed; choose 'batch' or 'image'")
        self.layers = layers
        self.mode = mode
        self.records: list = [None] * len(layers)
        self.specs: list = [None] * len(layers)
        self._active = False
        self._handles = [layer.module.register_forward_pre_hook(self._hook(i))
                         for i, layer in enumerate(layers)]

    def _hook(self, index: int):
        patch = self.layers[index].patch

        def hook(module: nn.Module, inputs: tuple) -> None:
            if not self._active:
                return
            if self.mode == "batch":
                self.records[index] = layer_sums(inputs[0], patch)
                self.specs[index] = sums_spec(inputs[0], patch)
            else:
                self.records[index] = image_statistics(inputs[0], patch)
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

    def batch_moments(self) -> torch.Tensor:
        """The last capture's moments of every layer as one flat vector (layer by layer, each
        [mean, patch mean, var, patch var]); empty without hooked layers. Batch mode only."""
        if not self.records:
            return torch.zeros(0)
        return block_moments(torch.cat(self.records), tuple(self.specs))

    def remove(self) -> None:
        """Detach the hooks from the model."""
        for handle in self._handles:
            handle.remove()


def quantize(values: torch.Tensor) -> torch.Tensor:
    """Per-image values to fixed-point int64 (exact, associative sums); range checked by `check_range`."""
    return torch.round(values.detach().double() * 2.0**FIXED_POINT_BITS).long()


def out_of_range(values: torch.Tensor) -> torch.Tensor:
    """A 0-dim bool tensor: whether any value is not finite or exceeds the fixed-point range (no host sync)."""
    values = values.detach()
    if values.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=values.device)
    return ~torch.isfinite(values).all() | (values.abs().amax() > _MAX_ABS)


RANGE_ERROR = ("activation statistics are not finite or exceed the fixed-point range; check the observer and "
               "the input normalisation")


def _sum_rows(layer_sums: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    return [{k: v.sum(0) for k, v in d.items()} for d in layer_sums]


@dataclass
class StatTotals:
    """Per-image statistic sums over every class (the global targets' input) and the image count."""

    count: int
    sums: list[dict[str, torch.Tensor]]

    def merge(self, other: "StatTotals") -> "StatTotals":
        """Exact sum of two totals (either may be empty)."""
        if not self.sums or not other.sums:
            return StatTotals(self.count + other.count, self.sums or other.sums)
        return StatTotals(self.count + other.count,
                          [{k: a[k] + b[k] for k in a} for a, b in zip(self.sums, other.sums)])

    def state_dict(self) -> dict:
        """Plain tensors, for `torch.save`."""
        return {"count": self.count, "sums": self.sums}

    @classmethod
    def from_state_dict(cls, state: dict) -> "StatTotals":
        """Inverse of `state_dict`."""
        return cls(int(state["count"]), list(state["sums"]))


@dataclass
class ClassStatSums:
    """Additive per-class sums of per-image statistics for every hooked layer of one observer.

    `sums[layer][stat]` has shape (num_classes, ...) and `counts` (num_classes,), all int64, on the
    device of the first batch added. `merge` is exact, so shards of the training set can be summed in
    any grouping; `block` cuts out a range of classes (rows relabelled from 0).
    """

    num_classes: int
    counts: torch.Tensor = None
    sums: list[dict[str, torch.Tensor]] = field(default_factory=list)
    _bad: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.counts is None:
            self.counts = torch.zeros(self.num_classes, dtype=torch.long)

    def add(self, records: list[dict[str, torch.Tensor]], labels: torch.Tensor) -> None:
        """Add one batch: `records` from `StatisticHooks(mode="image")`, `labels` (B,), on the records' device.

        Nothing here waits for the device; `check_range` (called by `state_dict`) raises if any value was
        out of the fixed-point range.
        """
        device = records[0]["mean"].device if records else labels.device
        labels = labels.to(device).long()
        if not self.sums:
            self.counts = self.counts.to(device)
            self.sums = [{k: torch.zeros((self.num_classes, *v.shape[1:]), dtype=torch.long, device=device)
                          for k, v in rec.items()} for rec in records]
        self.counts += torch.bincount(labels, minlength=self.num_classes)
        bad = torch.zeros((), dtype=torch.bool, device=device) if self._bad is None else self._bad
        for layer_sums, rec in zip(self.sums, records):
            for key, values in rec.items():
                bad = bad | out_of_range(values)
                layer_sums[key].index_add_(0, labels, quantize(values))
        self._bad = bad

    def check_range(self) -> None:
        """Raise OverflowError if any added value was out of range (one device sync)."""
        if self._bad is not None and bool(self._bad):
            raise OverflowError(RANGE_ERROR)

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

    def block(self, first: int, stop: int) -> "ClassStatSums":
        """The sums of classes `first` .. `stop - 1`, as an accumulator over `stop - first` classes (CPU)."""
        self.check_range()
        return ClassStatSums(stop - first, self.counts[first:stop].cpu().clone(),
                             [{k: v[first:stop].cpu().clone() for k, v in d.items()} for d in self.sums])

    @classmethod
    def concat(cls, parts: list["ClassStatSums"]) -> "ClassStatSums":
        """One accumulator whose rows are those of `parts`, in order (e.g. one-class sums of a unit)."""
        return cls(sum(p.num_classes for p in parts), torch.cat([p.counts for p in parts]),
                   [{k: torch.cat([p.sums[i][k] for p in parts]) for k in layer}
                    for i, layer in enumerate(parts[0].sums)])

    def totals(self) -> StatTotals:
        """Sums over all classes."""
        return StatTotals(int(self.counts.sum()), _sum_rows(self.sums))

    def state_dict(self) -> dict:
        """Plain CPU tensors, for `torch.save` / the object store."""
        self.check_range()
        return {"num_classes": self.num_classes, "counts": self.counts.cpu(),
                "sums": [{k: v.cpu() for k, v in d.items()} for d in self.sums]}

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


def compute_targets(totals: StatTotals, class_sums: ClassStatSums, layers: list[HookedLayer]
                    ) -> list[LayerTargets]:
    """Global and per-class targets (float32), one entry per hooked layer.

    `totals` are the sums over the whole training set; `class_sums` those of the classes whose targets
    are wanted (row i of every `per_class` tensor is row i of `class_sums`). Per-class targets: average
    over the class's images of each image's spatial mean / variance. Global Conv targets: pixel mean and
    variance over the whole training set (from the sums of per-image means and mean squares). Global BN
    targets: the layer's own running statistics. A class without images falls back to the global target.
    """
    scale = 2.0**FIXED_POINT_BITS
    counts = class_sums.counts.double()
    targets = []
    for layer, layer_sums, layer_totals in zip(layers, class_sums.sums, totals.sums):
        def per_class(key: str) -> torch.Tensor:
            shape = (-1,) + (1,) * (layer_sums[key].dim() - 1)
            return layer_sums[key].double() / scale / counts.clamp(min=1).view(shape)

        def pixel_moments(prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
            mean = layer_totals[f"{prefix}mean"].double() / scale / totals.count
            sq = layer_totals[f"{prefix}sq"].double() / scale / totals.count
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
