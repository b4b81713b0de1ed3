"""The Ray cluster a run uses, as the stages need to know it: its nodes, whether work may land on other
nodes than the driver's, which paths every node can read, and waiting for room with an end.

Stages call `wait_for_room` before they submit work that needs resources: it returns once the cluster's
nodes could hold the work (asking the autoscaler for it meanwhile), and raises `ClusterError` naming
what was asked for and what the cluster offers when that does not happen within
`ray.placement_timeout_s`. Without it Ray would keep such work pending forever.
"""
from __future__ import annotations

import math
import time

import ray

from edc_ray.config import Config
from edc_ray.errors import ClusterError
from edc_ray.models.pretrained import local_dir
from edc_ray.storage import fsio

POLL_S = 1.0


def alive_nodes() -> list[dict]:
    """The alive nodes of the connected Ray instance (`ray.nodes()` entries)."""
    return [node for node in ray.nodes() if node.get("Alive")]


def spans_nodes(cfg: Config) -> bool:
    """Whether work may run on another node than the driver's: the instance has several nodes now, or
    it is a cluster this run joined (`ray.address` not "local"), which an autoscaler may grow at any
    time (Ray 2.60 does not tell a driver whether one is attached)."""
    return len(alive_nodes()) > 1 or cfg.ray.address != "local"


def node_local_paths(cfg: Config) -> list[tuple[str, str]]:
    """(config key, path) of every path the stages read or write on several nodes that is on a local
    disk and not under one of `ray.shared_paths`."""
    paths = [("data.root", cfg.data.root), ("output.run_dir", cfg.output.run_dir)]
    paths += [(f"observers.models[{k}].weights", spec.weights) for k, spec in enumerate(cfg.observers.models)
              if spec.weights]
    paths += [(f"observers.models[{k}].arch", local_dir(spec.arch)) for k, spec in enumerate(cfg.observers.models)
              if local_dir(spec.arch)]
    return [(key, path) for key, path in paths if node_local(path, cfg.ray.shared_paths)]


def node_local(path: str, shared_paths: list[str]) -> bool:
    """Whether `path` is on this machine's disk and not under one of `shared_paths` (mounted by every node)."""
    shared = tuple(fsio.absolute(p).rstrip("/") + "/" for p in shared_paths)
    return fsio.is_local(path) and not (fsio.absolute(path).rstrip("/") + "/").startswith(shared)


def check_shared_paths(cfg: Config) -> None:
    """On a cluster of several nodes (or a joined one, which may grow), refuse node-local paths before any
    work.

    Each node would read and write its own disk: units, weights and checkpoints would end up scattered
    over the nodes, and the driver would not find them.
    """
    local = node_local_paths(cfg)
    if not local or not spans_nodes(cfg):
        return
    listed = ", ".join(f"{key}={path!r}" for key, path in local)
    raise ClusterError(f"{listed}: on this machine's disk, but this run uses a Ray cluster whose other nodes "
                       f"(now or once added) cannot see it; it has {describe_cluster()}. Use s3:// URLs, or a folder that "
                       "every node mounts at the same path (NFS, EFS, FSx) declared with "
                       "--set 'ray.shared_paths=[/mnt/shared]'")


def _plain(resources: dict) -> dict[str, float]:
    return {k: float(v) for k, v in resources.items() if k in ("CPU", "GPU") and v}


def describe_cluster() -> str:
    """One line: each alive node's CPUs and GPUs."""
    nodes = alive_nodes()
    return f"{len(nodes)} node(s): " + "; ".join(
        f"{node.get('NodeManagerAddress', '?')} {_plain(node.get('Resources', {}))}" for node in nodes)


def bundles_that_fit(bundle: dict[str, float], nodes: list[dict]) -> int:
    """How many copies of `bundle` (positive amounts) the nodes' total resources could hold at once, each
    copy on one node."""
    if not bundle:
        return math.inf if nodes else 0
    return sum(min(int(node.get("Resources", {}).get(k, 0.0) / v + 1e-9) for k, v in bundle.items())
               for node in nodes)


def _request(bundles: list[dict]) -> None:
    """Ask the autoscaler (if any) for room for `bundles`; [] withdraws the request."""
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)
    except Exception:  # no autoscaler to ask: the wait below still ends
        pass


def wait_for_room(what: str, bundle: dict[str, float], needed: int, timeout_s: float) -> None:
    """Block until the cluster could hold `needed` copies of `bundle` at once.

    While it waits it prints one line saying what is pending and asks the autoscaler for the room;
    after `timeout_s` it raises `ClusterError` naming the request and what the cluster offers.
    """
    wanted = {k: v for k, v in bundle.items() if v > 0}
    fit = bundles_that_fit(wanted, alive_nodes())
    if fit >= needed:
        return
    print(f"[edc-ray] {what}: waiting up to {timeout_s:.0f} s (ray.placement_timeout_s) for room for {needed} x "
          f"{wanted}; the cluster has {describe_cluster()}", flush=True)
    deadline = time.monotonic() + timeout_s
    _request([wanted] * needed)
    try:
        while fit < needed:
            if time.monotonic() >= deadline:
                raise ClusterError(f"{what} asked for {needed} x {wanted} and within ray.placement_timeout_s="
                                   f"{timeout_s:g} s the cluster could hold {fit}: it has {describe_cluster()}. "
                                   "Add nodes (or a node type) with these resources, or ask for less")
            time.sleep(POLL_S)
            fit = bundles_that_fit(wanted, alive_nodes())
    finally:
        _request([])
