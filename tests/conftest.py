"""Shared fixtures. Tests run on CPU in fp32 with one intra-op thread so results are reproducible."""

import pytest
import torch

pytest_plugins = ["fake_kernels"]  # fake_flash / fake_te fixtures for any test file


@pytest.fixture(autouse=True)
def _deterministic_torch():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
