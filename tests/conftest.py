"""Test setup: Triton's interpreter on machines without CUDA, seeded randomness, GPU markers.

TRITON_INTERPRET must be set before anything imports triton (torchvision does), so it is set
here, at conftest import, before the test modules import fastres or torchvision.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")
