"""Shared pytest fixtures."""
from pathlib import Path

import pytest
import torch

from toolkit import data


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The ../shared/data folder beside the project root (real datasets); skips the test when absent."""
    path = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip("../shared/data not present")
    return path


@pytest.fixture(scope="session")
def digits():
    """scikit-learn digits, the default 80/20 split (1,437 / 360)."""
    return data.load("digits")


@pytest.fixture(scope="session")
def iid10(digits):
    """digits split IID over ten clients."""
    return data.partition(digits, 10, "iid", seed=0)


@pytest.fixture(scope="session")
def digits32():
    """digits upsampled to 32x32 (the DLG LeNet's input size)."""
    return data.load("digits", image_size=32)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny networks: one thread is much faster than several fighting over shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
