"""Throughput of the three GPU stages on one device, Ray-free, and the ImageNet-1k IPC 10 estimate.

    python -m benchmarks.gpu                                  # CUDA: 224 px, bf16 vs fp32
    python -m benchmarks.gpu --device cpu --size 32 --quick   # a smoke run anywhere

With random weights and random images (speed does not depend on their values) it times, after a
warm-up, with the device synchronised around every measurement:
- statistics: images/s of `StatisticsPass` over batches of 256 with the five torchvision observers of
  EDC's ImageNet setting (every BN/Conv input hooked, patch 16) and the ensemble loss;
- synthesis: iterations/s of `synthesize_unit` on a unit of 100 images (10 classes x IPC 10) against
  the same five observers round-robin, with the flatness term; eager, and with `--compile` compiled;
- student: optimiser steps/s of `StudentTrainer` (torchvision resnet18, batch 100, the four relabel
  teachers, RandAugment + crops + CutMix on the device).
Each at fp32 and bf16. From those it estimates ImageNet-1k IPC 10 on `--gpus` devices: one statistics
pass over 1,281,167 images, 100 units x 2000 iterations, and 2 sets x 300 epochs x 100 steps of
students. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from edc_ray.algo.condense import StatisticsPass, observer_layers
from edc_ray.algo.stats import compute_targets
from edc_ray.algo.student import StudentTrainer
from edc_ray.algo.synthesis import Observer, synthesize_unit
from edc_ray.config import EvaluationConfig, StatisticsConfig, SynthesisConfig
from edc_ray.models import create_model

OBSERVERS = ("torchvision:resnet18", "torchvision:mobilenet_v2", "torchvision:efficientnet_b0",
             "torchvision:shufflenet_v2_x0_5", "torchvision:alexnet")
TEACHERS = (0, 1, 3, 4)  # EDC's relabel teachers for ImageNet
IMAGENET_TRAIN, CLASSES = 1_281_167, 1000


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, repeats: int, device: torch.device) -> float:
    """Seconds per call of `fn` (one warm-up call first)."""
    fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def statistics_rate(models, size: int, batch: int, precision: str, device: torch.device, repeats: int) -> float:
    cfg = StatisticsConfig(patch_size=16, batch_size=batch, precision=precision)
    scan = StatisticsPass(models, CLASSES, cfg, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], device)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, CLASSES, (batch,), device=device)
    seconds = timed(lambda: scan.add(images, labels), repeats, device)
    scan.close()
    return batch / seconds


def synthesis_rate(models, size: int, precision: str, compile_step: bool, device: torch.device,
                   iterations: int) -> float:
    stats = StatisticsConfig(patch_size=16)
    observers = []
    for model in models:  # targets from one batch of random images: values do not change the cost
        scan = StatisticsPass([model], CLASSES, stats, [0.5] * 3, [0.25] * 3, device)
        scan.add(torch.randint(0, 256, (20, 3, size, size), dtype=torch.uint8, device=device),
                 torch.arange(20, device=device) % CLASSES)
        scan.close()
        sums = scan.sums[0]
        layers = observer_layers(model, stats)
        observers.append(Observer(model, layers, compute_targets(sums.totals(), sums, layers), list(range(CLASSES))))
    x0 = torch.randn(100, 3, size, size, device=device)
    labels = torch.arange(100, device=device) // 10
    bounds = (torch.full((1, 3, 1, 1), -3.0, device=device), torch.full((1, 3, 1, 1), 3.0, device=device))
    cfg = SynthesisConfig(iterations=iterations, precision=precision, compile=compile_step, r=0.1)

    def unit() -> None:
        synthesize_unit(x0, labels, observers, cfg, bounds, seed=0)

    return iterations / timed(unit, 1, device)


def student_rate(models, size: int, precision: str, device: torch.device, steps: int) -> float:
    cfg = EvaluationConfig(batch_size=100, precision=precision, min_scale=0.5)
    student = create_model("torchvision:resnet18", num_classes=CLASSES, in_chans=3, image_size=size)
    trainer = StudentTrainer(student, [models[i] for i in TEACHERS], cfg, [0.5] * 3, [0.25] * 3, 100, device)
    images = torch.randint(0, 256, (100, 3, size, size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, CLASSES, (100,), device=device)
    generator = torch.Generator().manual_seed(0)

    def run() -> None:
        for _ in range(steps):
            trainer.step(images, labels, generator)

    return steps / timed(run, 1, device)


def estimate(rates: dict, gpus: int) -> dict:
    """Minutes of each stage of ImageNet-1k IPC 10 on `gpus` devices at the measured rates."""
    stats_min = IMAGENET_TRAIN / rates["statistics_images_per_s"] / gpus / 60
    synth_min = 100 * 2000 / rates["synthesis_iterations_per_s"] / gpus / 60
    student_min = 2 * 300 * 100 / rates["student_steps_per_s"] / gpus / 60
    return {"statistics_min": stats_min, "synthesis_min": synth_min, "evaluation_min": student_min,
            "total_min": stats_min + synth_min + student_min}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--gpus", type=int, default=4, help="devices of the estimate")
    parser.add_argument("--quick", action="store_true", help="a few repeats only (a smoke run)")
    parser.add_argument("--compile", action="store_true", help="also time the compiled synthesis step")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    models = [create_model(a, num_classes=CLASSES, in_chans=3, image_size=args.size).eval().to(device)
              for a in OBSERVERS]
    repeats, iterations, steps = (1, 5, 2) if args.quick else (20, 50, 30)
    result: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "size": args.size, "torch": torch.__version__}
    for precision in args.precisions:
        rates = {"statistics_images_per_s": statistics_rate(models, args.size, 256 if not args.quick else 8,
                                                             precision, device, repeats),
                 "synthesis_iterations_per_s": synthesis_rate(models, args.size, precision, False, device,
                                                              iterations),
                 "student_steps_per_s": student_rate(models, args.size, precision, device, steps)}
        if args.compile:
            rates["synthesis_compiled_iterations_per_s"] = synthesis_rate(models, args.size, precision, True,
                                                                          device, iterations)
        rates["imagenet1k_ipc10_estimate"] = estimate(rates, args.gpus)
        result[precision] = rates
        print(f"[gpu] {precision}: " + json.dumps(rates), flush=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
