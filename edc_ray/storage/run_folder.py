"""The run folder (local path or s3://bucket/prefix): where every stage writes its outputs.

    <run>/config.yaml            resolved config, written first
    <run>/observers/<name>.pt    observer weights (+ <name>.json: arch, accuracy)
    <run>/stats/<name>.pt        statistic sums (per class, exact)
    <run>/candidates/pool.pt     the sampled real candidates with their ensemble losses
    <run>/distilled/unit-NNNNN.tar + _info.json
    <run>/baseline/random.tar    the random real subset at the same IPC
    <run>/eval/<name>/...        Ray Train storage (checkpoints, metrics)
    <run>/report.json  report.md  preview.png
"""
from __future__ import annotations

import io
from typing import Any

import torch

from edc_ray.storage import fsio


def torch_bytes(obj: Any) -> bytes:
    """`torch.save` into bytes."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def load_torch_bytes(data: bytes, where: str) -> Any:
    """`torch.load` of plain tensors/containers only (`weights_only=True`): no code runs from a file."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exn:  # a corrupt or malicious file: say which
        raise ValueError(f"cannot load {where}: {exn}") from exn


class RunFolder:
    """Paths and atomic reads/writes inside one run folder."""

    def __init__(self, root: str):
        self.root = root.rstrip("/")

    def path(self, *parts: str) -> str:
        """The URL of a file or folder inside the run."""
        return fsio.join(self.root, *parts)

    def exists(self, *parts: str) -> bool:
        """Whether that file exists."""
        return fsio.exists(self.path(*parts))

    def save_torch(self, obj: Any, *parts: str) -> str:
        """Write `obj` with `torch.save`, atomically; returns its URL."""
        url = self.path(*parts)
        fsio.atomic_write_bytes(url, torch_bytes(obj))
        return url

    def load_torch(self, *parts: str) -> Any:
        """Read a file written by `save_torch` (weights_only)."""
        url = self.path(*parts)
        return load_torch_bytes(fsio.read_bytes(url), url)

    def write_text(self, text: str, *parts: str) -> str:
        """Write UTF-8 text atomically; returns its URL."""
        url = self.path(*parts)
        fsio.atomic_write_bytes(url, text.encode("utf-8"))
        return url

    def write_json(self, obj: Any, *parts: str) -> str:
        """Write JSON atomically; returns its URL."""
        url = self.path(*parts)
        fsio.atomic_write_json(url, obj)
        return url

    def read_json(self, *parts: str) -> Any:
        """Read a JSON file of the run."""
        return fsio.read_json(self.path(*parts))

    def unit_shard(self, unit: int) -> str:
        """The distilled shard of one work unit."""
        return self.path("distilled", f"unit-{unit:05d}.tar")
