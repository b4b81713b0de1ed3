"""Small pieces shared by the stages: dataset geometry, observer payloads, devices, threads."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from edc_ray.models import create_model
from edc_ray.storage.shards import DatasetInfo


@dataclass(frozen=True)
class DatasetMeta:
    """What every worker needs to know about the dataset to build models and normalise images."""

    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_info(cls, info: DatasetInfo) -> "DatasetMeta":
        """From a prepared dataset's `_info.json`."""
        return cls(len(info.classes), info.channels, info.image_size, tuple(info.mean), tuple(info.std))


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
