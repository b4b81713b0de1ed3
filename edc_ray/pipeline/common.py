"""Small pieces shared by the stages: dataset geometry, observer payloads, devices, threads, memory."""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from edc_ray.models import create_model
from edc_ray.config import DataConfig
from edc_ray.models.pretrained import Preprocessing
from edc_ray.storage.dataset_info import DatasetInfo
from edc_ray.storage.images import ImageFit
from edc_ray.storage.shards import SampleSpec

PREVIEW_CLASSES = 20  # the classes the report shows (rows of preview.png and report.html)


@dataclass(frozen=True)
class DatasetMeta:
    """What every worker needs to know about the dataset to build models, normalise and read images.

    `any_size`: the dataset's images have any size and are fitted to `image_size` as they are read
    (`train_crop` / `train_crop_scale` for training views, `val_resize_ratio` for validation views
    and candidates).
    """

    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    any_size: bool = False
    train_crop: str = "random_resized"
    train_crop_scale: tuple[float, float] = (0.08, 1.0)
    val_resize_ratio: float = 8 / 7

    @classmethod
    def from_info(cls, info: DatasetInfo, data: DataConfig | None = None,
                  pretrained: Preprocessing | None = None) -> "DatasetMeta":
        """From a dataset's `_info.json` and the `data` config (which gives the size of images of any size);
        `pretrained` observers bring their own normalisation, which then replaces the dataset's."""
        data = data or DataConfig()
        mean, std = (pretrained.mean, pretrained.std) if pretrained is not None else info.normalisation()
        if info.image_size is not None:
            return cls(len(info.classes), info.channels, info.image_size, mean, std)
        if data.image_size is None:
            raise ValueError("data.image_size is required for a dataset whose images have any size")
        return cls(len(info.classes), info.channels, data.image_size, mean, std, True, data.train_crop,
                   tuple(data.train_crop_scale), data.val_resize_ratio)

    def fit(self, view: str, seed: int = 0) -> ImageFit | None:
        """How images are fitted for a `view` ("train" or "val"); None for fixed-size datasets."""
        if not self.any_size:
            return None
        if view == "train":
            return ImageFit(self.image_size, self.channels, self.train_crop, self.train_crop_scale,
                            resize_ratio=self.val_resize_ratio, seed=seed)
        return ImageFit(self.image_size, self.channels, "center", resize_ratio=self.val_resize_ratio)

    def spec(self, view: str = "val", seed: int = 0) -> SampleSpec:
        """What the dataset's samples become in a `view` (see `fit`)."""
        return SampleSpec(self.channels, self.image_size, self.num_classes, self.fit(view, seed))


def build_model(arch: str, meta: DatasetMeta) -> nn.Module:
    """`create_model` for this dataset's classes, channels and image size."""
    return create_model(arch, num_classes=meta.num_classes, in_chans=meta.channels,
                        image_size=meta.image_size)


def observer_payload(arch: str, model: nn.Module) -> dict:
    """An observer as plain numpy arrays: what goes into the object store once (zero-copy reads)."""
    return {"arch": arch, "state": {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}}


def model_from_payload(payload: dict, meta: DatasetMeta, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild an observer from its payload (the arrays are copied into fresh parameters)."""
    model = build_model(payload["arch"], meta)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in payload["state"].items()})
    return model.to(device).eval()


@dataclass(frozen=True)
class ObserverSet:
    """The observers of a run as they travel between stages: names, architectures and object refs.

    Each ref points at an `observer_payload` put into the object store once by the driver; workers
    rebuild the models they need with `load_models`.
    """

    names: tuple[str, ...]
    archs: tuple[str, ...]
    refs: tuple

    def subset(self, indices: Sequence[int] | None) -> "ObserverSet":
        """The observers at `indices` (None: all)."""
        if indices is None:
            return self
        return ObserverSet(tuple(self.names[i] for i in indices), tuple(self.archs[i] for i in indices),
                           tuple(self.refs[i] for i in indices))


def load_models(observers: ObserverSet, meta: DatasetMeta, device: torch.device | str = "cpu"
                ) -> tuple[list[nn.Module], int]:
    """The observers' models (eval mode, on `device`) and the bytes pulled from the object store."""
    import ray

    models, pulled = [], 0
    for ref in observers.refs:
        payload = ray.get(ref)
        pulled += sum(np.asarray(v).nbytes for v in payload["state"].values())
        models.append(model_from_payload(payload, meta, device))
    return models, pulled


class PeakMemory:
    """Samples this process's resident memory in a background thread; `peak_mib` is the highest seen
    (`start_mib` the resident memory when it started).

    Used as a context manager around a task's work, so that tasks report what they really needed
    (a Ray worker process outlives its tasks, so its lifetime maximum would not say).
    """

    def __init__(self, interval_s: float = 0.05):
        import psutil

        self._process = psutil.Process(os.getpid())
        self._interval = interval_s
        self._stop = threading.Event()
        self.start_mib = self._process.memory_info().rss / 2**20
        self.peak_mib = self.start_mib

    def _sample(self) -> None:
        self.peak_mib = max(self.peak_mib, self._process.memory_info().rss / 2**20)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def __enter__(self) -> "PeakMemory":
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def resolve_device(preference: str, gpu_ids: list | None = None) -> torch.device:
    """cuda when asked for (or 'auto' with a GPU assigned/visible), else cpu."""
    if preference == "cpu":
        return torch.device("cpu")
    has_gpu = torch.cuda.is_available() and (gpu_ids is None or len(gpu_ids) > 0)
    if preference == "cuda" and not has_gpu:
        raise RuntimeError("device 'cuda' was asked for but no CUDA device is available here")
    return torch.device("cuda" if has_gpu else "cpu")


def set_threads(num_cpus: float) -> None:
    """Give torch as many threads as the CPUs Ray reserved for this worker (at least one)."""
    torch.set_num_threads(max(1, int(num_cpus)))
