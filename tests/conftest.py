"""Shared test setup: single-threaded torch, and a real S3 server (SeaweedFS) for tests that ask for one."""
from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from edc_ray.storage.local_s3 import SeaweedS3, environ


@pytest.fixture(autouse=True, scope="session")
def single_thread():
    """Tiny tensors gain nothing from intra-op threads, which thrash on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
