"""Shared pytest fixtures, and one thread per worker when the suite runs in parallel (pytest-xdist).

Under xdist each worker pins torch, OpenMP and MKL to one thread (and so do the notebook kernels it
starts, which inherit the environment): N workers on N cores, instead of N x cores threads fighting
over them (that oversubscription made tiny-network tests 35x slower). Each test module runs on one
worker (its module-scoped fixtures are built once); notebooks spread over the workers one by one.
"""
import os

if os.environ.get("PYTEST_XDIST_WORKER"):  # before torch starts its thread pools
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[_var] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from toolkit import data  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

SPREAD = {"test_notebooks.py"}  # modules whose tests may run on different workers


def pytest_collection_modifyitems(config, items):
    """Under ``--dist loadgroup``: one group per module, except the modules in SPREAD."""
    for item in items:
        name = item.path.name
        if name not in SPREAD:
            item.add_marker(pytest.mark.xdist_group(name=str(item.path)))


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
