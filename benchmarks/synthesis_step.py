"""Cost of one synthesis iteration vs a bare forward + backward of the same observer: time and ATen ops.

    python -m benchmarks.synthesis_step --arch torchvision:resnet18 --size 112 --batch 10 --threads 1
    python -m benchmarks.synthesis_step --arch torchvision:mobilenet_v2 --size 112 --json

The unit is `batch` RGB images of 1000 classes (ImageNet-shaped; `--channels 1 --classes 10` for the
small datasets); the observer has random weights and targets from one pass of random images (the cost
does not depend on their values). "bare" is forward + cross-entropy + backward to the pixels with frozen
weights, the least a pixel optimisation needs; "full" is `synthesize_unit`'s step: per-image crops,
hooks, momentum-smoothed class-aware matching over BN + Conv + patch statistics, the flatness forward,
Adam, clamping; "no flatness" is the same without the flatness term. Operation counts are the ATen
operators torch.profiler records per iteration (nested calls included; per-unit setup left out by
differencing 2 and 6 iterations), the same rule for both sides.
With `--json` the last line is one JSON object (arch, bare_ms, full_ms, ratio, bare_ops, full_ops, ...).
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from edc_ray.algo.stats import ClassStatSums, StatisticHooks, compute_targets, hooked_layers
from edc_ray.algo.synthesis import Observer, synthesize_unit
from edc_ray.config import SynthesisConfig
from edc_ray.models import create_model


def random_observer(arch: str, num_classes: int, channels: int, size: int, patch: int) -> Observer:
    """An observer of random weights with targets from one pass of random images."""
    model = create_model(arch, num_classes=num_classes, in_chans=channels, image_size=size).eval()
    layers = hooked_layers(model, patch=patch)
    hooks = StatisticHooks(layers, mode="image")
    sums = ClassStatSums(num_classes)
    with torch.no_grad(), hooks.capture() as records:
        model(torch.randn(16, channels, size, size))
    sums.add(records, torch.arange(16) % num_classes)
    hooks.remove()
    return Observer(model, layers, compute_targets(sums.totals(), sums, layers), list(range(num_classes)))


def time_per_iter(fn, iterations: int, repeats: int) -> float:
    """Best-of-`repeats` seconds per iteration of `fn(iterations)` after a warm-up."""
    fn(2)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(iterations)
        best = min(best, (time.perf_counter() - start) / iterations)
    return best


def aten_ops(fn, iterations: int) -> int:
    """ATen operator calls of `fn(iterations)`, by torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(iterations)
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def ops_per_iter(fn, low: int = 2, high: int = 6) -> float:
    """ATen operator calls per iteration: the difference between `high` and `low` iterations, so that
    per-unit setup (targets, optimiser) is left out, as it is amortised over thousands of iterations."""
    fn(1)
    return (aten_ops(fn, high) - aten_ops(fn, low)) / (high - low)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="torchvision:resnet18")
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--patch", type=int, default=16, help="patch size P (16 for ImageNet-sized images)")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: leave default)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line last")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    obs = random_observer(args.arch, args.classes, args.channels, args.size, args.patch)
    x0 = torch.randn(args.batch, args.channels, args.size, args.size)
    labels = torch.arange(args.batch) % args.classes
    bounds = (torch.full((1, 1, 1, 1), -3.0), torch.full((1, 1, 1, 1), 3.0))

    def bare(n: int) -> None:
        x = x0.clone().requires_grad_(True)
        for _ in range(n):
            F.cross_entropy(obs.model(x), labels).backward()

    def full(n: int, **overrides) -> None:
        synthesize_unit(x0, labels, [obs], SynthesisConfig(iterations=n, **overrides), bounds, seed=0)

    def no_flatness(n: int) -> None:
        full(n, flatness_weight=0.0)

    result = {"arch": args.arch, "size": args.size, "batch": args.batch, "threads": torch.get_num_threads()}
    for name, fn in (("bare", bare), ("full", full), ("no_flatness", no_flatness)):
        result[f"{name}_ms"] = 1e3 * time_per_iter(fn, args.iterations, args.repeats)
        result[f"{name}_ops"] = ops_per_iter(fn)
    result["ratio"] = result["full_ms"] / result["bare_ms"]
    result["ratio_no_flatness"] = result["no_flatness_ms"] / result["bare_ms"]
    result["ops_ratio"] = result["full_ops"] / result["bare_ops"]
    result["ops_ratio_no_flatness"] = result["no_flatness_ops"] / result["bare_ops"]
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
