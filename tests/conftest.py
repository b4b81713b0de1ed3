"""Shared test setup: single-threaded torch, the test helpers shipped to Ray workers by value, and a real
S3 server (SeaweedFS) for tests that ask for one."""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest
import ray
import ray.cloudpickle
import torch
from PIL import Image

import tiny
from edc_ray.storage.local_s3 import SeaweedS3, environ
from tiny import make_tiny

# Ray workers cannot import this folder's modules (it is on the driver's path only): functions of
# `tiny` handed to them (e.g. `recording_loop`) travel by value.
ray.cloudpickle.register_pickle_by_value(tiny)


@pytest.fixture(autouse=True, scope="session")
def single_thread():
    """Tiny tensors gain nothing from intra-op threads, which thrash on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_exit_status: list[int] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _exit_status.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Leave with pytest's own exit status once everything is reported, skipping interpreter finalisation.

    After a whole suite (dozens of Ray instances started and stopped in this process, Ray's and torch's
    native threads still attached), the interpreter's own teardown crashed once with a segmentation
    fault after "474 passed" (session 11, one fresh-clone run in three; not reproduced in smaller
    runs). Nothing of ours runs there; the results are already decided and printed.
    """
    if _exit_status:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status[-1])


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that uses the S3 server carries the ``s3`` marker, so ``-m "not s3"`` leaves them all out."""
    for item in items:
        if "s3_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.s3)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A real S3 server on 127.0.0.1 for the session, with the AWS variables pointing at it while it runs."""
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    try:
        with environ(server.environment()):
            yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def ray_local():
    """A private local Ray instance of 2 CPUs for the module."""
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_imagefolder(tmp_path_factory):
    """A 3-class 12x12 grayscale ImageFolder (train 20 + test 10 per class)."""
    root = tmp_path_factory.mktemp("tiny-src")
    for split, per_class, seed in (("train", 20, 0), ("test", 10, 1)):
        images, labels = make_tiny(per_class=per_class, seed=seed)
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = root / split / f"class{int(label)}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[0].numpy()).save(folder / f"{i:04d}.png")
    return str(root)


@pytest.fixture(scope="module")
def observer_weights(tmp_path_factory) -> str:
    """Fixed weights of a ConvNet-D2 for the tiny set, so that runs skip observer training (Ray Train)."""
    from edc_ray.pipeline.common import DatasetMeta, build_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "convnet_d2.pt"
    torch.save(build_model("convnet_d2", DatasetMeta(3, 1, 12, (0.2,), (0.3,))).state_dict(), path)
    return str(path)
