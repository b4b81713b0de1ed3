"""Shared test setup."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def single_thread():
    """Tiny tensors gain nothing from intra-op threads, which thrash on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
