"""Custom Ray metrics (`ray.util.metrics`) so the dashboard and Prometheus show the pipeline's progress.

Ray exports them from every process that records them, prefixed `ray_`, on each node's metrics
endpoint (`ray.init(_metrics_export_port=...)` / `ray start --metrics-export-port=...`).
"""
from __future__ import annotations

from functools import lru_cache

from ray.util.metrics import Counter, Gauge


@lru_cache(maxsize=None)
def _gauge(name: str, description: str, tags: tuple[str, ...]) -> Gauge:
    return Gauge(name, description=description, tag_keys=tags)


@lru_cache(maxsize=None)
def _counter(name: str, description: str, tags: tuple[str, ...]) -> Counter:
    return Counter(name, description=description, tag_keys=tags)


def units_progress(done: int, queued: int, running: int) -> None:
    """Driver: synthesis units done, waiting in the queue, and running on actors."""
    for state, value in (("done", done), ("queued", queued), ("running", running)):
        _gauge("edc_synthesis_units", "Synthesis work units by state", ("state",)).set(
            value, tags={"state": state})


def unit_finished(actor: str, images: int, seconds: float, loss: float) -> None:
    """Actor: one unit committed (images written, throughput, last loss)."""
    tags = {"actor": actor}
    _counter("edc_synthesis_images", "Synthetic images written", ("actor",)).inc(images, tags=tags)
    _gauge("edc_synthesis_images_per_second", "Images per second of the last unit", ("actor",)).set(
        images / max(seconds, 1e-9), tags=tags)
    synthesis_loss(actor, loss)


def synthesis_loss(actor: str, loss: float) -> None:
    """Actor: the current synthesis loss, while a unit is running."""
    _gauge("edc_synthesis_loss", "Total synthesis loss at the last iteration", ("actor",)).set(
        loss, tags={"actor": actor})


def evaluation_accuracy(run: str, seed: int, top1: float) -> None:
    """Ray Train rank 0: the student's latest validation top-1 (%)."""
    _gauge("edc_eval_top1", "Validation top-1 (%) of the student being trained", ("run", "seed")).set(
        top1, tags={"run": run, "seed": str(seed)})
