"""The run folder (local path or s3://bucket/prefix): where every stage writes its outputs.

    <run>/config.yaml                         resolved config, written first
    <run>/observers/<name>.pt                 observer weights (+ <name>.json: arch, accuracy)
    <run>/stats/parts/_plan.json              the statistics pass's shard groups, fixed by its first run
    <run>/stats/parts/task-NNNNN/...          one task's sums and candidates per class block, _done.json last
    <run>/stats/blocks/block-NNNNN.pt         a block's merged totals (marks the block's merge complete)
    <run>/stats/classes/class-NNNNN.pt        one class's statistic sums, every observer (exact int64)
    <run>/stats/global.pt                     the sums over all classes, every observer
    <run>/stats/_complete.json                marks the statistics complete
    <run>/candidates/class-NNNNN.tar          one class's scored real candidates (original bytes)
    <run>/candidates/_complete.json           marks the candidates complete (counts per class)
    <run>/distilled/unit-NNNNN.tar + _info.json
    <run>/initial/unit-NNNNN.tar              the real initial images of the units the report shows
    <run>/baseline/random-ipcK/unit-NNNNN.tar + _info.json   the random real subset at the same IPC
    <run>/eval/<name>-<evaluation key>/...    Ray Train storage (checkpoints, metrics)
    <run>/eval/<name>.json                    one evaluation's summary (per seed, then per set and student)
    <run>/_lease.json                         the driver that holds the folder (storage/lease.py)
    <run>/report.json  report.md  preview.png

Writers and readers of the per-class files go through the methods below, so what a worker reads is
visible in one place (a synthesis actor reads its unit's classes only).
"""
from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import torch

from edc_ray.algo.candidates import Candidates
from edc_ray.algo.stats import ClassStatSums, StatTotals
from edc_ray.errors import DataError
from edc_ray.storage import fsio
from edc_ray.storage.candidates import read_candidates, write_candidates
from edc_ray.storage.images import decode_image

CLASSES_PER_BLOCK = 20  # classes per merge task of the statistics pass (bounds a merge's memory)

# The files that mark a stage's outputs in a run folder: (folder, glob). Written last by each stage,
# so their presence means "this stage produced outputs"; the run-folder guard and the benchmark grid's
# sharing both read this one table.
STAGE_MARKERS = {
    "observers": ("observers", "*.json"),  # one per observer, beside its weights
    "statistics": ("stats", "_complete.json"),
    "candidates": ("candidates", "_complete.json"),
    "synthesis": ("distilled", "*.tar"),  # one per unit
    "evaluation": ("eval", "*.json"),  # one per evaluated (set, student[, seed])
}


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
        raise DataError(f"cannot load {where}: {exn}") from exn


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

    def markers(self, stage: str) -> list[str]:
        """The marker files of `stage` present in the run folder (see `STAGE_MARKERS`)."""
        folder, pattern = STAGE_MARKERS[stage]
        return fsio.list_files(self.path(folder), pattern)

    def unit_shard(self, unit: int, folder: str = "distilled") -> str:
        """The shard of one work unit of a synthesised set (`distilled`, or a baseline's folder)."""
        return self.path(folder, f"unit-{unit:05d}.tar")

    # -- the statistics pass

    def task_path(self, task: int, name: str) -> str:
        """A file of statistics task `task`'s partial result."""
        return self.path("stats", "parts", f"task-{task:05d}", name)

    def block_path(self, block: int) -> str:
        """The merged totals of class block `block` (written last by its merge)."""
        return self.path("stats", "blocks", f"block-{block:05d}.pt")

    def class_statistics_path(self, label: int) -> str:
        """Where one class's statistic sums live."""
        return self.path("stats", "classes", f"class-{label:05d}.pt")

    def class_candidates_path(self, label: int) -> str:
        """Where one class's candidates live."""
        return self.path("candidates", f"class-{label:05d}.tar")

    def save_class_statistics(self, label: int, sums: dict[str, ClassStatSums]) -> None:
        """Write one class's sums (observer name -> a one-class accumulator)."""
        fsio.atomic_write_bytes(self.class_statistics_path(label),
                                torch_bytes({name: s.state_dict() for name, s in sums.items()}))

    def class_statistics(self, label: int) -> dict[str, ClassStatSums]:
        """One class's sums, observer name -> a one-class accumulator."""
        url = self.class_statistics_path(label)
        return {name: ClassStatSums.from_state_dict(state)
                for name, state in load_torch_bytes(fsio.read_bytes(url), url).items()}

    def save_global_statistics(self, totals: dict[str, StatTotals]) -> None:
        """Write the sums over all classes (observer name -> totals)."""
        self.save_torch({name: t.state_dict() for name, t in totals.items()}, "stats", "global.pt")

    def global_statistics(self) -> dict[str, StatTotals]:
        """The sums over all classes, observer name -> totals."""
        return {name: StatTotals.from_state_dict(state) for name, state in self.load_torch("stats", "global.pt").items()}

    def save_class_candidates(self, label: int, cands: Candidates) -> int:
        """Write one class's candidates; returns their count."""
        return write_candidates(self.class_candidates_path(label), cands)

    def class_candidates(self, label: int, decode: Callable[[bytes], torch.Tensor] = decode_image) -> Candidates:
        """One class's candidates (encoded payloads; `decode` makes their images, see `read_candidates`)."""
        return read_candidates([self.class_candidates_path(label)], decode)

    def statistics_marker(self) -> dict | None:
        """What `stats/_complete.json` records, or None when the statistics are not complete."""
        return self.read_json("stats", "_complete.json") if self.exists("stats", "_complete.json") else None

    def candidates_marker(self) -> dict | None:
        """What `candidates/_complete.json` records, or None when the candidates are not complete."""
        return self.read_json("candidates", "_complete.json") if self.exists("candidates", "_complete.json") \
            else None
