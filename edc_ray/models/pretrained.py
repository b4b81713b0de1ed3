"""What a pretrained observer brings with it: its preprocessing, its classes and its weights file.

EDC's ImageNet observers are torchvision's IMAGENET1K_V1 models (METHOD.md 1.1), named explicitly
(``pretrained: IMAGENET1K_V1``; ``true`` means the library's default, which for mobilenet_v2 is
IMAGENET1K_V2). Each was trained with its own normalisation and validated at a resize/crop ratio, and
classifies ImageNet-1k's classes in sorted-wnid order. Offline, the weights come from
``observers.models[i].weights`` (a path or ``s3://`` URL), from torch's hub cache
(``$TORCH_HOME/hub/checkpoints``), where :func:`missing_weights` says which file to put, or, for timm,
from a model folder named as the architecture ``timm:local-dir:<folder>`` (``config.json`` and the
weights, as timm's ``save_for_hf`` writes them).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

LOCAL_DIR = "timm:local-dir:"
WEIGHTS_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")  # the checkpoint files timm looks for in a folder


@dataclass(frozen=True)
class Preprocessing:
    """How a pretrained model's inputs were made: normalisation, validation resize ratio (resize / crop),
    interpolation, and how many classes it was trained on."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize_ratio: float
    interpolation: str
    num_classes: int


def _torchvision_weights(name: str, tag: bool | str):
    from torchvision import models

    enum = models.get_model_weights(name)
    if tag is True:
        return enum.DEFAULT
    try:
        return enum[tag]
    except KeyError:
        raise ValueError(f"torchvision:{name} has no weights {tag!r}; it has {[w.name for w in enum]}") from None


def local_dir(arch: str) -> str | None:
    """The model folder of a ``timm:local-dir:<folder>`` architecture (None for any other)."""
    return arch[len(LOCAL_DIR):] if arch.startswith(LOCAL_DIR) else None


def _local_dir_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{path} is missing: a timm model folder holds config.json and its weights "
                         "(model.safetensors or pytorch_model.bin, as timm.models.save_for_hf writes them)")
    with open(path) as f:
        cfg = json.load(f)
    pretrained = dict(cfg.get("pretrained_cfg", cfg))
    pretrained.setdefault("num_classes", cfg.get("num_classes"))
    return pretrained


def preprocessing(arch: str, tag: bool | str) -> Preprocessing | None:
    """The preprocessing of the pretrained weights ``tag`` of ``arch`` (None: not a library model)."""
    if (folder := local_dir(arch)) is not None:
        if tag is not True:
            raise ValueError(f"{arch} brings the weights of its folder: set pretrained: true, not {tag!r}")
        cfg = _local_dir_config(folder)
        from edc_ray.storage.dataset_info import IMAGENET_MEAN, IMAGENET_STD

        return Preprocessing(tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD)),
                             1 / cfg.get("crop_pct", 0.875), cfg.get("interpolation", "bilinear"),
                             int(cfg["num_classes"]))
    library, _, name = arch.partition(":")
    if library == "torchvision":
        weights = _torchvision_weights(name, tag)
        transform = weights.transforms()
        return Preprocessing(tuple(transform.mean), tuple(transform.std),
                             transform.resize_size[0] / transform.crop_size[0], transform.interpolation.value,
                             len(weights.meta["categories"]))
    if library == "timm":
        import timm

        cfg = timm.get_pretrained_cfg(name if tag is True else f"{name}.{tag}")
        if cfg is None:
            raise ValueError(f"timm has no pretrained config for {arch!r} with tag {tag!r}")
        return Preprocessing(tuple(cfg.mean), tuple(cfg.std), 1 / cfg.crop_pct, cfg.interpolation, cfg.num_classes)
    return None


def missing_weights(arch: str, tag: bool | str) -> str | None:
    """A message naming the file to fetch and where to put it, when the torchvision weights are not in
    torch's hub cache or a timm model folder lacks them; None when they are there (or the library keeps
    its own cache, as timm's hub does)."""
    if (folder := local_dir(arch)) is not None:
        files = os.listdir(folder) if os.path.isdir(folder) else []
        if "config.json" in files and any(f.endswith(WEIGHTS_SUFFIXES) for f in files):
            return None
        return (f"the timm model folder {folder} lacks config.json or its weights: put there what "
                "timm.models.save_for_hf writes (config.json and model.safetensors or pytorch_model.bin)")
    library, _, name = arch.partition(":")
    if library != "torchvision":
        return None
    import torch.hub

    url = _torchvision_weights(name, tag).url
    path = os.path.join(torch.hub.get_dir(), "checkpoints", url.rsplit("/", 1)[1])
    if os.path.exists(path):
        return None
    return (f"pretrained weights for {arch} ({tag}) are not here and may need the network: fetch {url} into "
            f"{path} (torch's hub cache; TORCH_HOME moves it), or set the observer's weights: to a copy of "
            "that file (path or s3:// URL)")
