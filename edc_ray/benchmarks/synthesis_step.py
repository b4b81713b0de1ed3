"""Cost of one synthesis iteration vs a bare forward + backward of the same observer.

    python -m edc_ray.benchmarks.synthesis_step --batch 100 --size 28 --arch convnet_w128 --threads 2

The unit is `batch` grayscale images; the observer has random weights and random statistic targets
(the cost does not depend on their values). "bare" is forward + cross-entropy + backward to the pixels
with frozen weights, the minimal step a pixel optimisation needs; "full" is `synthesize_unit`'s step:
per-image crops, hooks, momentum-smoothed class-aware matching, the flatness forward, Adam, clamping.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from edc_ray.algo.stats import ClassStatSums, StatisticHooks, compute_targets, hooked_layers
from edc_ray.algo.synthesis import Observer, synthesize_unit
from edc_ray.config import SynthesisConfig
from edc_ray.models import create_model


def random_observer(arch: str, num_classes: int, size: int, patch: int) -> Observer:
    """An observer with targets from one pass of random images (values do not matter for timing)."""
    model = create_model(arch, num_classes=num_classes, in_chans=1, image_size=size).eval()
    layers = hooked_layers(model, patch=patch)
    hooks = StatisticHooks(layers, mode="image")
    sums = ClassStatSums(num_classes)
    with torch.no_grad(), hooks.capture() as records:
        model(torch.randn(2 * num_classes, 1, size, size))
    sums.add(records, torch.arange(2 * num_classes) % num_classes)
    hooks.remove()
    return Observer(model, layers, compute_targets(sums, layers))


def time_per_iter(fn, iterations: int, repeats: int) -> float:
    """Best-of-`repeats` seconds per iteration of `fn(iterations)` after a warm-up."""
    fn(2)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(iterations)
        best = min(best, (time.perf_counter() - start) / iterations)
    return best


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--arch", default="convnet_w128")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    num_classes = 10
    obs = random_observer(args.arch, num_classes, args.size, patch=4)
    x0 = torch.randn(args.batch, 1, args.size, args.size)
    labels = torch.arange(args.batch) % num_classes
    bounds = (torch.full((1, 1, 1, 1), -3.0), torch.full((1, 1, 1, 1), 3.0))

    def bare(n: int) -> None:
        x = x0.clone().requires_grad_(True)
        for _ in range(n):
            F.cross_entropy(obs.model(x), labels).backward()

    def full(n: int, **overrides) -> None:
        cfg = SynthesisConfig(iterations=n, **overrides)
        synthesize_unit(x0, labels, [obs], cfg, bounds, seed=0)

    t_bare = time_per_iter(bare, args.iterations, args.repeats)
    t_full = time_per_iter(full, args.iterations, args.repeats)
    t_noflat = time_per_iter(lambda n: full(n, flatness_weight=0.0), args.iterations, args.repeats)
    result = {"bare_ms": 1e3 * t_bare, "full_ms": 1e3 * t_full, "full_no_flatness_ms": 1e3 * t_noflat,
              "ratio": t_full / t_bare, "ratio_no_flatness": t_noflat / t_bare,
              "threads": torch.get_num_threads()}
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    return result


if __name__ == "__main__":
    main()
