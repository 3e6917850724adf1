import random

import numpy as np
import pytest
import torch

from toolkit import seed_everything


def draw():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_same_seed_same_numbers_and_different_seed_different_numbers():
    g1 = seed_everything(7)
    a = draw() + (torch.rand(2, generator=g1).tolist(),)
    g2 = seed_everything(7)
    b = draw() + (torch.rand(2, generator=g2).tolist(),)
    seed_everything(8)
    c = draw()
    assert a == b and a[:3] != c


def test_bad_seed():
    with pytest.raises(ValueError, match="non-negative"):
        seed_everything(-1)
