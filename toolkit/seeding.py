"""One seed for every source of randomness: same seed, same numbers."""
from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int, *, deterministic: bool = False) -> torch.Generator:
    """Seed Python, NumPy and PyTorch, and return a fresh ``torch.Generator`` with that seed.

    Args:
        seed: any non-negative integer.
        deterministic: also ask PyTorch for deterministic kernels (slower on some ops).

    Returns:
        A ``torch.Generator`` seeded with ``seed``, for code that takes an explicit generator.

    Example:
        >>> g = seed_everything(0)
        >>> a = torch.rand(2); _ = seed_everything(0); b = torch.rand(2)
        >>> bool((a == b).all())
        True
    """
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)
    return torch.Generator().manual_seed(seed)
